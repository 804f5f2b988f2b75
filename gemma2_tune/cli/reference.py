"""The CLI reference, generated from the command tree Typer builds from the app (`typer.main.get_command`): every
command in the order `gemma2-tune --help` lists them, its usage, its help and every visible argument and option
with the help, default and range `--help` shows. Written between the markers of docs/reference/cli.md
(`make docs-generate`).

    python -m gemma2_tune.cli.reference [DOCS_DIR]   # rewrites docs/reference/cli.md and config.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..config.reference import markdown_text, update_page
from .app import app

BEGIN = "<!-- cli-reference:begin (generated from the Typer app by `make docs-generate`; do not edit) -->"
END = "<!-- cli-reference:end -->"
PROG = "gemma2-tune"


def command_tree():
    """The root command Typer builds from `app`, and its context. Every command is registered by then: importing
    this module imports the `cli` package first, which imports train, after and inspect."""
    root = typer.main.get_command(app)
    return root, root.make_context(PROG, [], resilient_parsing=True)


def commands() -> list[tuple[str, object]]:
    """(name, command) of every visible command, in `--help` order."""
    root, ctx = command_tree()
    found = [(name, root.get_command(ctx, name)) for name in root.list_commands(ctx)]
    return [(name, cmd) for name, cmd in found if not getattr(cmd, "hidden", False)]


def _usage(name: str, cmd) -> str:
    pieces = [PROG, name, "[OPTIONS]"]
    for param in cmd.params:
        if param.param_type_name == "argument":
            label = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(label if param.required else f"[{label}]")
    return " ".join(pieces)


def _rows(cmd, ctx) -> list[str]:
    rows = []
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        label, help_text = record
        if param.param_type_name == "argument":
            label = param.name.upper() + ("..." if param.nargs == -1 else "")
        rows.append(f"| `{label.replace('|', '/')}` | {markdown_text(help_text or '')} |")
    return rows


def markdown() -> str:
    """The whole CLI reference as Markdown, from BEGIN to END."""
    root, root_ctx = command_tree()
    lines = [BEGIN, "", f"`{PROG} [--version] COMMAND [OPTIONS]`: {markdown_text(root.help or '')}", "",
             "| command | what it does |", "| --- | --- |"]
    listed = commands()
    for name, cmd in listed:
        summary = markdown_text((cmd.help or "").split("\n\n")[0])
        lines.append(f"| [`{name}`](#{PROG}-{name}) | {summary} |")
    for name, cmd in listed:
        ctx = cmd.make_context(name, [], parent=root_ctx, resilient_parsing=True)
        lines += ["", f"## {PROG} {name}", "", "```text", _usage(name, cmd), "```", "",
                  markdown_text(cmd.help or ""), "", "| argument or option | meaning |", "| --- | --- |"]
        lines += _rows(cmd, ctx)
    lines += ["", END]
    return "\n".join(lines)


def update(docs: Path | str = "docs") -> list[str]:
    """Rewrite the generated sections of the CLI and config reference pages under `docs`; the pages that
    changed."""
    docs = Path(docs)
    changed = []
    if update_page(docs / "reference" / "cli.md", BEGIN, END, markdown()):
        changed.append(str(docs / "reference" / "cli.md"))
    if update_page(docs / "reference" / "config.md"):
        changed.append(str(docs / "reference" / "config.md"))
    return changed


if __name__ == "__main__":
    changed = update(sys.argv[1] if len(sys.argv) > 1 else "docs")
    print("updated: " + ", ".join(changed) if changed else "up to date")

"""The documentation: generated pages current, every command example valid against the real app, the site builds.

Every `gemma2-tune ...` line in a ```bash / ```console block of docs/ and README.md (and every bundled recipe's
`# Run:` line) is parsed by the command tree Typer builds from the app, as the shell would hand it over: the
command must exist, its options must exist and take the values given, its required arguments must be there.
Beyond parsing: each `--set` key must exist in that method's schema, each recipe it names must exist, and each
repository path a block names must exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from conftest import ROOT

from gemma2_tune.cli import app
from gemma2_tune.cli import reference as cli_reference
from gemma2_tune.config import reference as config_reference
from gemma2_tune.config.recipes import bundled_recipes
from gemma2_tune.config.schema import sections
from gemma2_tune.errors import ConfigError
from gemma2_tune.config.methods import schema_for
from gemma2_tune.training.methods import METHODS

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REPO_PATH = re.compile(r"^(recipes|bench|examples|accelerate_configs)/[\w./-]+")


@dataclass
class Example:
    where: str  # "docs/x.md:12"
    args: list[str] | None  # what follows `gemma2-tune` (or `-m gemma2_tune`); None: another program
    tokens: list[str]  # the whole shell command, for repository paths
    refused: bool = False  # a console example whose output shows the refusal (`error: ...`): it must parse, and
    # what it shows refused (a --set key, a recipe) is not a problem of the page


def blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the first line, language, lines) of every fenced code block."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, body, j = m.group(2), m.group(3).lower(), [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j])
            j += 1
        found.append((i + 2, lang, body))
        i = j + 1
    return found


def shell_lines(lang: str, body: list[str], first: int) -> list[tuple[int, str, bool]]:
    """(line number, logical command line, refused) of a shell block: `\\` continuations joined; in a console
    block only the lines after a `$ ` prompt, refused when the output they show has an `error:` line."""
    out, pending, start = [], "", 0
    for n, line in enumerate(body, first):
        if lang == "console" and not pending and not line.startswith("$ "):
            if out and line.startswith("error:"):
                out[-1] = (*out[-1][:2], True)
            continue
        if not pending:
            line = line[2:] if lang == "console" else line
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line, False))
        pending = ""
    return out


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as the shell splits them (comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    found, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            found.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in found + [current] if c]


def gemma2_tune_args(tokens: list[str]) -> list[str] | None:
    """The arguments given to gemma2-tune by a command (`gemma2-tune ...`, `.venv/bin/gemma2-tune ...`,
    `python -m gemma2_tune ...`, `accelerate launch ... -m gemma2_tune ...`), or None."""
    for i, token in enumerate(tokens):
        if token == "gemma2-tune" or token.endswith("/gemma2-tune"):
            return tokens[i + 1:]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "gemma2_tune":
            return tokens[i + 2:]
    return None


def examples(path: Path) -> list[Example]:
    """Every gemma2-tune command in a page's shell blocks, or in a recipe's `# Run:` line."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    if path.suffix == ".yaml":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("# Run:"):
                command = re.sub(r"\s{2,}\(.*\)\s*$", "", line.removeprefix("# Run:"))  # "   (a remark)"
                found += [Example(f"{rel}:{n}", args, tokens) for tokens in commands(command)
                          if (args := gemma2_tune_args(tokens)) is not None]
        return found
    for first, lang, body in blocks(path.read_text()):
        if lang not in SHELL_BLOCKS:
            continue
        for n, line, refused in shell_lines(lang, body, first):
            found += [Example(f"{rel}:{n}", gemma2_tune_args(tokens), tokens, refused) for tokens in commands(line)]
    return found


def written_files(path: Path) -> set[str]:
    """Files a page writes itself: ```yaml blocks whose first line is `# NAME`."""
    if path.suffix != ".md":
        return set()
    return {body[0].lstrip("# ").strip() for _, lang, body in blocks(path.read_text())
            if lang in ("yaml", "yml") and body and body[0].startswith("# ")}


def recipe_problem(recipe: str, written: set[str]) -> str | None:
    """Why a recipe a command names does not exist (None when it does)."""
    if recipe.startswith("recipes/"):
        return None if (ROOT / recipe).is_file() else f"no such recipe file {recipe}"
    if "/" not in recipe and not recipe.endswith((".yaml", ".yml")):
        names = {p.stem for p in bundled_recipes()}
        return None if recipe in names else f"no bundled recipe named {recipe}"
    return None if recipe in written else f"recipe {recipe}: neither in recipes/ nor written on the same page"


def set_key_problems(command: str, recipe: str | None, sets: list[str]) -> list[str]:
    """Why `--set key=value` items name no key of the command's schema (the method a recipe or `--set method=`
    picks, else the command's own)."""
    try:
        schema = schema_for(recipe, sets, default=command if command in METHODS else "sft")
    except ConfigError as exc:  # an unknown method
        return exc.problems
    method, found = schema.model_fields["method"].default, []
    for item in sets:
        key = item.partition("=")[0].strip()
        section, _, name = key.partition(".")
        fields = sections(schema).get(section)
        if key != "method" and (fields is None or name.split(".")[0] not in fields.model_fields):
            found.append(f"--set {key}: not a key of method {method}")
    return found


def problems(example: Example, written: set[str]) -> list[str]:
    """Everything wrong with one example, each naming where it is."""
    where, args, found = example.where, example.args, []
    for token in example.tokens:
        path = REPO_PATH.match(token)
        if path and not (ROOT / re.split(r"[:=]", path.group(0))[0]).exists():
            found.append(f"{where}: {path.group(0)} does not exist in the repository")
    if args is None or args == ["--version"]:
        return found
    if not args:
        return found + [f"{where}: no command after gemma2-tune"]
    root = typer.main.get_command(app)
    root_ctx = root.make_context("gemma2-tune", [], resilient_parsing=True)
    command = root.get_command(root_ctx, args[0])
    if command is None:
        return found + [f"{where}: gemma2-tune has no command {args[0]!r}"]
    try:
        ctx = command.make_context(args[0], list(args[1:]), parent=root_ctx)
    except typer.TyperException as exc:  # the parser's own errors: no such option, bad value, missing argument
        return found + [f"{where}: gemma2-tune {' '.join(args)}: {exc.format_message()}"]
    if example.refused:
        return found
    recipe = ctx.params.get("recipe")
    recipe_wrong = recipe_problem(recipe, written) if recipe else None
    if recipe_wrong:
        found.append(f"{where}: {recipe_wrong}")
    readable = recipe if recipe and not recipe_problem(recipe, set()) else None  # a page's own file is not on disk
    found += [f"{where}: {p}" for p in set_key_problems(args[0], readable, ctx.params.get("set_") or [])]
    return found


SOURCES = PAGES + sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_example_parses_against_the_app(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths in the examples are relative to the repository root
    written = written_files(path)
    wrong = [p for example in examples(path) for p in problems(example, written)]
    assert wrong == []


def test_the_docs_hold_command_examples():
    """The extraction finds the examples (a regex gone wrong would make the test above pass on nothing)."""
    counted = {p.name: len([e for e in examples(p) if e.args]) for p in SOURCES}
    assert sum(counted.values()) > 100 and counted["README.md"] >= 10 and counted["quickstart-cpu.yaml"] == 1


@pytest.mark.parametrize("text, wrong", [
    ("gemma2-tune sfft --recipe recipes/quickstart-cpu.yaml", "no command 'sfft'"),
    ("gemma2-tune sft --recipe recipes/quickstart-cpu.yaml --max-step 3", "No such option"),
    ("gemma2-tune sft --recipe recipes/quickstart-cpu.yaml --max-steps many", "many"),
    ("gemma2-tune merge --adapter runs/x", "--output"),
    ("gemma2-tune sft --recipe recipes/no-such.yaml", "no such recipe file"),
    ("gemma2-tune sft --recipe no-such-recipe", "no bundled recipe"),
    ("gemma2-tune validate mine.yaml", "neither in recipes/ nor written"),
    ("gemma2-tune sft --recipe quickstart-cpu --set training.no_such_key=1", "training.no_such_key"),
    ("gemma2-tune distill --recipe gemma-2-9b-distill-from-27b --set data.packing=false", "data.packing"),
    ("python bench/no_such_script.py", "bench/no_such_script.py does not exist"),
    ("gemma2-tune rl --recipe recipes/rl-cpu.yaml \\\n  --reward-function recipes/rewards/gone.py:f", "gone.py"),
])
def test_a_wrong_example_is_reported(tmp_path, monkeypatch, text, wrong):
    monkeypatch.chdir(ROOT)
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n\n```bash\n{text}\n```\n")
    found = [p for example in examples(page) for p in problems(example, set())]
    assert found and any(wrong in problem for problem in found), found


def test_a_recipe_written_on_the_page_may_be_named(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    page = tmp_path / "page.md"
    page.write_text("```yaml\n# mine.yaml\nmethod: sft\n```\n\n```console\n$ gemma2-tune validate mine.yaml\nok\n```\n")
    found = [p for example in examples(page) for p in problems(example, written_files(page))]
    assert [e.args for e in examples(page)] == [["validate", "mine.yaml"]] and found == []


def test_generated_references_are_current():
    """The CLI and config references and the benchmark tables equal what the code and the result files give;
    `make docs-generate` rewrites them."""
    stale = "is stale: regenerate with `make docs-generate`"
    cli = (DOCS / "reference" / "cli.md").read_text()
    assert config_reference.replace_section(cli, cli_reference.BEGIN, cli_reference.END,
                                            cli_reference.markdown()) == cli, f"docs/reference/cli.md {stale}"
    config = (DOCS / "reference" / "config.md").read_text()
    assert config_reference.markdown() in config, f"docs/reference/config.md {stale}"
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    bench = (DOCS / "guides" / "benchmarks.md").read_text()
    assert report.render(bench) == bench, f"docs/guides/benchmarks.md {stale}"


def test_the_cli_reference_names_every_command_and_option():
    """The generator misses nothing `--help` shows: every visible command, and every visible option of each."""
    text = cli_reference.markdown()
    root = typer.main.get_command(app)
    ctx = root.make_context("gemma2-tune", [], resilient_parsing=True)
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        assert f"## gemma2-tune {name}\n" in text
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert all(f"{opt}" in text for opt in param.opts), (name, param.opts)


def test_markdown_text_escapes_html_outside_code_spans():
    """Outside code spans `<` and `|` would vanish (an HTML tag) or split the cell; inside one (a Python-Markdown
    table keeps a code span's `|`) they show as written."""
    assert config_reference.markdown_text("stops at <end_of_turn> | `a <b> | c`\nnext") == \
        "stops at &lt;end_of_turn&gt; \\| `a <b> | c` next"


def test_every_bundled_recipe_is_on_the_recipes_page():
    page = (DOCS / "guides" / "recipes.md").read_text()
    for recipe in bundled_recipes():
        assert f"`{recipe.stem}`" in page and f"recipes/{recipe.name}" in page, recipe.name


def test_no_page_cites_an_internal_issue_number():
    cited = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in PAGES
             for m in re.finditer(r"\b[Ii]ssues? #?\d+|(?<![\w/&])#\d+\b", p.read_text())]
    assert cited == []


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")]
    assert [p for p in pages if f": {p}\n" not in nav] == []


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[docs]'; dev has them)")
def test_the_site_builds_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})  # mkdocs-material's banner about MkDocs 2
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def preview_examples(path: Path) -> list[tuple[str, list, list[str], list[str]]]:
    """(where, the rows, the console command's arguments, the output shown) of every ```json block followed by a
    ```console block whose command is `gemma2-tune preview ... --dataset FILE`: the rows are FILE's, one JSON value
    each (a block may pretty-print one row over several lines, or hold one row per line)."""
    rel = path.relative_to(ROOT)
    found, shown = [], blocks(path.read_text())
    for (first, lang, body), (_, next_lang, next_body) in zip(shown, shown[1:]):
        if lang != "json" or next_lang != "console" or not next_body or not next_body[0].startswith("$ "):
            continue
        args = gemma2_tune_args(shlex.split(next_body[0][2:]))
        if not args or args[0] != "preview":
            continue
        text, rows, decoder = "\n".join(body).strip(), [], json.JSONDecoder()
        while text:
            row, end = decoder.raw_decode(text)
            rows.append(row)
            text = text[end:].strip()
        found.append((f"{rel}:{first}", rows, args, next_body[1:]))
    return found


def test_the_data_page_holds_gemma4_preview_examples():
    """The extraction below finds the examples (a page edited so that none match would pass on nothing)."""
    found = preview_examples(DOCS / "guides" / "data.md")
    assert len(found) >= 3 and all("builtin:tiny-gemma4" in args for _, _, args, _ in found)


@pytest.mark.parametrize("page", [p for p in PAGES if preview_examples(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_rows_shown_on_a_page_preview_as_shown(page, tmp_path, monkeypatch):
    """Each row example followed by its `preview` prints exactly what the page shows (the rows written to the file
    the command names, one per line, in an empty folder), and exits 2 where the page shows an `error:`, else 0."""
    from typer.testing import CliRunner

    from gemma2_tune.models.builtin import builtin_path

    monkeypatch.chdir(tmp_path)
    wrong = []
    for where, rows, args, shown in preview_examples(page):
        for name in (a for a in args if a.startswith("builtin:")):
            builtin_path(name)  # built before: building prints the library's progress bars
        dataset = args[args.index("--dataset") + 1]
        (tmp_path / dataset).write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = CliRunner().invoke(app, args)
        got = [line.rstrip() for line in result.output.strip("\n").splitlines()]
        want = [line.rstrip() for line in "\n".join(shown).strip("\n").splitlines()]
        code = 2 if any(line.startswith("error:") for line in want) else 0
        if got != want or result.exit_code != code:
            wrong.append(f"{where}: `gemma2-tune {' '.join(args)}` exited {result.exit_code} (shown: {code}), "
                         "printed:\n" + "\n".join(got))
    assert wrong == [], "\n\n".join(wrong)

"""The `gemma2-tune` command line: one small module per command group, each command parsing its options and
delegating.

    app.py        the Typer app, the shared options, `handled` (exit codes from one place)
    train.py      sft, distill, dpo, reward, rl: generated, one per entry of the registry (training/methods.py)
    after.py      chat, eval, merge, merge-models, serve, export
    inspect.py    validate, preview, plan, models, recipes, config, build-model
    reference.py  the CLI reference page, generated from the app

Heavy imports (torch, transformers, trl) happen inside the commands that need them, so `--help`,
`validate`, `recipes`, `config` and `sft --dry-run` answer at once.
"""

from __future__ import annotations

import sys

import typer

from . import train, after, inspect  # noqa: F401, I001  (each registers its commands on `app`, in this order)
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    """The console script: the Typer app; Ctrl-C exits 130 without a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)

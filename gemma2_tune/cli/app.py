"""The app every command registers on, the options commands share, and `handled`: the one place that turns an
Outcome (UserError/ConfigError: exit 2, Interrupted: exit 143) into a one-line message and an exit code."""

from __future__ import annotations

import functools
import os
import re
import typing
from typing import Annotated, Any, Callable, Optional

import typer

from .. import __version__
from ..config.layering import Resolved, resolve
from ..config.schema import RunConfig
from ..errors import Interrupted, Outcome, UserError

app = typer.Typer(
    name="gemma2-tune",
    help="Fine-tune Gemma 2 (and Gemma 3 text models) on chat data: QLoRA, eager attention (soft-capping "
    "kept), Gemma's exact turn format, loss on model turns only.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe YAML (path or bundled name).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one key: --set training.learning_rate=1e-4 (repeatable)."),
]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="model.name_or_path: hub id or local folder.")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", "-d", help="data.dataset: alias, hub id or local file/folder.")]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", "-a", help="A gemma2-tune run folder (adapter).")]
LoadInOpt = Annotated[str, typer.Option("--load-in", help="auto (the run's precision, unquantized), bf16, fp32, "
                                        "8bit or 4bit.")]
LaunchOpt = Annotated[Optional[str], typer.Option("--launch", help="Start N processes with accelerate: a bundled config "
                                                  "(zero3 = deepspeed_zero3, zero3_offload, ddp = multi_gpu, "
                                                  "single = single_gpu) or a path.")]
# The options every training command shares (sft, distill).
OutputDirOpt = Annotated[Optional[str], typer.Option("--output-dir", "-o", help="output.dir")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(help="training.max_steps")]
LearningRateOpt = Annotated[Optional[float], typer.Option(help="training.learning_rate")]
OverwriteOpt = Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a previous run in the output dir.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in the output dir.")]
AllowDataChangeOpt = Annotated[bool, typer.Option("--allow-data-change", help="With --resume: continue although the "
                                                  "data changed since the checkpoint (recorded in run.json).")]
ResumeFromOpt = Annotated[Optional[str], typer.Option("--resume-from", help="Continue from this checkpoint folder.")]
NumProcessesOpt = Annotated[Optional[int], typer.Option("--num-processes", help="Processes for --launch.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and plan; train nothing.")]
RecipeLabelOpt = Annotated[Optional[str], typer.Option("--recipe-label", hidden=True)]


def echo(line: str) -> None:
    """A line on stdout."""
    typer.echo(line)


def warn(line: str) -> None:
    """'warning: ...' in yellow on stderr."""
    typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)


def is_main_rank() -> bool:
    """Under accelerate every rank runs the CLI; rank 0 speaks for all of them."""
    return os.environ.get("RANK", "0") == "0"


def handled(fn: Callable) -> Callable:
    """Run a command; an Outcome becomes its message on stderr (rank 0 only) and its exit code."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Outcome as exc:
            if is_main_rank():
                color = typer.colors.YELLOW if isinstance(exc, Interrupted) else typer.colors.RED
                prefix = "" if isinstance(exc, Interrupted) else "error: "
                typer.secho(f"{prefix}{exc.message}", fg=color, err=True)
            raise typer.Exit(exc.exit_code) from None

    return run


# Rich reads "[word...]" in help texts as a markup tag and drops it ("pip install 'gemma2-tune[export]'" showed as
# 'gemma2-tune'): a "[" that opens one is escaped. Idempotent: an escaped "[" stays as it is.
_MARKUP_TAG = re.compile(r"(?<!\\)\[(?=[a-zA-Z#/@])")


def escape_markup(text: str | None) -> str | None:
    """`text` with every "[" that Rich would read as the start of a markup tag escaped (shown as typed)."""
    return _MARKUP_TAG.sub(r"\\[", text) if text else text


def command(*args, **kwargs) -> Callable:
    """@app.command with outcome handling; its help, docstring and options' help shown as typed (escape_markup)."""

    def register(fn: Callable) -> Callable:
        wrapped = handled(fn)
        wrapped.__doc__ = escape_markup(fn.__doc__)
        if kwargs.get("help"):
            kwargs["help"] = escape_markup(kwargs["help"])
        # the annotations evaluated once (a string annotation would give Typer new, unescaped option objects)
        hints = typing.get_type_hints(fn, include_extras=True)
        for annotation in hints.values():
            for info in getattr(annotation, "__metadata__", ()):
                if isinstance(info, typer.models.ParameterInfo):  # shared options: escaped once, idempotent
                    info.help = escape_markup(info.help)
        fn.__annotations__ = wrapped.__annotations__ = hints
        return app.command(*args, **kwargs)(wrapped)

    return register


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemma2-tune {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """gemma2-tune: fine-tune Gemma 2 on chat data."""


def resolved_config(recipe: str | None, sets: list[str] | None, flags: dict[str, tuple[str, Any]] | None = None,
                    schema: type[RunConfig] | None = None) -> Resolved:
    """Resolve and print the warnings (errors raise ConfigError)."""
    resolved = resolve(recipe, sets, flags, schema) if schema else resolve(recipe, sets, flags)
    for w in resolved.warnings:
        warn(w)
    return resolved


def load_in_value(value: str) -> str:
    from ..after.inference import LOAD_IN

    if value not in LOAD_IN:
        raise UserError(f"--load-in {value}: use {', '.join(LOAD_IN)}")
    return value

"""The app every command registers on, the options commands share, and `handled`: the one place that turns an
Outcome (UserError/ConfigError: exit 2, Interrupted: exit 143) into a one-line message and an exit code."""

from __future__ import annotations

import functools
import os
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


def command(*args, **kwargs) -> Callable:
    """@app.command with outcome handling."""
    return lambda fn: app.command(*args, **kwargs)(handled(fn))


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

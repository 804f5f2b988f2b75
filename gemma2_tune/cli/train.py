"""The training commands, generated: one per method of the registry (training/methods.py), each with the
options every training command shares (declared once, here) and the flags its registry entry adds. Each parses
its flags and hands the resolved config to `start_training`, which is the same for every method (checks, dry
run, `--launch`, or training through the method's runner)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config.layering import Resolved, config_to_yaml
from ..errors import UserError
from ..config.methods import check_command
from ..training.methods import METHODS, Flag, Method
from .app import (
    AllowDataChangeOpt,
    DryRunOpt,
    LaunchOpt,
    NumProcessesOpt,
    RecipeLabelOpt,
    RecipeOpt,
    ResumeFromOpt,
    ResumeOpt,
    SetOpt,
    command,
    echo,
    is_main_rank,
    resolved_config,
)

# The config keys every training command can set by a flag; a method's own flag of the same name replaces one.
SHARED_FLAGS = (
    Flag("model.name_or_path", ("--model", "-m"), str, "model.name_or_path: hub id or local folder."),
    Flag("data.dataset", ("--dataset", "-d"), str, "data.dataset: alias, hub id or local file/folder."),
    Flag("output.dir", ("--output-dir", "-o"), str, "output.dir"),
    Flag("training.max_steps", ("--max-steps",), int, "training.max_steps"),
    Flag("training.learning_rate", ("--learning-rate",), float, "training.learning_rate"),
    Flag("output.overwrite", ("--overwrite",), bool, "Replace a previous run in the output dir."),
)
# The options that steer the command rather than set a key, in the order --help shows them (after the flags).
CONTROLS = {"resume": ResumeOpt, "resume_from": ResumeFromOpt, "allow_data_change": AllowDataChangeOpt,
            "launch": LaunchOpt, "num_processes": NumProcessesOpt, "dry_run": DryRunOpt,
            "recipe_label": RecipeLabelOpt}
CONTROL_DEFAULTS = {"resume": False, "allow_data_change": False, "dry_run": False}


def method_flags(method: Method) -> list[Flag]:
    """The shared flags (a method's flag of the same name in its place), then the method's own."""
    own = {flag.names[0]: flag for flag in method.flags}
    shared = [own.pop(flag.names[0], flag) for flag in SHARED_FLAGS]
    return shared + list(own.values())


def flag_values(flags: list[Flag], values: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """{config key: (flag, value)} of the parsed options (None: not given), each converted by its flag."""
    found = {}
    for flag in flags:
        value = values.get(flag.parameter)
        if value is not None and flag.convert is not None:
            value = flag.convert(value)
        found[flag.key] = (flag.names[0], value)
    return found


def _option(flag: Flag) -> Any:
    """A flag as typer's annotation: Optional[kind] with its names and help; a bool flag is an on switch."""
    return Annotated[Optional[flag.kind], typer.Option(*flag.names, help=flag.help)]


def resolve_for(method: str, recipe: str | None, sets: list[str] | None,
                flags: dict[str, tuple[str, Any]]) -> Resolved:
    """The config of `method`'s command: a recipe written for another method is refused naming the command to
    use; then resolved against the method's schema."""
    check_command(method, recipe, sets)
    return resolved_config(recipe, sets, flags, METHODS[method].schema)


def start_training(method: str, resolved: Resolved, *, launch: str | None, num_processes: int | None,
                   resume: bool, resume_from: str | None, dry_run: bool, recipe_label: str | None,
                   allow_data_change: bool = False) -> None:
    """What every training command does with its resolved config: check, then dry run, launch N processes
    (each rank re-enters the method's command with the resolved config), or train in this process."""
    from ..training.describe import run_lines

    cfg = resolved.config
    if num_processes is not None and not launch:
        raise UserError(f"--num-processes needs --launch (or use: accelerate launch --num_processes N -m gemma2_tune "
                        f"{method} ...)")
    if resume and resume_from:
        raise UserError("--resume and --resume-from: give one")
    if launch or dry_run:  # before any process starts
        from ..training.manifest import check_inputs_outside, check_output_dir

        check_inputs_outside(cfg)
        if not (resume or resume_from):
            check_output_dir(Path(cfg.output.dir), cfg.output.overwrite)
    if launch:
        from ..training.launch import check_launch, run_launch

        path, how = check_launch(cfg, launch, num_processes)
        extra = ["--recipe-label", str(resolved.recipe or "flags")]
        extra += ["--resume"] if resume else []
        extra += ["--resume-from", resume_from] if resume_from else []
        extra += ["--allow-data-change"] if allow_data_change else []
        if dry_run:
            echo(f"# would launch: {how.describe()} with {path}")
        else:
            raise typer.Exit(run_launch(method, path, how, config_to_yaml(cfg), extra, echo=echo))
    if dry_run:
        echo("# resolved config\n" + config_to_yaml(cfg))
        echo("# plan (dry run: nothing is loaded or trained)")
        for line in run_lines(cfg):
            echo(line)
        return
    if is_main_rank():
        for line in run_lines(cfg):
            echo(line)
    METHODS[method].run(cfg, echo=echo, recipe=recipe_label or resolved.recipe, resume=resume,
                        resume_from=resume_from, allow_data_change=allow_data_change)


def training_command(method: Method) -> None:
    """Register `gemma2-tune METHOD` on the app: --recipe and --set, the method's flags, then the controls."""
    flags = method_flags(method)

    def run(**values: Any) -> None:
        controls = {name: values[name] for name in CONTROLS}
        resolved = resolve_for(method.name, values["recipe"], values["set_"], flag_values(flags, values))
        start_training(method.name, resolved, **controls)

    parameters = [inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RecipeOpt),
                  inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt)]
    parameters += [inspect.Parameter(flag.parameter, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=_option(flag)) for flag in flags]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=CONTROL_DEFAULTS.get(name),
                                     annotation=annotation) for name, annotation in CONTROLS.items()]
    run.__signature__ = inspect.Signature(parameters)  # what typer reads the options from
    run.__annotations__ = {p.name: p.annotation for p in parameters}  # what `command` escapes the help texts of
    run.__name__ = run.__qualname__ = method.name
    command(method.name, help=method.summary)(run)


for _method in METHODS.values():
    training_command(_method)

"""The training commands, one per method of the registry (training/methods.py): each parses its flags and
hands the resolved config to `start_training`, which is the same for every method (checks, dry run,
`--launch`, or training through the method's runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config.layering import Resolved, config_to_yaml
from ..config.rl import reward_function_specs
from ..errors import UserError
from ..training.methods import METHODS, check_command
from .app import (
    AllowDataChangeOpt,
    DatasetOpt,
    DryRunOpt,
    LaunchOpt,
    LearningRateOpt,
    MaxStepsOpt,
    ModelOpt,
    NumProcessesOpt,
    OutputDirOpt,
    OverwriteOpt,
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


def training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) -> dict[str, tuple[str, Any]]:
    """The config keys the flags every training command shares set: {key: (flag, value)} (None: not given)."""
    return {
        "model.name_or_path": ("--model", model),
        "data.dataset": ("--dataset", dataset),
        "output.dir": ("--output-dir", output_dir),
        "training.max_steps": ("--max-steps", max_steps),
        "training.learning_rate": ("--learning-rate", learning_rate),
        "output.overwrite": ("--overwrite", overwrite),
    }


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


@command(help=METHODS["sft"].summary)
def sft(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    max_steps: MaxStepsOpt = None,
    learning_rate: LearningRateOpt = None,
    max_length: Annotated[Optional[int], typer.Option(help="data.max_length")] = None,
    overwrite: OverwriteOpt = None,
    resume: ResumeOpt = False,
    resume_from: ResumeFromOpt = None,
    allow_data_change: AllowDataChangeOpt = False,
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) | {
        "data.max_length": ("--max-length", max_length)}
    start_training("sft", resolve_for("sft", recipe, set_, flags), launch=launch, num_processes=num_processes,
                   resume=resume, resume_from=resume_from, dry_run=dry_run, recipe_label=recipe_label,
                   allow_data_change=allow_data_change)


@command(help=METHODS["distill"].summary)
def distill(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="teacher.name_or_path: hub id or local "
                                                   "folder of a larger model of the same family.")] = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    max_steps: MaxStepsOpt = None,
    learning_rate: LearningRateOpt = None,
    overwrite: OverwriteOpt = None,
    resume: ResumeOpt = False,
    resume_from: ResumeFromOpt = None,
    allow_data_change: AllowDataChangeOpt = False,
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) | {
        "teacher.name_or_path": ("--teacher", teacher)}
    start_training("distill", resolve_for("distill", recipe, set_, flags), launch=launch,
                   num_processes=num_processes, resume=resume, resume_from=resume_from, dry_run=dry_run,
                   recipe_label=recipe_label, allow_data_change=allow_data_change)


@command(help=METHODS["dpo"].summary)
def dpo(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    max_steps: MaxStepsOpt = None,
    learning_rate: LearningRateOpt = None,
    loss_type: Annotated[Optional[str], typer.Option("--loss-type", help="dpo.loss_type: sigmoid (DPO), ipo, hinge, "
                                                     "robust, apo_zero, kto, ... (comma-separated to combine)")] = None,
    beta: Annotated[Optional[float], typer.Option(help="dpo.beta: the pull towards the reference.")] = None,
    overwrite: OverwriteOpt = None,
    resume: ResumeOpt = False,
    resume_from: ResumeFromOpt = None,
    allow_data_change: AllowDataChangeOpt = False,
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) | {
        "dpo.loss_type": ("--loss-type", [t.strip() for t in loss_type.split(",")] if loss_type else None),
        "dpo.beta": ("--beta", beta)}
    start_training("dpo", resolve_for("dpo", recipe, set_, flags), launch=launch, num_processes=num_processes,
                   resume=resume, resume_from=resume_from, dry_run=dry_run, recipe_label=recipe_label,
                   allow_data_change=allow_data_change)


@command(help=METHODS["reward"].summary)
def reward(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    max_steps: MaxStepsOpt = None,
    learning_rate: LearningRateOpt = None,
    overwrite: OverwriteOpt = None,
    resume: ResumeOpt = False,
    resume_from: ResumeFromOpt = None,
    allow_data_change: AllowDataChangeOpt = False,
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite)
    start_training("reward", resolve_for("reward", recipe, set_, flags), launch=launch, num_processes=num_processes,
                   resume=resume, resume_from=resume_from, dry_run=dry_run, recipe_label=recipe_label,
                   allow_data_change=allow_data_change)


@command(help=METHODS["rl"].summary)
def rl(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model.name_or_path: the starting policy: a "
                                                 "hub id, a model folder, or a gemma2-tune LoRA run folder (its base "
                                                 "+ adapter: the starting policy and the reference).")] = None,
    reward_function: Annotated[Optional[list[str]], typer.Option(
        "--reward-function", help="rl.reward_functions: PATH.py:NAME[=WEIGHT], TRL's signature f(prompts, "
        "completions, **kwargs) -> list[float]; repeatable.")] = None,
    reward_model: Annotated[Optional[str], typer.Option(
        "--reward-model", help="reward_model.name_or_path: a sequence-classification folder (one output) or hub "
        "id.")] = None,
    algorithm: Annotated[Optional[str], typer.Option(
        "--algorithm", help="rl.algorithm: grpo, dapo, dr_grpo, bnpo, cispo, sapo or rloo.")] = None,
    num_generations: Annotated[Optional[int], typer.Option(
        "--num-generations", help="rl.num_generations: the group size.")] = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    max_steps: MaxStepsOpt = None,
    learning_rate: LearningRateOpt = None,
    overwrite: OverwriteOpt = None,
    resume: ResumeOpt = False,
    resume_from: ResumeFromOpt = None,
    allow_data_change: AllowDataChangeOpt = False,
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) | {
        "rl.reward_functions": ("--reward-function", reward_function_specs(reward_function)),
        "reward_model.name_or_path": ("--reward-model", reward_model),
        "rl.algorithm": ("--algorithm", algorithm),
        "rl.num_generations": ("--num-generations", num_generations)}
    start_training("rl", resolve_for("rl", recipe, set_, flags), launch=launch, num_processes=num_processes,
                   resume=resume, resume_from=resume_from, dry_run=dry_run, recipe_label=recipe_label,
                   allow_data_change=allow_data_change)

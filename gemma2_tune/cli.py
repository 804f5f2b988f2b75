"""The `gemma2-tune` command line. Commands parse their options and delegate; `handled` is the one place
that turns an Outcome (UserError: exit 2, Interrupted: exit 143) into a one-line message and an exit code.

Heavy imports (torch, transformers, trl) happen inside the commands that need them, so `--help`,
`validate`, `recipes`, `config` and `sft --dry-run` answer at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from . import __version__
from .config.layering import Resolved, config_to_yaml, resolve, schema_for
from .config.recipes import bundled_recipes, recipe_summary
from .config.schema import DataSection, RunConfig
from .errors import ConfigError, Interrupted, Outcome, UserError

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
                    schema: type[RunConfig] = RunConfig) -> Resolved:
    """Resolve and print the warnings (errors raise ConfigError)."""
    resolved = resolve(recipe, sets, flags, schema)
    for w in resolved.warnings:
        warn(w)
    return resolved


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


def start_training(command_name: str, resolved: Resolved, *, launch: str | None, num_processes: int | None,
                   resume: bool, resume_from: str | None, dry_run: bool, recipe_label: str | None,
                   train: Callable[[RunConfig, Path | str | None], None]) -> None:
    """What every training command does with its resolved config: check, then dry run, launch N processes
    (each rank re-enters `command_name` with the resolved config), or train in this process."""
    from .training.describe import run_lines

    cfg = resolved.config
    if num_processes is not None and not launch:
        raise UserError(f"--num-processes needs --launch (or use: accelerate launch --num_processes N -m gemma2_tune "
                        f"{command_name} ...)")
    if resume and resume_from:
        raise UserError("--resume and --resume-from: give one")
    if launch or dry_run:  # before any process starts
        from .training.manifest import check_inputs_outside, check_output_dir

        check_inputs_outside(cfg)
        if not (resume or resume_from):
            check_output_dir(Path(cfg.output.dir), cfg.output.overwrite)
    if launch:
        from .training.launch import check_launch, run_launch

        path, how = check_launch(cfg, launch, num_processes)
        extra = ["--recipe-label", str(resolved.recipe or "flags")]
        extra += ["--resume"] if resume else []
        extra += ["--resume-from", resume_from] if resume_from else []
        if dry_run:
            echo(f"# would launch: {how.describe()} with {path}")
        else:
            raise typer.Exit(run_launch(command_name, path, how, config_to_yaml(cfg), extra, echo=echo))
    if dry_run:
        echo("# resolved config\n" + config_to_yaml(cfg))
        echo("# plan (dry run: nothing is loaded or trained)")
        for line in run_lines(cfg):
            echo(line)
        return
    if is_main_rank():
        for line in run_lines(cfg):
            echo(line)
    train(cfg, recipe_label or resolved.recipe)


@command()
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
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    """Supervised fine-tuning (QLoRA by default) on a chat dataset."""
    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) | {
        "data.max_length": ("--max-length", max_length)}

    def train(cfg: RunConfig, label) -> None:
        from .training.sft import run_sft

        run_sft(cfg, echo=echo, recipe=label, resume=resume, resume_from=resume_from)

    start_training("sft", resolved_config(recipe, set_, flags), launch=launch, num_processes=num_processes,
                   resume=resume, resume_from=resume_from, dry_run=dry_run, recipe_label=recipe_label, train=train)


@command()
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
    launch: LaunchOpt = None,
    num_processes: NumProcessesOpt = None,
    dry_run: DryRunOpt = False,
    recipe_label: RecipeLabelOpt = None,
) -> None:
    """On-policy distillation: the student writes answers to the prompts and learns the teacher's distribution."""
    from .config.schema import DistillConfig

    flags = training_flags(model, dataset, output_dir, max_steps, learning_rate, overwrite) | {
        "teacher.name_or_path": ("--teacher", teacher)}

    def train(cfg: DistillConfig, label) -> None:
        from .training.distill import run_distill

        run_distill(cfg, echo=echo, recipe=label, resume=resume, resume_from=resume_from)

    start_training("distill", resolved_config(recipe, set_, flags, DistillConfig), launch=launch,
                   num_processes=num_processes, resume=resume, resume_from=resume_from, dry_run=dry_run,
                   recipe_label=recipe_label, train=train)


@command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML to check (path or bundled name).")],
    set_: SetOpt = None,
    launch: Annotated[Optional[str], typer.Option("--launch", help="Also check against this accelerate config "
                                                  "(e.g. zero3): the recipe/launch rules applied before a launch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Check a recipe without loading anything (no torch, no download). Exit 2 when invalid."""
    from .training.describe import run_lines

    try:
        resolved = resolve(recipe, set_, schema=schema_for(recipe, set_))
        if launch:
            from .training.launch import find_launch_config, launch_problems, read_launch_config

            problems = launch_problems(resolved.config, read_launch_config(find_launch_config(launch)))
            if problems:
                raise ConfigError(problems)
    except ConfigError as exc:
        if not as_json:
            raise
        typer.echo(json.dumps({"valid": False, "recipe": recipe, "errors": exc.problems, "warnings": []}, indent=2))
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(json.dumps({"valid": True, "recipe": str(resolved.recipe), "errors": [],
                               "warnings": resolved.warnings, "config": resolved.config.model_dump(mode="json")}, indent=2))
        return
    for w in resolved.warnings:
        warn(w)
    echo(f"ok: {resolved.recipe}")
    for line in run_lines(resolved.config):
        echo(f"  {line}")


@command()
def preview(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    n: Annotated[int, typer.Option("-n", help="Rows to show.", min=1)] = 3,
) -> None:
    """Show rows as they will be trained: Gemma turns with the supervised tokens between ⟦ ⟧ (for a distill
    recipe: the prompts as the student will see them)."""
    cfg = resolved_config(recipe, set_, {"model.name_or_path": ("--model", model),
                                         "data.dataset": ("--dataset", dataset)}, schema_for(recipe, set_)).config
    from .data.preview import preview as rows_preview
    from .data.preview import preview_prompts
    from .data.template import use_run_template
    from .models.loading import checkpoint_family, load_tokenizer

    family, _ = checkpoint_family(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    use_run_template(tokenizer, family, cfg.data.system_policy, cfg.data.unsupported_fields)
    distill = getattr(cfg, "distill", None)
    shown = (preview_prompts(cfg.data, tokenizer, family, n, distill.max_completion_length) if distill is not None
             else rows_preview(cfg.data, tokenizer, family, n))
    for heading, text in shown:
        if heading == "summary":
            echo(text)
        else:
            typer.secho(heading, bold=True)
            echo(text)


def _load_in(value: str) -> str:
    from .after.inference import LOAD_IN

    if value not in LOAD_IN:
        raise UserError(f"--load-in {value}: use {', '.join(LOAD_IN)}")
    return value


@command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One-shot: print only the answer and exit.")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system message (handled by the run's system policy).")] = None,
    load_in: LoadInOpt = "auto",
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
) -> None:
    """Talk to a fine-tuned model (base from the run unless --model). Interactive with history, or one-shot."""
    from .after.chat import describe, interactive, one_shot
    from .after.inference import Sampling, load, read_run

    run = read_run(adapter, model)
    loaded = load(run, _load_in(load_in))
    sampling = Sampling(max_new_tokens, temperature, top_p)
    note = describe(run, loaded, load_in, sampling)
    if system and system.strip() and run.system_policy == "drop":
        warn("--system: the run was trained with data.system_policy 'drop', so the system message is not sent")
    if prompt is not None:
        typer.secho(note, err=True, dim=True)
        echo(one_shot(run, loaded, system, prompt, sampling))
        return
    echo(note + "\n/reset clears the history, /exit (or Ctrl-D) leaves")
    interactive(run, loaded, system, sampling, echo, write=lambda piece: typer.echo(piece, nl=False))


@command()
def merge(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="A gemma2-tune run folder (adapter).")],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder for the merged model.")],
    model: ModelOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: the run's "
                                                 "model.dtype).")] = None,
) -> None:
    """Fold the LoRA adapter into the base (safetensors shards) for TGI, vLLM or transformers, self-checked."""
    from .after.merge import merge as run_merge

    if dtype not in (None, "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype}: use bfloat16, float16 or float32")
    run_merge(adapter, output, model, dtype, echo=echo)


@command("merge-models")
def merge_models_command(
    models: Annotated[list[str], typer.Argument(help="The models to merge: run folders (an adapter is merged into its "
                                                "base first), a run's ema/ folder, merged folders or hub ids.")],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder for the merged model.")],
    method: Annotated[str, typer.Option(help="linear, slerp, ties, dare_ties or task_arithmetic (mergekit).")] = "linear",
    models_flag: Annotated[bool, typer.Option("--models", hidden=True)] = False,  # `--models a b` reads as `a b`
    base: Annotated[Optional[str], typer.Option(help="The initialisation: for ties/dare_ties/task_arithmetic and "
                                                "--liti.")] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="SLERP factor: 0 the first model, 1 the second "
                                               "(default 0.5).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Per-model weights, comma-separated (linear: normalised; "
                                                   "ties/dare/task arithmetic: task-vector scales).")] = None,
    density: Annotated[Optional[float], typer.Option(help="ties/dare_ties: fraction of each task vector kept "
                                                     "(default 0.5).")] = None,
    liti: Annotated[Optional[float], typer.Option(help="Then interpolate towards --base: eta * merged + (1 - eta) * "
                                                  "base (WARP's LITI).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: the inputs' "
                                                 "precision).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random drops.")] = 42,
) -> None:
    """Merge fine-tuned models with mergekit (linear, SLERP, TIES, DARE, task arithmetic), optionally then LITI
    towards the base; the result keeps eager attention, soft-caps and the run's chat template, self-checked."""
    from .after.merge_models import merge_models

    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {weights}: comma-separated numbers, one per model") from None
    merge_models(method, models, output, base, t, parsed, density, liti, dtype, seed, echo=echo)


@command()
def serve(
    target: Annotated[str, typer.Argument(help="A merged folder, a run folder (its adapter is merged for serving) or "
                                          "a run's ema/ folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="GEMMA2_TUNE_API_KEY",
                                                   help="Require 'Authorization: Bearer <key>' (or set "
                                                   "GEMMA2_TUNE_API_KEY).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model id clients use (default: the folder's name).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
) -> None:
    """Serve a tuned model behind an OpenAI-compatible API (/v1/chat/completions, streamed or not; /v1/models),
    on transformers' server, with the run's chat template; stops cleanly on SIGTERM."""
    from .after.serve import serve as run_server

    if dtype not in (None, "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype}: use bfloat16, float16 or float32")
    run_server(target, host, port, api_key, name, dtype, device, echo=echo)


@command()
def export(
    target: Annotated[str, typer.Argument(help="A run folder (its adapter is merged first), a run's ema/ folder, a "
                                          "merged folder or a merge-models output.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The GGUF file to write (FILE.gguf; FILE.export.json "
                                        "and, with --ollama, FILE.Modelfile go beside it).")],
    to: Annotated[str, typer.Option(help="Format: gguf (llama.cpp, Ollama).")] = "gguf",
    quant: Annotated[str, typer.Option(help="llama.cpp type: f16, bf16, f32, q8_0, q4_k_m, q5_k_m, q6_k, ...")] = "f16",
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    ollama: Annotated[bool, typer.Option(help="Also write an Ollama Modelfile (our template, stop at <end_of_turn>).")] = False,
) -> None:
    """Export a tuned model to one GGUF file for llama.cpp and Ollama (pip install 'gemma2-tune[export]'), checked
    (template, stop token, <bos>, soft-caps) and compared with transformers before anything is written."""
    from .after.export import export as run_export

    run_export(target, to=to, quant=quant, output=output, overwrite=overwrite, ollama=ollama, echo=echo)


@command("eval")
def evaluate_command(
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Held-out chats (any supported source).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks, comma-separated (needs lm-eval).")] = None,
    max_length: Annotated[int, typer.Option(help="data.max_length for the held-out rows.")] = 1024,
    max_rows: Annotated[Optional[int], typer.Option(help="Score at most this many rows.")] = None,
    load_in: LoadInOpt = "auto",
    include_path: Annotated[Optional[str], typer.Option(help="Folder of extra lm-eval task YAMLs.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval: examples per task.")] = None,
    compare: Annotated[Optional[list[str]], typer.Option(help="Also score this model on the same rows, in the same "
                                                         "table: a run folder, its ema/, a merged folder or a hub id "
                                                         "(repeatable).")] = None,
    suite: Annotated[Optional[str], typer.Option(help="gemma2-report: the launch post's benchmarks (MMLU, GSM8K, "
                                                 "ARC-c, HellaSwag, Winogrande) with the report's few-shot "
                                                 "settings, beside the published base scores (needs lm-eval).")] = None,
) -> None:
    """Loss/perplexity on model-turn tokens (base vs fine-tuned, and any --compare models), lm-eval tasks, or the
    Gemma 2 report's benchmark table."""
    if not dataset and not tasks and not suite:
        raise UserError("give --dataset (held-out chats), --tasks (lm-eval tasks) and/or --suite gemma2-report")
    if suite is not None:
        from .after.harness import SUITES

        if suite not in SUITES:
            raise UserError(f"--suite {suite}: unknown; available: {', '.join(SUITES)}")
        if tasks:
            raise UserError("--suite and --tasks: choose one (the suite names its own tasks)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1 (leave it out to score every example)")
    if compare and not dataset:
        raise UserError("--compare scores models on held-out chats: give --dataset too")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise UserError(f"--include-path {include_path}: no such folder")
    from .after.inference import load, read_run

    run = read_run(adapter, model)
    if suite:
        from .after.harness import check_suite_data

        check_suite_data(suite, include_path)  # before the model: missing data fails in seconds
    from .after.evaluate import compare_loaders

    others = compare_loaders(compare or [], run, _load_in(load_in), warn)
    loaded = load(run, _load_in(load_in))
    if dataset:
        from .after.evaluate import evaluate

        evaluate(loaded, DataSection(dataset=dataset, max_length=max_length, max_rows=max_rows,
                                     system_policy=run.system_policy), compare_base=True, echo=echo,
                 others=others)
    if tasks:
        from .after.harness import run_tasks

        run_tasks(loaded.model, loaded.tokenizer, [t.strip() for t in tasks.split(",") if t.strip()], include_path,
                  limit, echo=echo)
    if suite:
        from .after.harness import run_suite

        config = loaded.model.config
        size = loaded.family.size_of_shape(config.hidden_size, config.num_hidden_layers) \
            if loaded.family.key == "gemma2" else None
        run_suite(loaded.model, loaded.tokenizer, suite, size, include_path, limit, echo=echo)


@command()
def plan(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    gpu: Annotated[str, typer.Option(help="h100-80gb, a100-40gb, l4-24gb, ... (see the error for the list)")] = "h100-80gb",
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", min=1, help="Processes (GPUs); default: "
                                                         "the --launch config's, else 1.")] = None,
    launch: Annotated[Optional[str], typer.Option("--launch", help="Accelerate config the run will use (e.g. zero3).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="data.max_length")] = None,
) -> None:
    """Estimate per-GPU memory and tokens per step before launching. Exit 0 fits, 1 does not fit."""
    cfg = resolved_config(recipe, set_, {"model.name_or_path": ("--model", model),
                                         "data.max_length": ("--max-length", max_length)},
                          schema_for(recipe, set_)).config
    from .training.plan import report

    lines, ok = report(cfg, gpu, num_processes, launch)
    for line in lines:
        echo(line)
    if not ok:
        raise typer.Exit(1)


@command("build-model")
def build_model(
    name: Annotated[str, typer.Argument(help="A builtin model: gemma-3-270m, tiny-gemma2, tiny-gemma3.")],
) -> None:
    """Build a builtin model's local checkpoint now (it is also built on first use) and print its folder."""
    from .models.builtin import PREFIX, builtin_path

    echo(str(builtin_path(name if name.startswith(PREFIX) else PREFIX + name)))


@app.command("models")
def list_models() -> None:
    """The supported model families and sizes, and the builtin models."""
    from .families import FAMILIES
    from .models.builtin import BUILTINS, PREFIX

    for family in FAMILIES:
        sizes = ", ".join(f"{size} ({shape.total_params / 1e9:.2f}B)" for size, shape in family.shapes.items())
        caps = (f"soft-caps {family.attention_softcap}/{family.final_softcap}" if family.attention_softcap
                else "no soft-caps")
        kernels = ", ".join(k for k, v in family.kernels.items() if v.allowed)
        echo(f"{family.display} (model_type {', '.join(family.model_types)}): {sizes}; {caps}; kernels {kernels}")
    echo("")
    for name, builtin in BUILTINS.items():
        echo(f"{PREFIX + name:24s} {builtin.description}")


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes."""
    for path in bundled_recipes():
        echo(f"{path.stem:32s} {recipe_summary(path)}")
    echo("\nUse one with: gemma2-tune sft --recipe NAME   (or a path to your own YAML)")


@app.command("config")
def config_reference(
    markdown: Annotated[bool, typer.Option("--markdown", help="As the README's Markdown table.")] = False,
) -> None:
    """Every config key with its default and meaning."""
    from .config.reference import markdown as as_markdown
    from .config.reference import plain

    echo(as_markdown() if markdown else plain())


def main() -> None:
    """The console script: the Typer app; Ctrl-C exits 130 without a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)

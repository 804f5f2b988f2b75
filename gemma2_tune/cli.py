"""The `gemma2-tune` command line. Commands parse and delegate; user errors exit 2 with a message.

Heavy imports (torch, transformers, trl) happen inside the commands that train or tokenize, so
`--help`, `validate`, `recipes` and `sft --dry-run` answer at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .config import RunConfig
from .errors import UserError
from .recipes import Resolved, bundled_recipes, config_to_yaml, recipe_summary, resolve

app = typer.Typer(
    name="gemma2-tune",
    help="QLoRA fine-tuning of Gemma 2 on chat data: eager attention (soft-capping kept), Gemma's exact turn "
    "format, loss on model turns only.",
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


def echo(line: str) -> None:
    typer.echo(line)


def warn(line: str) -> None:
    typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)


def is_main_rank() -> bool:
    """Under accelerate every rank runs the CLI; rank 0 speaks for all of them."""
    import os

    return os.environ.get("RANK", "0") == "0"


def fail(exc: UserError) -> None:
    if is_main_rank():
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(exc.exit_code)


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


def plan_lines(cfg: RunConfig) -> list[str]:
    from .data import describe_source

    q, lora, t = cfg.quantization, cfg.lora, cfg.training
    quant = (
        f"4-bit {q.quant_type}{' + double quantization' if q.double_quant else ''}, compute {cfg.compute_dtype}, "
        f"storage {cfg.quant_storage}" if q.load_in_4bit else f"none (weights in {cfg.model.dtype})"
    )
    adapt = (
        f"LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout} on {', '.join(lora.target_modules)}"
        if lora.enabled else "full fine-tuning (all weights)"
    )
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.num_train_epochs:g} epoch(s)"
    return [
        f"model:        {cfg.model.name_or_path} ({cfg.model.dtype}, attention {cfg.model.attn_implementation})",
        f"quantization: {quant}",
        f"adapters:     {adapt}",
        f"data:         {describe_source(cfg.data)}; Gemma turns, system messages '{cfg.data.system_policy}', "
        f"loss on {cfg.data.train_on.replace('_', ' ')}, max {cfg.data.max_length} tokens ({cfg.data.overlong} longer rows)",
        f"training:     {steps}, lr {t.learning_rate:g} ({t.lr_scheduler_type}), {cfg.rows_per_optimizer_step} "
        f"{'packed blocks' if cfg.data.packing else 'rows'} per optimizer step per process "
        f"(batch {t.per_device_train_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps}), gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
        f"output:       {cfg.output.dir}",
    ]


def _resolve(recipe: str | None, sets: list[str] | None, flags: dict[str, tuple[str, Any]] | None = None) -> Resolved:
    resolved = resolve(recipe, sets, flags)
    for w in resolved.warnings:
        warn(w)
    return resolved


@app.command()
def sft(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="output.dir")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="training.max_steps")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="training.learning_rate")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="data.max_length")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a previous run in the output dir.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in the output dir.")] = False,
    resume_from: Annotated[Optional[str], typer.Option("--resume-from", help="Continue from this checkpoint folder.")] = None,
    launch: Annotated[Optional[str], typer.Option("--launch", help="Start N processes with accelerate: a bundled config "
                                                  "(zero3, zero3_offload, multi_gpu, single_gpu) or a path.")] = None,
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", help="Processes for --launch.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and plan; train nothing.")] = False,
    recipe_label: Annotated[Optional[str], typer.Option("--recipe-label", hidden=True)] = None,
) -> None:
    """Supervised fine-tuning (QLoRA by default) on a chat dataset."""
    flags = {
        "model.name_or_path": ("--model", model),
        "data.dataset": ("--dataset", dataset),
        "output.dir": ("--output-dir", output_dir),
        "training.max_steps": ("--max-steps", max_steps),
        "training.learning_rate": ("--learning-rate", learning_rate),
        "data.max_length": ("--max-length", max_length),
        "output.overwrite": ("--overwrite", overwrite),
    }
    try:
        resolved = _resolve(recipe, set_, flags)
        cfg = resolved.config
        if num_processes is not None and not launch:
            raise UserError("--num-processes needs --launch (or use: accelerate launch --num_processes N -m gemma2_tune sft ...)")
        if resume and resume_from:
            raise UserError("--resume and --resume-from: give one")
        if (launch or dry_run) and not (resume or resume_from):  # before any process starts
            from .manifest import check_output_dir

            check_output_dir(Path(cfg.output.dir), cfg.output.overwrite)
        if launch:
            from .launch import check_launch, run_launch

            path, how = check_launch(cfg, launch, num_processes)
            extra = ["--recipe-label", str(resolved.recipe or "flags")]
            extra += ["--resume"] if resume else []
            extra += ["--resume-from", resume_from] if resume_from else []
            if dry_run:
                echo(f"# would launch: {how.describe()} with {path}")
            else:
                raise typer.Exit(run_launch(path, how, config_to_yaml(cfg), extra, echo=echo))
        if dry_run:
            echo("# resolved config\n" + config_to_yaml(cfg))
            echo("# plan (dry run: nothing is loaded or trained)")
            for line in plan_lines(cfg):
                echo(line)
            return
        if is_main_rank():
            for line in plan_lines(cfg):
                echo(line)
        from .train import Interrupted, run_sft

        try:
            run_sft(cfg, echo=echo, recipe=recipe_label or resolved.recipe, resume=resume, resume_from=resume_from)
        except Interrupted as exc:
            typer.secho(exc.message, fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(exc.exit_code) from None
    except UserError as exc:
        fail(exc)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML to check (path or bundled name).")],
    set_: SetOpt = None,
    launch: Annotated[Optional[str], typer.Option("--launch", help="Also check against this accelerate config "
                                                  "(e.g. zero3): the recipe/launch rules applied before a launch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Check a recipe without loading anything (no torch, no download). Exit 2 when invalid."""
    from .errors import ConfigError

    try:
        resolved = resolve(recipe, set_)
        if launch:
            from .launch import find_launch_config, launch_problems, read_launch_config

            problems = launch_problems(resolved.config, read_launch_config(find_launch_config(launch)))
            if problems:
                raise ConfigError(problems)
    except ConfigError as exc:
        if as_json:
            typer.echo(json.dumps({"valid": False, "recipe": recipe, "errors": exc.problems, "warnings": []}, indent=2))
            raise typer.Exit(2)
        fail(exc)
        return
    except UserError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps({"valid": True, "recipe": str(resolved.recipe), "errors": [],
                               "warnings": resolved.warnings, "config": resolved.config.model_dump(mode="json")}, indent=2))
        return
    for w in resolved.warnings:
        warn(w)
    echo(f"ok: {resolved.recipe}")
    for line in plan_lines(resolved.config):
        echo(f"  {line}")


@app.command()
def preview(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    n: Annotated[int, typer.Option("-n", help="Rows to show.", min=1)] = 3,
) -> None:
    """Show rows as they will be trained: Gemma turns with the supervised tokens between ⟦ ⟧."""
    try:
        cfg = _resolve(recipe, set_, {"model.name_or_path": ("--model", model), "data.dataset": ("--dataset", dataset)}).config
        from .chat import BadRow, normalise
        from .data import load_rows, row_to_messages
        from .examples import TurnTokenizer, build_examples, mark_supervised
        from .modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        rows, source = load_rows(cfg.data)
        _, report = build_examples(rows, tokenizer, cfg.data)
        encoder = TurnTokenizer(tokenizer)
        shown = 0
        for row in rows:
            if shown >= n:
                break
            try:
                encoded = encoder.encode(normalise(row_to_messages(row.data), cfg.data.system_policy), cfg.data.train_on)
            except BadRow:
                continue
            shown += 1
            kept = min(len(encoded.ids), cfg.data.max_length)
            supervised = sum(encoded.mask[1:kept])
            over = f" (longer than data.max_length: {cfg.data.overlong})" if len(encoded.ids) > kept else ""
            typer.secho(f"── {row.where}: {kept} tokens, {supervised} supervised{over}", bold=True)
            echo(mark_supervised(encoded, cfg.data.max_length))
        echo(f"── {source.name}: " + "\n".join(report.summary_lines()))
    except UserError as exc:
        fail(exc)


AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", "-a", help="A gemma2-tune run folder (adapter).")]
LoadInOpt = Annotated[str, typer.Option("--load-in", help="bf16, 8bit or 4bit.")]


def _load_in(value: str) -> str:
    if value not in ("bf16", "8bit", "4bit"):
        raise UserError(f"--load-in {value}: use bf16, 8bit or 4bit")
    return value


@app.command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One-shot: print only the answer and exit.")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system message (handled by the run's system policy).")] = None,
    load_in: LoadInOpt = "bf16",
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
) -> None:
    """Talk to a fine-tuned model (base from the run unless --model). Interactive with history, or one-shot."""
    try:
        from .inference import Sampling, load, read_run, reply

        run = read_run(adapter, model)
        llm, tokenizer = load(run, _load_in(load_in))
        sampling = Sampling(max_new_tokens, temperature, top_p)
        history = [{"role": "system", "content": system}] if system else []
        note = (f"{run.base_model}{' + ' + str(run.path) if run.is_adapter else ''}, {load_in}, eager attention "
                f"(soft-capping on), system policy '{run.system_policy}', "
                + ("greedy" if temperature == 0 else f"temperature {temperature}, top_p {top_p}"))
        if prompt is not None:
            typer.secho(note, err=True, dim=True)
            echo(reply(llm, tokenizer, history + [{"role": "user", "content": prompt}], run.system_policy, sampling))
            return
        echo(note + "\n/reset clears the history, /exit (or Ctrl-D) leaves")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                echo("")
                return
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                history = history[:1] if system else []
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            typer.echo("model> ", nl=False)
            answer = reply(llm, tokenizer, history, run.system_policy, sampling,
                           on_text=lambda piece: typer.echo(piece, nl=False))
            typer.echo("")
            history.append({"role": "assistant", "content": answer or "…"})
    except UserError as exc:
        fail(exc)


@app.command()
def merge(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="A gemma2-tune run folder (adapter).")],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder for the merged model.")],
    model: ModelOpt = None,
) -> None:
    """Fold the LoRA adapter into the base (bf16 safetensors shards) for TGI, vLLM or transformers."""
    try:
        from .merge import merge as run_merge

        run_merge(adapter, output, model, echo=echo)
    except UserError as exc:
        fail(exc)


@app.command("eval")
def evaluate_command(
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Held-out chats (any supported source).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks, comma-separated (needs lm-eval).")] = None,
    max_length: Annotated[int, typer.Option(help="data.max_length for the held-out rows.")] = 1024,
    max_rows: Annotated[Optional[int], typer.Option(help="Score at most this many rows.")] = None,
    load_in: LoadInOpt = "bf16",
    include_path: Annotated[Optional[str], typer.Option(help="Folder of extra lm-eval task YAMLs.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval: examples per task.")] = None,
) -> None:
    """Loss/perplexity on model-turn tokens (base vs fine-tuned), or lm-eval benchmark tasks."""
    try:
        if not dataset and not tasks:
            raise UserError("give --dataset (held-out chats) and/or --tasks (lm-eval tasks)")
        from .config import DataSection
        from .inference import load, read_run

        run = read_run(adapter, model)
        llm, tokenizer = load(run, _load_in(load_in))
        if dataset:
            from .evaluate import evaluate

            evaluate(llm, tokenizer, DataSection(dataset=dataset, max_length=max_length, max_rows=max_rows,
                                                 system_policy=run.system_policy), compare_base=True, echo=echo)
        if tasks:
            from .harness import run_tasks

            run_tasks(llm, tokenizer, [t.strip() for t in tasks.split(",") if t.strip()], include_path, limit, echo=echo)
    except UserError as exc:
        fail(exc)


@app.command()
def plan(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    gpu: Annotated[str, typer.Option(help="h100-80gb, a100-40gb, l4-24gb, ... (see the error for the list)")] = "h100-80gb",
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Processes (GPUs).")] = 1,
    launch: Annotated[Optional[str], typer.Option("--launch", help="Accelerate config the run will use (e.g. zero3).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="data.max_length")] = None,
) -> None:
    """Estimate per-GPU memory and tokens per step before launching. Exit 0 fits, 1 does not fit."""
    try:
        cfg = _resolve(recipe, set_, {"model.name_or_path": ("--model", model),
                                      "data.max_length": ("--max-length", max_length)}).config
        from .plan import report

        lines, ok = report(cfg, gpu, num_processes, launch)
    except UserError as exc:
        fail(exc)
        return
    for line in lines:
        echo(line)
    if not ok:
        raise typer.Exit(1)


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
    from .reference import markdown as as_markdown, plain

    echo(as_markdown() if markdown else plain())


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)

"""The commands that look before training: validate, preview, plan, and the lists (models, recipes, config,
build-model). None of them trains; validate, plan, recipes and config answer without importing torch."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..config.layering import resolve
from ..config.recipes import bundled_recipes, recipe_summary
from ..errors import ConfigError, UserError
from ..config.methods import schema_for
from ..training.methods import METHODS
from .app import ModelOpt, DatasetOpt, RecipeOpt, SetOpt, app, command, echo, resolved_config, warn

@command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML to check (path or bundled name).")],
    set_: SetOpt = None,
    launch: Annotated[Optional[str], typer.Option("--launch", help="Also check against this accelerate config "
                                                  "(e.g. zero3): the recipe/launch rules applied before a launch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Check a recipe without loading anything (no torch, no download). Exit 2 when invalid."""
    from ..training.describe import run_lines

    try:
        resolved = resolve(recipe, set_, schema=schema_for(recipe, set_))
        if launch:
            from ..training.launch import find_launch_config, launch_problems, read_launch_config

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
    recipe: the prompts as the student will see them; for dpo and reward: each pair's prompt, then both answers'
    supervised tokens). Without a recipe or --set naming the method, preference pairs in --dataset are shown as
    `dpo` trains them."""
    schema = schema_for(recipe, set_)
    if dataset and schema is not schema_for(recipe, set_, default="dpo"):  # nothing names the method
        from ..config.schema import DataSection
        from ..data.preferences import rows_kind
        from ..data.sources import load_rows

        kind = rows_kind(load_rows(DataSection(dataset=dataset))[0])
        if kind == "paired":
            set_ = [*(set_ or []), "method=dpo"]
            echo(f"{dataset}: preference pairs (chosen/rejected), shown as `dpo` trains them (--set method=reward: as "
                 "a reward model reads them)")
        elif kind == "unpaired":
            set_ = [*(set_ or []), "method=dpo", "dpo.loss_type=kto"]
            echo(f"{dataset}: unpaired examples (prompt/completion/label), shown as `dpo` trains them with "
                 "dpo.loss_type=kto (KTO)")
        schema = schema_for(recipe, set_)
    cfg = resolved_config(recipe, set_, {"model.name_or_path": ("--model", model),
                                         "data.dataset": ("--dataset", dataset)}, schema).config
    from ..data.gemma4 import writes_empty_thought
    from ..data.preview import preview as rows_preview
    from ..data.preview import preview_preferences, preview_prompts
    from ..data.template import use_run_template
    from ..models.loading import checkpoint_family, load_tokenizer
    from ..rewards import column_problems, load_reward_function

    family, _ = checkpoint_family(cfg.base_model, cfg.model.revision, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.base_model, cfg.model.revision, cfg.model.trust_remote_code, family)
    empty_thought = writes_empty_thought(family, cfg.base_model)
    use_run_template(tokenizer, family, cfg.data.system_policy, cfg.data.unsupported_fields,
                     empty_thought=empty_thought)
    if cfg.data_kind == "prompts":
        functions = [load_reward_function(f, f"rl.reward_functions[{i}]") for i, f in enumerate(cfg.reward_functions())]
        if functions:  # what their parameters ask of the rows: said before the prompts
            from ..data.prompts import row_columns
            from ..data.sources import load_rows

            for problem in column_problems(functions, [row_columns(row.data) for row in load_rows(cfg.data)[0]]):
                warn(problem)
        shown = preview_prompts(cfg.data, tokenizer, family, n, cfg.generation_length, cfg.completion_writer,
                                columns_used=bool(functions), empty_thought=empty_thought)
    elif cfg.data_kind == "preference pairs":
        shown = preview_preferences(cfg.data, tokenizer, family, n, cfg.preference_kind, empty_thought=empty_thought)
    else:
        from ..models.loading import load_image_processing

        images = load_image_processing(cfg.base_model, family, tokenizer, pan_and_scan=cfg.data.pan_and_scan,
                                       revision=cfg.model.revision)
        shown = rows_preview(cfg.data, tokenizer, family, n, empty_thought=empty_thought, images=images)
    for heading, text in shown:
        if heading == "summary":
            echo(text)
        else:
            typer.secho(heading, bold=True)
            echo(text)


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
    from ..training.plan import report

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
    from ..models.builtin import PREFIX, builtin_path

    echo(str(builtin_path(name if name.startswith(PREFIX) else PREFIX + name)))


@app.command("models")
def list_models() -> None:
    """The supported model families and sizes, and the builtin models."""
    from ..families import FAMILIES
    from ..models.builtin import BUILTINS, PREFIX

    for family in FAMILIES:
        sizes = ", ".join(f"{size} ({shape.total_params / 1e9:.2f}B)" for size, shape in family.shapes.items())
        caps = (f"soft-caps {family.attention_softcap}/{family.final_softcap}" if family.attention_softcap
                else f"final soft-cap {family.final_softcap}" if family.final_softcap else "no soft-caps")
        kernels = ", ".join(k for k, v in family.kernels.items() if v.allowed)
        towers = f"; towers {', '.join(t.rsplit('.', 1)[-1] for t in family.towers)} (frozen)" if family.towers else ""
        echo(f"{family.display} (model_type {', '.join(family.model_types)}): {sizes}; {caps}; kernels {kernels}"
             + towers)
    echo("")
    for name, builtin in BUILTINS.items():
        echo(f"{PREFIX + name:24s} {builtin.description}")


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes."""
    for path in bundled_recipes():
        echo(f"{path.stem:32s} {recipe_summary(path)}")
    echo("\nUse one with: gemma2-tune sft --recipe NAME   (or a path to your own YAML)")


@command("config")
def config_reference(
    markdown: Annotated[bool, typer.Option("--markdown", help="As the README's Markdown table.")] = False,
    method: Annotated[Optional[str], typer.Option("--method", help="Only this training method's keys "
                                                  f"({', '.join(METHODS)}).")] = None,
) -> None:
    """Every config key with its default and meaning (every method's, or one method's with --method)."""
    from ..config.reference import markdown as as_markdown
    from ..config.reference import plain

    if method is not None and method not in METHODS:
        raise UserError(f"--method {method}: not a training method (methods: {', '.join(METHODS)})")
    schemas = [METHODS[method].schema] if method else None
    echo(as_markdown(schemas) if markdown else plain(schemas))

"""Rules between config fields, checked once when a config is resolved (and by `validate`, without torch).

Facts about the model come from its family (`gemma2_tune.families`): the family a local checkpoint's
config.json names, or the one its hub id implies. When neither says (an unfamiliar hub id), the
model-dependent rules run again when its config loads, before any weights do.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from pydantic import BaseModel

from ..families import (
    FAMILIES,
    GEMMA2,
    Family,
    family_of_checkpoint,
    local_model_type,
    refused_name,
    supported_summary,
    unsupported_message,
)
from .runs import AdapterRun, adapter_folder, adapter_run, missing_folder, saved_weights, unfinished_run
from .schema import RunConfig


def checkpoint_size(family: Family, name_or_path: str) -> str | None:
    """The published size of a checkpoint: from a local config.json's shape, else from its name."""
    try:
        data = json.loads((Path(name_or_path).expanduser() / "config.json").read_text())
        data = data.get("text_config") or data  # a multimodal checkpoint: its decoder's shape
        return family.size_of_shape(data["hidden_size"], data["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return family.size_from_name(name_or_path)


def local_path_problem(name: str, key: str = "model") -> str | None:
    """A model name that can't be a checkpoint: empty, a local path that doesn't exist, or a LoRA adapter run
    (which needs merging into its base before it can be a base or a teacher)."""
    if not name.strip():
        return f"{key}.name_or_path: empty"
    missing = missing_folder(name)
    if missing:
        return f"{key}.name_or_path: {name}: {missing}"
    unfinished = unfinished_run(name)
    if unfinished:
        return f"{key}.name_or_path: {unfinished}"
    if adapter_folder(name) and not (Path(name).expanduser() / "adapter_model.safetensors").is_file():
        return f"{key}.name_or_path: {name}: adapter_config.json without adapter_model.safetensors (no weights)"
    if adapter_folder(name):
        return (f"{key}.name_or_path: '{name}' is a LoRA adapter (adapter_config.json, no config.json), not a whole "
                f"model: merge it first (gemma2-tune merge --adapter {name} --output merged/NAME) and use that folder "
                f"(dpo, reward and rl take such a run as it is: --model {name})")
    return None


def sequence_classifier(architectures: list[str] | None) -> bool:
    """Whether a config.json's `architectures` name sequence classifiers only (e.g. Gemma2ForSequenceClassification:
    one score per sequence, no LM head)."""
    return bool(architectures) and all(a.endswith("ForSequenceClassification") for a in architectures)


def reward_model_kind(name: str) -> str | None:
    """What the local folder `name` is when it holds a reward model: "a `gemma2-tune reward` run (a
    sequence-classification LoRA adapter)" or "a sequence classifier (ARCHITECTURE)"; None for anything else (a
    causal LM, an adapter of one, a hub id, no such folder). From adapter_config.json's task_type, else config.json's
    architectures; no weights are read."""
    path = Path(name).expanduser()
    try:
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            if json.loads((path / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
                return "a `gemma2-tune reward` run (a sequence-classification LoRA adapter)"
            return None
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return f"a sequence classifier ({architectures[0]})" if sequence_classifier(architectures) else None


def reward_model_refusal(key: str, name: str, kind: str) -> str:
    """The message for a reward model given where a model that generates text is needed."""
    return (f"{key}: {name} is a reward model, {kind}: it gives one score per answer and does not generate text. "
            "Give a causal LM here (a Gemma checkpoint, or an sft, distill, dpo or rl run); reward models are used "
            "by `rl --reward-model` and `eval --reward-model`")


def reward_base_problem(name: str, family: Family | None = None) -> str | None:
    """Why a reward model (a score head on the decoder) cannot be trained on checkpoint `name` (None: it can): an
    image + text checkpoint (its family has towers: Gemma 3 4B-27B, Gemma 4), whose class has no score head here.
    `family`: the checkpoint's, when already read (else from its config.json or name)."""
    family = family or family_of_checkpoint(name)
    if family is None or not family.towers:
        return None
    return (f"'{name}' is an image + text {family.display} checkpoint: reward models (a score head on the decoder) "
            "are trained on text-only Gemma checkpoints here (Gemma 2, Gemma 3 270M/1B)")


def generating_model_problem(name: str, key: str) -> str | None:
    """reward_model_refusal when the local folder `name` holds a reward model (reward_model_kind), else None."""
    kind = reward_model_kind(name)
    return None if kind is None else reward_model_refusal(key, name, kind)


def model_problems(name: str, kernel: str, dtype: str, key: str = "model") -> tuple[list[str], list[str]]:
    """What the model's family says about this kernel and dtype: (errors, warnings), naming `key`.name_or_path
    and `key`.attn_implementation (model.* or teacher.*; the dtype is always model.dtype)."""
    errors, warnings = _model_problems(name, kernel, dtype)
    if key == "model":
        return errors, warnings

    def rename(line: str) -> str:
        for field in ("name_or_path", "attn_implementation"):
            line = line.replace(f"model.{field}", f"{key}.{field}")
        return line.replace("model.dtype:", f"model.dtype (the {key}):")

    return [rename(e) for e in errors], [rename(w) for w in warnings]


def _model_problems(name: str, kernel: str, dtype: str) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    problem = local_path_problem(name)
    if problem:
        return [problem], []
    model_type = local_model_type(name)
    family = family_of_checkpoint(name)
    if model_type is not None and family is None:
        return [unsupported_message(name, model_type)], []
    if family is None:
        refused = refused_name(name)
        if refused:
            return [f"model.name_or_path: '{name}' is {refused}; gemma2-tune trains {supported_summary()} "
                    "checkpoints"], []
        warnings.append(f"model.name_or_path: '{name}' doesn't name a supported family ({supported_summary()}); "
                        "its config.json is checked when it loads, before any weights")
        if kernel != "eager":
            warnings.append(f"model.attn_implementation: '{kernel}' is exact only for some families "
                            f"({kernel_summary(kernel)}); '{name}' doesn't say which it is: checked when its config loads")
        return errors, warnings
    size = checkpoint_size(family, name)
    problem = family.kernel_problem(kernel)
    if problem:
        errors.append(problem)
    if dtype == "float16":
        if size in family.fp16_refused_sizes:
            errors.append(f"model.dtype: float16 is unstable for {family.display} {size.upper()}; use bfloat16")
        else:
            warnings.append(f"model.dtype: {family.fp16_note}")
    return errors, warnings


def kernel_summary(kernel: str) -> str:
    """'allowed for Gemma 3 text, refused for Gemma 2': one kernel across the families."""
    allowed = [f.display for f in FAMILIES if kernel in f.kernels and f.kernels[kernel].allowed]
    refused = [f.display for f in FAMILIES if kernel in f.kernels and not f.kernels[kernel].allowed]
    parts = ([f"allowed for {', '.join(allowed)}"] if allowed else []) + (
        [f"refused for {', '.join(refused)}"] if refused else [])
    return "; ".join(parts) or "unknown"


def run_problems(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Rules of a training run's config. Returns (errors, warnings), each naming the key(s) involved."""
    m, q, lora = cfg.model, cfg.quantization, cfg.lora
    problem = generating_model_problem(m.name_or_path, "model.name_or_path") if cfg.head == "causal-lm" else None
    errors, warnings = ([problem], []) if problem else model_problems(m.name_or_path, m.attn_implementation, m.dtype)
    family = family_of_checkpoint(m.name_or_path) or GEMMA2  # module names are the same in both families

    if cfg.data.enable_thinking and family_of_checkpoint(m.name_or_path) and family.turn_format != "gemma4":
        errors.append(f"data.enable_thinking: {family.display} has no thinking mode (Gemma 4 has)")
    known = family_of_checkpoint(m.name_or_path)
    if known is not None and known.liger_patch is None and getattr(cfg.training, "use_liger_kernel", False):
        errors.append(f"training.use_liger_kernel: Liger has no kernels for {known.display} (no "
                      "liger_kernel.transformers patch for it); leave it off")
    errors += image_problems(cfg, family_of_checkpoint(m.name_or_path))
    if q.load_in_4bit and not lora.enabled:
        errors.append(
            "quantization.load_in_4bit with lora.enabled=false: 4-bit weights can't be trained directly; "
            "enable LoRA (QLoRA) or set quantization.load_in_4bit=false for full fine-tuning"
        )
    if cfg.data.eval_fraction and cfg.data.eval_split:
        errors.append("data.eval_fraction and data.eval_split: choose one source of held-out rows")
    if not q.load_in_4bit and (q.compute_dtype or q.quant_storage):
        errors.append("quantization.compute_dtype/quant_storage are set but quantization.load_in_4bit is false")
    if lora.enabled:
        if not lora.target_modules:
            errors.append(f"lora.target_modules: empty; the reference is [{', '.join(family.attention_modules)}]")
        mlp = sorted(set(lora.target_modules) & set(family.mlp_modules))
        if mlp:
            warnings.append(
                f"lora.target_modules: {mlp} are MLP projections; the Gemma 2 reference adapts attention only"
            )
        if len(set(lora.target_modules)) != len(lora.target_modules):
            errors.append(f"lora.target_modules: duplicates in {lora.target_modules}")
        errors += lora_target_problems(lora.target_modules, family)
    return errors, warnings


def image_problems(cfg: RunConfig, family: Family | None) -> list[str]:
    """The image keys against the checkpoint's family (None: unknown from the name; checked again once its
    config.json is read, data/images.py): model.train_projector needs a family that takes images, data.pan_and_scan
    Gemma 3's processor."""
    errors = []
    if cfg.model.train_projector and family is not None and family.images is None:
        errors.append(f"model.train_projector: {family.display} has no image projector (a text checkpoint)")
    if getattr(cfg.data, "pan_and_scan", False) and family is not None and (
            family.images is None or family.images.processor_class != "Gemma3Processor"):
        errors.append(f"data.pan_and_scan: {family.display}'s processor has no pan-and-scan "
                      + ("(a text checkpoint)" if family.images is None else
                         "(it resizes each image keeping its aspect ratio instead)") + "; it is Gemma 3's")
    return errors


TIED = ("lm_head", "embed_tokens")
MIN_PROMPT_TOKENS = 8  # <bos>, a turn header, a word or two, the generation prompt


def lora_target_problems(targets: list[str], family: Family) -> list[str]:
    """Targets that are not the family's linear projections (with a did-you-mean), and the tied
    embedding/output matrix, which is refused with the reason."""
    problems = []
    tied = sorted(set(targets) & set(TIED))
    if tied:
        problems.append(
            f"lora.target_modules: {tied}: {family.display} ties lm_head to embed_tokens (one vocabulary x hidden "
            "matrix); LoRA there would need PEFT's embedding adapters and untying the weights, which gemma2-tune does "
            f"not support; adapt the projections ({', '.join(family.lora_modules)})")
    for name in targets:
        if name in TIED or name in family.lora_modules:
            continue
        hint = difflib.get_close_matches(name, family.lora_modules, n=1)
        problems.append(f"lora.target_modules: '{name}' is not a module of {family.display} (its projections: "
                        f"{', '.join(family.lora_modules)})" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    return problems


def start_problems(cfg: RunConfig, start: AdapterRun, key: str = "model.name_or_path") -> list[str]:
    """A run that continues `start` needs its adapter's weights (`key` names the folder), and with LoRA trains that
    adapter further: lora.r/alpha/target_modules must be the adapter's (they are taken from it when not given;
    full fine-tuning merges the adapter into the weights)."""
    if saved_weights(Path(start.folder).expanduser()) != "adapter":
        return [f"{key}: {start.folder}: adapter_config.json without adapter_model.safetensors (no weights)"]
    wanted = (cfg.lora.r, cfg.lora.alpha, sorted(cfg.lora.target_modules))
    if not cfg.lora.enabled or start.shape == wanted:
        return []
    saved = start.shape
    return [f"lora.r/alpha/target_modules are {wanted[0]}/{wanted[1]}/{wanted[2]} but the adapter of {start.folder} "
            f"has {saved[0]}/{saved[1]}/{saved[2]}: a run started from it trains that adapter further; leave them "
            "unset (they are taken from it) or set them to its values"]


def continued_run_problems(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """run_problems for a method whose model.name_or_path may be a run with a LoRA adapter (cfg.continues_runs):
    the rules on the base of the run it continues, and its adapter (start_problems)."""
    try:
        start = adapter_run(cfg.model.name_or_path)
    except ValueError as exc:
        return [f"model.name_or_path: {exc}"], []
    if start is None:
        return run_problems(cfg)
    errors, warnings = run_problems(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"name_or_path": start.base})}))
    return errors + start_problems(cfg, start), warnings


def config_problems(config: BaseModel) -> tuple[list[str], list[str]]:
    """The rules of a method's schema (its `problems()`): (errors, warnings)."""
    problems = getattr(config, "problems", None)
    return problems() if callable(problems) else ([], [])

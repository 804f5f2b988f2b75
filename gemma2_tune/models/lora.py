"""LoRA: the PEFT config a run asks for, and where the adapters actually landed after wrapping."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..config.runs import AdapterRun
    from ..config.schema import RunConfig
    from .checks import ModelReport


def lora_config(cfg: RunConfig, model=None):
    """peft.LoraConfig from lora.* (None for full fine-tuning). Targets are set explicitly: PEFT's own
    default for Gemma is q/v only; with `model`, they are aimed at its decoder only (`lora_targets`)."""
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    targets = list(cfg.lora.target_modules)
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(model, targets) if model is not None else targets,
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
        # model.train_projector: the image projector trains whole beside the adapters, and is saved with them
        modules_to_save=[projector_name(model)] if cfg.model.train_projector and model is not None else None,
    )


def projector_name(model) -> str:
    """The image projector's module name as PEFT's modules_to_save matches it (its last component:
    "multi_modal_projector" for Gemma 3, "embed_vision" for Gemma 4). Raises UserError for a model without one."""
    from ..families import family_of_model_type

    family = family_of_model_type(getattr(base_model(model).config, "model_type", ""))
    if family is None or family.images is None:
        raise UserError("model.train_projector: this checkpoint has no image projector (a text model)")
    return family.images.projector.rsplit(".", 1)[-1]


def decoder_prefix(model) -> str:
    """The module path of a model's decoder (its language model): "model" for Gemma2ForCausalLM,
    "model.language_model" for Gemma3ForConditionalGeneration and Gemma4ForConditionalGeneration."""
    decoder = base_model(model).get_decoder()
    return next(name for name, module in base_model(model).named_modules() if module is decoder)


def lora_targets(model, names: list[str]) -> list[str] | str:
    """PEFT's target_modules for the leaf names `names`: the names themselves when only the decoder has modules
    of those names, else a regex matching them inside the decoder's layers only. An image + text model's towers
    have their own q_proj/k_proj/v_proj (Gemma 4's are Gemma4ClippableLinear, which PEFT cannot wrap): LoRA is never
    aimed at a tower. PEFT matches a string target against each module's full name (re.fullmatch)."""
    prefix = decoder_prefix(model)
    outside = [name for name, _ in base_model(model).named_modules()
               if name.rsplit(".", 1)[-1] in names and not name.startswith(f"{prefix}.")]
    if not outside:
        return list(names)
    leaves = "|".join(re.escape(n) for n in sorted(names))
    return rf"{re.escape(prefix)}\.layers\.\d+\.[a-z_]+\.(?:{leaves})"


def lora_modules_outside_decoder(model) -> list[str]:
    """Names of the modules carrying LoRA weights that are not in the decoder (must be none)."""
    prefix = decoder_prefix(model)
    return [name for name, module in base_model(model).named_modules()
            if hasattr(module, "lora_A") and len(module.lora_A) and not name.startswith(f"{prefix}.")]


def continue_adapter(model, start: AdapterRun, *, trainable: bool, merge: bool = False,
                     key: str = "model.name_or_path"):
    """`model` (start.base, loaded through the one loading path) with the adapter of the run it continues:
    trainable (LoRA: the adapter trained further, as PEFT's "default" adapter), frozen, or merged into the weights
    (`merge`: full fine-tuning, a reference). On a sequence classifier (a reward model) the adapter is a SEQ_CLS
    adapter: a causal LM's adapter (a reward model started from an sft run) gets the classifier's score head as
    a module trained whole and saved with it (PEFT's modules_to_save), as a new reward run's adapter has. Raises
    UserError naming `key` when the adapter does not fit the model."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        if type(model).__name__.endswith("ForSequenceClassification") and not start.reward_model:
            config = LoraConfig.from_pretrained(start.folder)
            config.task_type, config.modules_to_save = "SEQ_CLS", ["score"]
            config.inference_mode = not trainable or merge
            # PEFT loads a SEQ_CLS adapter with its score head: the causal adapter has none, so the head the
            # classifier was loaded with (new) is loaded beside the adapter's LoRA weights
            weights = load_peft_weights(start.folder) | {
                f"base_model.model.score.{name}": p.detach().clone() for name, p in model.score.named_parameters()}
            model = get_peft_model(model, config)
            loaded = set_peft_model_state_dict(model, weights)
            if loaded.unexpected_keys:
                raise ValueError(f"weights the model has no place for: {', '.join(loaded.unexpected_keys[:3])}")
        else:
            model = PeftModel.from_pretrained(model, start.folder, is_trainable=trainable and not merge)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"{key}: the adapter of {start.folder} does not fit its base '{start.base}': "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    return model.merge_and_unload() if merge else model


def base_model(model):
    """The transformers model under PEFT's wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_placement(model) -> tuple[list[str], int]:
    """Leaf names of modules carrying LoRA weights (sorted), and how many such modules there are."""
    names = [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]
    return sorted({n.rsplit(".", 1)[-1] for n in names}), len(names)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count two per stored byte, ZeRO-3 shards at full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves each rank an empty placeholder
        if p.__class__.__name__ == "Params4bit":
            n *= p.element_size() * 2  # each stored byte packs two 4-bit weights
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def inspect_adapters(model, cfg: RunConfig, report: ModelReport) -> None:
    """After PEFT wrapped the model: LoRA sits exactly where asked (UserError otherwise), and what trains
    is counted into `report`."""
    if cfg.lora.enabled:
        targets, count = lora_placement(model)
        if targets != sorted(cfg.lora.target_modules):
            raise UserError(
                f"lora.target_modules: asked for {sorted(cfg.lora.target_modules)} but LoRA landed on {targets}"
            )
        outside = lora_modules_outside_decoder(model)
        if outside:
            raise UserError(f"lora.target_modules: LoRA landed outside the language model, on {outside[:3]}"
                            + (f" and {len(outside) - 3} more" if len(outside) > 3 else ""))
        report.lora_targets, report.lora_modules = targets, count
    report.trainable_params, report.total_params = count_params(model)

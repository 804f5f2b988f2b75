"""Checks around loading: the kernel asked for (before), and what was actually loaded (after).

Every rule reads the model's family: which kernels keep its numerics, its soft-caps, the sizes for
which float16 is refused.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError
from ..families import Family


def installed_version(distribution: str) -> tuple[str, tuple[int, ...]] | None:
    """(version string, its first three numeric parts) of an installed distribution, or None when missing."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version, tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def check_kernel_request(family: Family, kernel: str, training: bool = False) -> None:
    """Before loading: the kernel is allowed for the family, what it needs is installed, and, to train, it
    has a backward on this device. Raises UserError."""
    problem = family.kernel_problem(kernel)
    if problem:
        raise UserError(problem)
    if training and not family.kernels[kernel].cpu_backward:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"model.attn_implementation: {kernel} has no backward on a CPU (torch {torch.__version__}), "
                            f"so it cannot train here; train with eager on a CPU ({kernel} is for CUDA), or use it "
                            "for chat and eval")
    needs = family.kernels[kernel].needs
    if needs is None:
        return
    distribution, minimum = needs
    installed = installed_version(distribution)
    if installed is None:
        raise UserError(f"model.attn_implementation: {kernel} requested but {distribution} is not installed; "
                        "use eager")
    version, parts = installed
    if parts < minimum:
        wanted = ".".join(map(str, minimum))
        raise UserError(f"model.attn_implementation: {distribution} {version} has no softcap support "
                        f"(needs >= {wanted}); use eager")


def text_config(config):
    """The decoder's configuration: `text_config` of an image + text checkpoint's config, else the config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def softcaps(config) -> tuple[float | None, float | None]:
    """(attention, final) soft-caps a loaded model's config carries (its decoder's); None where off."""
    decoder = text_config(config)
    return getattr(decoder, "attn_logit_softcapping", None), getattr(decoder, "final_logit_softcapping", None)


def check_loaded(model, family: Family, kernel: str, dtype: str) -> list[str]:
    """What is actually in use, checked against what was asked and the family's facts.

    Returns warnings; raises UserError when the kernel in use is not the one asked for, when the checkpoint
    lacks the final soft-cap its family has (Gemma4TextConfig, for one, defaults it to None: logits would be
    uncapped in training and in every answer), when a kernel would drop a soft-cap the checkpoint sets, when
    an image + text checkpoint loaded without its towers, or when float16 meets a size that is unstable in it.
    """
    config = model.config
    in_use = config._attn_implementation
    if in_use != kernel:
        raise UserError(f"model.attn_implementation: asked for {kernel} but the model runs {in_use}")
    missing = missing_towers(model, family)
    if missing:
        raise UserError(f"model.name_or_path: {type(model).__name__} loaded without {', '.join(missing)}: an image + "
                        f"text {family.display} checkpoint must load with its own class, towers included")
    found = []
    attn_cap, final_cap = softcaps(config)
    if family.final_softcap is not None and final_cap is None:
        raise UserError(f"model.name_or_path: this {family.display} checkpoint's config.json has no "
                        f"final_logit_softcapping, but {family.display} caps its logits at {family.final_softcap} "
                        "(every published config sets it): without it every logit is uncapped in training and "
                        f"generation; set \"final_logit_softcapping\": {family.final_softcap} in its config.json"
                        + (" (in text_config)" if text_config(config) is not config else ""))
    expected = (family.attention_softcap, family.final_softcap)
    if (attn_cap, final_cap) != expected:
        if expected == (None, None):
            found.append(f"this checkpoint sets soft-caps (attention {attn_cap}, final {final_cap}) that "
                         f"{family.display} does not have")
        elif attn_cap is None or final_cap is None:
            found.append(f"soft-capping is disabled in this checkpoint's config (attention {attn_cap}, final {final_cap})")
        else:
            found.append(f"unusual soft-caps: attention {attn_cap}, final {final_cap} ({family.display}: "
                         f"{expected[0]}/{expected[1]})")
    if attn_cap is not None and not family.kernels[kernel].applies_softcap:
        raise UserError(f"model.attn_implementation: {kernel} would drop this checkpoint's attention soft-cap "
                        f"({attn_cap}); use eager")
    decoder = text_config(config)
    size = family.size_of_shape(decoder.hidden_size, decoder.num_hidden_layers)
    if dtype == "float16" and size in family.fp16_refused_sizes:
        raise UserError(f"model.dtype: float16 is unstable for {family.display} {size.upper()} (this checkpoint has "
                        f"{size.upper()}'s shape); use bfloat16")
    return found


def tower_parameters(model, family: Family):
    """(name, parameter) of every parameter in `family`'s towers (image/audio encoders and their projectors) of a
    loaded model, under any PEFT wrapper."""
    prefixes = tuple(f"{tower}." for tower in family.towers)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(name, p) for name, p in base.named_parameters() if name.startswith(prefixes)]


def missing_towers(model, family: Family) -> list[str]:
    """The towers an image + text checkpoint's config describes (vision_config, audio_config) that the loaded
    model lacks (a class that dropped them); [] for text-only configs and classes that have them."""
    config = model.config
    described = [key for key in ("vision_config", "audio_config") if getattr(config, key, None) is not None]
    if not family.towers or not described:
        return []
    names = {name.split(".")[1] for name, _ in model.named_parameters() if name.count(".") > 1}
    kinds = {"vision_config": ("vision_tower", "embed_vision"), "audio_config": ("audio_tower", "embed_audio")}
    return [key.replace("_config", " tower") for key in described
            if not any(module in names for module in kinds[key])]


def freeze_towers(model, family: Family, train_projector: bool = False) -> int:
    """Freeze the towers (requires_grad off: no gradient, out of the optimizer, which takes trainable parameters
    only); training adapts the decoder. `train_projector` (model.train_projector) leaves the image projector
    (Family.images.projector) trainable. Returns how many parameters were frozen."""
    frozen = 0
    projector = f"{family.images.projector}." if train_projector and family.images else None
    for name, p in tower_parameters(model, family):
        if projector and name.startswith(projector):
            p.requires_grad_(True)
            continue
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


def keep_4bit_layout_trainable(model) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for an inference kernel on the first
    eval-mode forward (e.g. an evaluation during training). That kernel has no backward: training steps after
    it would silently lose the gradient through every 4-bit layer. Keep the layout the training kernel uses.
    Returns how many layers were switched."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@dataclass
class ModelReport:
    """What was loaded, as checked after loading; goes into run.json as `model`."""

    name_or_path: str
    location: str
    family: str
    attn_implementation: str
    attention_softcap: float | None
    final_softcap: float | None
    layer_types: list[str]
    hidden_size: int
    num_layers: int
    load_dtype: str
    quantization: dict[str, Any] | None
    lora_targets: list[str] = field(default_factory=list)
    lora_modules: int = 0
    trainable_params: int = 0
    total_params: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data (for run.json)."""
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the log."""
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        caps = (f"soft-caps attention {self.attention_softcap} / final {self.final_softcap}"
                if (self.attention_softcap, self.final_softcap) != (None, None) else "no soft-caps")
        return [
            f"model: {self.name_or_path} ({self.family}, {self.num_layers} layers, hidden {self.hidden_size}, "
            f"{self.load_dtype}" + (f", 4-bit {self.quantization['bnb_4bit_quant_type']}"
                                    if self.quantization and self.quantization.get("load_in_4bit") else "")
            + (", 8-bit" if self.quantization and self.quantization.get("load_in_8bit") else "") + ")",
            f"attention: {self.attn_implementation}, {caps}",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.3f}%)"
            + (f" in {self.lora_modules} LoRA modules on {self.lora_targets}" if self.lora_modules else ""),
        ]


def vocabulary_digest(tokenizer) -> str:
    """16 hex digits over the token -> id mapping and the special tokens: equal digests mean token ids mean the
    same thing in both models. The one tokenizer-compatibility check (distill's teacher, merge-models' inputs,
    eval --compare)."""
    import hashlib
    import json

    vocab = json.dumps(sorted(tokenizer.get_vocab().items())) + json.dumps(sorted(tokenizer.all_special_tokens))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]

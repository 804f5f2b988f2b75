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


def softcaps(config) -> tuple[float | None, float | None]:
    """(attention, final) soft-caps a loaded model's config carries; None where off."""
    return getattr(config, "attn_logit_softcapping", None), getattr(config, "final_logit_softcapping", None)


def check_loaded(model, family: Family, kernel: str, dtype: str) -> list[str]:
    """What is actually in use, checked against what was asked and the family's facts.

    Returns warnings; raises UserError when the kernel in use is not the one asked for, when it would
    drop a soft-cap the checkpoint sets, or when float16 meets a size that is unstable in it.
    """
    config = model.config
    in_use = config._attn_implementation
    if in_use != kernel:
        raise UserError(f"model.attn_implementation: asked for {kernel} but the model runs {in_use}")
    found = []
    attn_cap, final_cap = softcaps(config)
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
    size = family.size_of_shape(config.hidden_size, config.num_hidden_layers)
    if dtype == "float16" and size in family.fp16_refused_sizes:
        raise UserError(f"model.dtype: float16 is unstable for {family.display} {size.upper()} (this checkpoint has "
                        f"{size.upper()}'s shape); use bfloat16")
    return found


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

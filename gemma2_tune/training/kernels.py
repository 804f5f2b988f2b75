"""Liger's Triton kernels, each on only after a probe check against the plain computation.

training.use_liger_kernel: Gemma's RMSNorm, GeGLU and RoPE. training.loss=supervised_liger: the supervised
loss through Liger's fused linear cross-entropy.

Liger (https://github.com/linkedin/Liger-Kernel) replaces a decoder layer's many small element-wise kernels
by fused ones: RMSNorm with Gemma's (1 + weight) offset computed in fp32 ("gemma" casting), the
tanh-approximated GeGLU (gate, up) product, and the rotary embedding. Each family names its patch function
(Family.liger_patch); it is applied to the loaded model with the loss left alone (`training.loss` decides
that). The attention (soft-cap included) and the final soft-cap are untouched.

Liger's kernels are Triton GPU kernels: a run asks for them only on CUDA, checked before any weight loads.
Before the first step, one probe batch runs through the plain model and then through the patched one, in
eval mode (no dropout): its logits and the gradients of the trainable weights must agree within the
precision's tolerance, or the run stops there. The run records what was patched and what the check measured.

The fused loss (LigerFusedLinearCrossEntropyLoss, given the family's final soft-cap, summed) computes lm_head
in the model's dtype with fp32 accumulation where the tiled loss (loss.py) works in fp32; its probe compares
both on random hidden states against the run's own lm_head weight: the summed loss and its gradient.
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any, Callable

from ..errors import UserError
from ..families import Family
from ..models.checks import installed_version, softcaps
from ..models.lora import base_model

LIGER_DISTRIBUTION = "liger-kernel"
LIGER_MINIMUM = (0, 8, 0)  # the patch functions' arguments (rope, rms_norm, geglu, model=) as read in 0.8.5
PATCHED = ("rms_norm", "geglu", "rope")
PROBE_TOKENS = 64
# The probe's bounds, also used by training.torch_compile (compiling.py). Logits: absolute (fp32 kernels
# differ by summation order; bf16 logits near Gemma 2's 30.0 soft-cap are spaced 0.125 apart). Gradients:
# max |difference| relative to the largest gradient, fp32 reassociation vs bf16's 8-bit mantissa over a few
# layers.
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}
GRADIENT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}
# The fused loss vs the fp32 tiles, relative to the summed loss: fp32 differs by summation order; bf16 rounds
# each logit to 8 bits of mantissa (relative 2^-9) before the soft-cap, errors that average out over the sum.
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
LOSS_PROBE_POSITIONS = 256


def liger_problems(family: Family) -> list[str]:
    """Why Liger's kernels cannot run here (empty: they can): the family has no patch, liger-kernel is
    missing or too old, or there is no CUDA GPU (Triton kernels). Looks at the machine, loads nothing."""
    problems = []
    if family.liger_patch is None:
        problems.append(f"Liger has no kernels for {family.display}")
    installed = installed_version(LIGER_DISTRIBUTION)
    if installed is None:
        problems.append(f"{LIGER_DISTRIBUTION} is not installed (pip install 'gemma2-tune[liger]')")
    elif installed[1] < LIGER_MINIMUM:
        problems.append(f"{LIGER_DISTRIBUTION} {installed[0]} is older than {'.'.join(map(str, LIGER_MINIMUM))}")
    import torch

    if not torch.cuda.is_available():
        problems.append("Liger's kernels are Triton GPU kernels and this machine has no CUDA GPU")
    return problems


def liger_patch(family: Family) -> Callable[[Any], None]:
    """The family's Liger patch as a function of the model (the transformers model under any PEFT wrapper):
    RMSNorm, GeGLU and RoPE on, Liger's own losses off."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, family.liger_patch)

    def patch(model) -> None:
        apply(rope=True, rms_norm=True, geglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
              model=model)

    return patch


def probed_weights(model) -> list:
    """The trainable weights whose gradients the probe compares: those of the first decoder layer (their
    gradients flow back through every later layer, so through every patched kernel's backward), or every
    trainable weight when none is there. Keeps the probe small for full fine-tuning (not a model's worth of
    gradients copied)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    first = [p for name, p in trainable if ".layers.0." in f".{name}"]
    return first or [p for _, p in trainable]


def probe(model) -> tuple[Any, list]:
    """Logits (fp32, on the CPU) and gradients (fp32, CPU) of `probed_weights` for one fixed probe batch:
    next-token cross-entropy over PROBE_TOKENS tokens drawn from the vocabulary with seed 0, in eval mode.
    The model's own gradients are left as they were (None)."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(p.device for p in model.parameters())
    tokens = torch.randint(3, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    trainable = probed_weights(model)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    finally:
        model.train(was_training)
    return logits.detach().float().cpu(), [None if g is None else g.detach().float().cpu() for g in grads]


def compare(before: tuple[Any, list], after: tuple[Any, list]) -> tuple[float, float]:
    """(max |logit difference|, max |gradient difference| / max |gradient|) of two probes; NaN when either
    probe has a non-finite logit or gradient, inf when a gradient exists in one probe only."""
    import torch

    logits_a, grads_a = before
    logits_b, grads_b = after
    nan = float("nan")
    if not (torch.isfinite(logits_a).all() and torch.isfinite(logits_b).all()):
        return nan, nan
    logit_diff = (logits_a - logits_b).abs().max().item()
    if any((a is None) != (b is None) for a, b in zip(grads_a, grads_b)):
        return logit_diff, float("inf")  # a kernel cut the gradient's path
    pairs = [(a, b) for a, b in zip(grads_a, grads_b) if a is not None]
    if not pairs:
        return logit_diff, 0.0
    if not all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in pairs):
        return logit_diff, nan
    scale = max(a.abs().max().item() for a, _ in pairs)
    grad_diff = max((a - b).abs().max().item() for a, b in pairs)
    return logit_diff, grad_diff / scale if scale > 0 else grad_diff


def apply_checked(model, patch: Callable[[Any], None], dtype: str, what: str) -> dict[str, Any]:
    """Probe `model`, apply `patch` to its transformers model, probe again and compare. Returns the
    manifest's record; raises UserError (naming `what`) when logits or gradients moved beyond the tolerance."""
    import torch

    before = probe(model)
    if not (torch.isfinite(before[0]).all() and all(torch.isfinite(g).all() for g in before[1] if g is not None)):
        raise UserError(f"{what}: the plain model's logits or gradients on a probe batch are not finite (NaN or inf) "
                        "before any kernel is changed: check the model's weights; the check needs a finite reference")
    patch(base_model(model))
    return verdict(before, probe(model), dtype, f"{what}: the patched model's", f"train without it ({what}=false)")


def verdict(before: tuple[Any, list], after: tuple[Any, list], dtype: str, subject: str, instead: str
            ) -> dict[str, Any]:
    """Compare two probes within LOGIT_TOLERANCE / GRADIENT_TOLERANCE for `dtype`. Returns the record (both
    differences, both bounds); raises UserError "<subject> logits moved by ... ; <instead>" beyond them or
    for a non-finite result."""
    logit_diff, grad_diff = compare(before, after)
    bounds = LOGIT_TOLERANCE.get(dtype, 0.5), GRADIENT_TOLERANCE.get(dtype, 0.1)
    record = {"probe_max_abs_logit_diff": logit_diff, "probe_max_rel_grad_diff": grad_diff,
              "logit_tolerance": bounds[0], "gradient_tolerance": bounds[1]}
    if not (logit_diff <= bounds[0] and grad_diff <= bounds[1]):  # also catches NaN
        raise UserError(f"{subject} logits moved by {logit_diff:.4g} (tolerance {bounds[0]}) and its gradients by "
                        f"{grad_diff:.4g} of the largest (tolerance {bounds[1]}) on a probe batch in {dtype}; "
                        f"{instead}")
    return record


def apply_liger(model, family: Family, dtype: str) -> dict[str, Any]:
    """Patch `model` (a loaded, possibly PEFT-wrapped model of `family`) with Liger's kernels after the probe
    check. Returns run.json's `kernels.liger` record. Raises UserError when the check fails."""
    record = apply_checked(model, liger_patch(family), dtype, "training.use_liger_kernel")
    return {"version": importlib.metadata.version(LIGER_DISTRIBUTION), "patch": family.liger_patch,
            "kernels": list(PATCHED), **record}


def liger_loss(softcap: float | None):
    """Liger's fused linear cross-entropy as loss.FusedLoss: summed over the given positions, soft-capped."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(softcap=softcap, reduction="sum")


def check_fused_loss(fused, weight, softcap: float | None, dtype: str, what: str) -> dict[str, Any]:
    """Compare `fused` with the fp32 tiled loss on LOSS_PROBE_POSITIONS random hidden states against `weight`
    (V, H), with random targets (seed 0): the summed loss (relative) and its gradient with respect to the
    hidden states (relative to the largest). The rows are scaled so their largest logits range from a tenth of
    the soft-cap to three times it (a loss that ignores or misplaces the cap differs where it bites, as trained
    models' logits do). Returns the record; raises UserError naming `what` beyond LOSS_TOLERANCE /
    GRADIENT_TOLERANCE or for a non-finite result."""
    import torch

    from .loss import tiled_loss_sum

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(LOSS_PROBE_POSITIONS, weight.shape[1], generator=generator)
    targets = torch.randint(0, weight.shape[0], (LOSS_PROBE_POSITIONS,), generator=generator).to(weight.device)
    with torch.no_grad():
        logits = hidden.to(weight.device, weight.dtype) @ weight.t()  # in the weight's dtype: no fp32 copy of it
        peak = logits.float().abs().amax(dim=1).clamp_min(1e-6).cpu()
        reach = torch.linspace(0.1, 3.0, LOSS_PROBE_POSITIONS) * (softcap or 30.0)  # each row's largest logit
        hidden = hidden * (reach / peak)[:, None]
    results = []
    for compute in (lambda h: tiled_loss_sum(h, weight.detach(), targets, softcap),
                    lambda h: fused(weight.detach(), h, targets)):
        h = hidden.to(weight.device, weight.dtype).requires_grad_(True)
        loss = compute(h).float()
        (grad,) = torch.autograd.grad(loss, h)
        results.append((loss.item(), grad.float().cpu()))
    (reference, grad_a), (value, grad_b) = results
    finite = (math.isfinite(reference) and math.isfinite(value) and bool(torch.isfinite(grad_a).all())
              and bool(torch.isfinite(grad_b).all()))
    loss_diff = abs(value - reference) / max(abs(reference), 1e-12) if finite else float("nan")
    grad_diff = ((grad_a - grad_b).abs().max().item() / max(grad_a.abs().max().item(), 1e-12) if finite
                 else float("nan"))
    bounds = LOSS_TOLERANCE.get(dtype, 1e-2), GRADIENT_TOLERANCE.get(dtype, 0.1)
    record = {"probe_positions": LOSS_PROBE_POSITIONS, "probe_rel_loss_diff": loss_diff,
              "probe_max_rel_grad_diff": grad_diff, "loss_tolerance": bounds[0], "gradient_tolerance": bounds[1]}
    if not (loss_diff <= bounds[0] and grad_diff <= bounds[1]):  # also catches NaN
        raise UserError(f"{what}: the fused loss differs from the fp32 tiled loss by {loss_diff:.4g} of its value "
                        f"(tolerance {bounds[0]}) and its gradient by {grad_diff:.4g} of the largest (tolerance "
                        f"{bounds[1]}) on a probe in {dtype}; use training.loss=supervised_chunked")
    return record


def use_liger_loss(trainer, dtype: str) -> dict[str, Any]:
    """Give `trainer` (a SupervisedLossTrainer) Liger's fused loss after its probe check against the tiled loss,
    with the model's lm_head weight and final soft-cap. Returns run.json's record; raises UserError."""
    model = base_model(trainer.model)
    softcap = softcaps(model.config)[1]
    fused = liger_loss(softcap)
    record = check_fused_loss(fused, model.get_output_embeddings().weight, softcap, dtype,
                              "training.loss=supervised_liger")
    trainer.fused_loss = fused
    return {"version": importlib.metadata.version(LIGER_DISTRIBUTION), "kernel": "LigerFusedLinearCrossEntropyLoss",
            "softcap": softcap, **record}


def check_kernel_settings(cfg, family: Family, loss: str) -> None:
    """Before loading: the run's Liger settings (training.use_liger_kernel; `loss`, the loss the run will use)
    can run here. Raises UserError naming every setting that asked for Liger, the reasons and what to set."""
    keys = ([("training.use_liger_kernel", "training.use_liger_kernel=false")] if cfg.training.use_liger_kernel
            else []) + ([("training.loss=supervised_liger", "training.loss=supervised_chunked")]
                        if loss == "supervised_liger" else [])
    problems = liger_problems(family) if keys else []
    if problems:
        raise UserError(f"{' and '.join(k for k, _ in keys)}: " + "; ".join(problems)
                        + f"; train without them: {' and '.join(i for _, i in keys)}")


def apply_kernel_settings(trainer, cfg, family: Family, loss: str, say: Callable[[str], None]) -> dict[str, Any]:
    """After the trainer is built: Liger's layer kernels and fused loss as the run asks, each after its probe
    check, said in a line. Returns run.json's `kernels` ({} when none). Raises UserError when a check fails."""
    record: dict[str, Any] = {}
    if cfg.training.use_liger_kernel:
        liger = record["liger"] = apply_liger(trainer.model, family, cfg.model.dtype)
        say(f"Liger kernels {', '.join(liger['kernels'])} (liger-kernel {liger['version']}); probe vs plain: logits "
            f"max |difference| {liger['probe_max_abs_logit_diff']:.2e}, gradients "
            f"{liger['probe_max_rel_grad_diff']:.2e} of the largest")
    if loss == "supervised_liger":
        fused = record["loss"] = use_liger_loss(trainer, cfg.model.dtype)
        say(f"loss: Liger's fused linear cross-entropy (soft-cap {fused['softcap']}); probe vs the fp32 tiles: loss "
            f"{fused['probe_rel_loss_diff']:.2e} of its value, gradient {fused['probe_max_rel_grad_diff']:.2e} of "
            "the largest")
    return record

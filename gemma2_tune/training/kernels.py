"""training.use_liger_kernel: Liger's Triton kernels for Gemma's RMSNorm, GeGLU and RoPE, checked first.

Liger (https://github.com/linkedin/Liger-Kernel) replaces a decoder layer's many small element-wise kernels
by fused ones: RMSNorm with Gemma's (1 + weight) offset computed in fp32 ("gemma" casting), the
tanh-approximated GeGLU (gate, up) product, and the rotary embedding. Each family names its patch function
(Family.liger_patch); it is applied to the loaded model with the loss left alone (`training.loss` decides
that). The attention (soft-cap included) and the final soft-cap are untouched.

Liger's kernels are Triton GPU kernels: a run asks for them only on CUDA, checked before any weight loads.
Before the first step, one probe batch runs through the plain model and then through the patched one, in
eval mode (no dropout): its logits and the gradients of the trainable weights must agree within the
precision's tolerance, or the run stops there. The run records what was patched and what the check measured.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable

from ..errors import UserError
from ..families import Family

LIGER_DISTRIBUTION = "liger-kernel"
LIGER_MINIMUM = (0, 8, 0)  # the patch functions' arguments (rope, rms_norm, geglu, model=) as read in 0.8.5
PATCHED = ("rms_norm", "geglu", "rope")
PROBE_TOKENS = 64
# The probe's bounds. Logits: absolute, as training.torch_compile's (fp32 kernels differ by summation order;
# bf16 logits near Gemma 2's 30.0 soft-cap are spaced 0.125 apart). Gradients: max |difference| relative to
# the largest gradient, fp32 reassociation vs bf16's 8-bit mantissa over a few layers.
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}
GRADIENT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


def liger_problems(family: Family) -> list[str]:
    """Why Liger's kernels cannot run here (empty: they can): the family has no patch, liger-kernel is
    missing or too old, or there is no CUDA GPU (Triton kernels). Looks at the machine, loads nothing."""
    problems = []
    if family.liger_patch is None:
        problems.append(f"Liger has no kernels for {family.display}")
    try:
        version = importlib.metadata.version(LIGER_DISTRIBUTION)
        parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
        if parts < LIGER_MINIMUM:
            problems.append(f"{LIGER_DISTRIBUTION} {version} is older than {'.'.join(map(str, LIGER_MINIMUM))}")
    except importlib.metadata.PackageNotFoundError:
        problems.append(f"{LIGER_DISTRIBUTION} is not installed (pip install 'gemma2-tune[liger]')")
    import torch

    if not torch.cuda.is_available():
        problems.append("Liger's kernels are Triton GPU kernels and this machine has no CUDA GPU")
    return problems


def check_liger_request(family: Family) -> None:
    """Before loading: raises UserError naming the key and every reason Liger cannot run here."""
    problems = liger_problems(family)
    if problems:
        raise UserError("training.use_liger_kernel: " + "; ".join(problems)
                        + "; train without them: training.use_liger_kernel=false")


def liger_patch(family: Family) -> Callable[[Any], None]:
    """The family's Liger patch as a function of the model (the transformers model under any PEFT wrapper):
    RMSNorm, GeGLU and RoPE on, Liger's own losses off."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, family.liger_patch)

    def patch(model) -> None:
        apply(rope=True, rms_norm=True, geglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
              model=model)

    return patch


def base_model(model):
    """The transformers model under PEFT's wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def probe(model) -> tuple[Any, list]:
    """Logits (fp32, on the CPU) and the trainable weights' gradients (fp32, CPU) of one fixed probe batch:
    next-token cross-entropy over PROBE_TOKENS tokens drawn from the vocabulary with seed 0, in eval mode.
    The model's own gradients are left as they were (None)."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(p.device for p in model.parameters())
    tokens = torch.randint(3, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
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
    """(max |logit difference|, max |gradient difference| / max |gradient|) of two probes."""
    logits_a, grads_a = before
    logits_b, grads_b = after
    logit_diff = (logits_a - logits_b).abs().max().item()
    scale = max((g.abs().max().item() for g in grads_a if g is not None), default=0.0)
    grad_diff = 0.0
    for a, b in zip(grads_a, grads_b):
        if (a is None) != (b is None):
            return logit_diff, float("inf")  # a kernel cut the gradient's path
        if a is not None:
            grad_diff = max(grad_diff, (a - b).abs().max().item())
    return logit_diff, grad_diff / scale if scale > 0 else grad_diff


def apply_checked(model, patch: Callable[[Any], None], dtype: str, what: str) -> dict[str, Any]:
    """Probe `model`, apply `patch` to its transformers model, probe again and compare. Returns the
    manifest's record; raises UserError (naming `what`) when logits or gradients moved beyond the tolerance."""
    before = probe(model)
    patch(base_model(model))
    logit_diff, grad_diff = compare(before, probe(model))
    bounds = LOGIT_TOLERANCE.get(dtype, 0.5), GRADIENT_TOLERANCE.get(dtype, 0.1)
    record = {"probe_max_abs_logit_diff": logit_diff, "probe_max_rel_grad_diff": grad_diff,
              "logit_tolerance": bounds[0], "gradient_tolerance": bounds[1]}
    if not (logit_diff <= bounds[0] and grad_diff <= bounds[1]):  # also catches NaN
        raise UserError(f"{what}: the patched model's logits moved by {logit_diff:.4g} (tolerance {bounds[0]}) and "
                        f"its gradients by {grad_diff:.4g} of the largest (tolerance {bounds[1]}) on a probe batch "
                        f"in {dtype}; train without it ({what}=false)")
    return record


def apply_liger(model, family: Family, dtype: str) -> dict[str, Any]:
    """Patch `model` (a loaded, possibly PEFT-wrapped model of `family`) with Liger's kernels after the probe
    check. Returns run.json's `kernels` record. Raises UserError when the check fails."""
    record = apply_checked(model, liger_patch(family), dtype, "training.use_liger_kernel")
    return {"liger": {"version": importlib.metadata.version(LIGER_DISTRIBUTION), "patch": family.liger_patch,
                      "kernels": list(PATCHED), **record}}

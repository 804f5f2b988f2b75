"""Self-checks of a written model folder: does it compute the function it should, within the precision it is in?

Every command that publishes weights (merge, merge-models, serve's merge, export) scores a few chats with the
written folder, reloaded as a server would, and with a reference: the function it must equal.

A fixed bound on the logit difference cannot serve every model: rounding to bf16 alone moves logits by an
amount that grows with their scale (Gemma 3 has no final soft-cap and reaches logits ~160, where bf16 values
are 1.0 apart; Gemma 2 caps them at 30.0, where they are 0.125 apart), and ties between near-equal logits
decide top-1 tokens by chance on small models. So the bound is measured per check: the noise floor is how
far the reference itself moves when it is computed in the checked precision instead of float32
(`fp32_logits` vs `logits`). A folder passes when its distance to the float32 reference stays within
FLOOR_FACTOR times that floor (plus MIN_SLACK), as max and as mean |logit difference|. Rounding stays
inside; a wrong LoRA scaling, a dropped module or another base moves the logits by what the adapter or the
base contributes, far beyond it (tests/unit/test_selfcheck.py). A top-1 flip needs one logit to move by half the
reference's top-1 margin, so it is bounded through the max; top-1 agreement is reported, with the floor's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

CHECK_PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "144."},
     {"role": "user", "content": "And 13 times 13?"}],
]
# A healthy result's distance to the float32 reference, over the reference's own distance in the checked
# precision: the merged weights are rounded once more (W + BA to the dtype), so it is not exactly 1.
FLOOR_FACTOR = 4.0
MIN_SLACK = 1e-3  # logits; float32 results differ from each other by summation order alone (~1e-5)


def prompts(tokenizer, system_policy: str, family, device=None) -> list:
    """CHECK_PROMPTS rendered as training renders them, each (1, length) token ids on `device`."""
    from .inference import prompt_ids

    ids = [prompt_ids(p, tokenizer, system_policy, family) for p in CHECK_PROMPTS]
    return [i.to(device) for i in ids] if device is not None else ids


def logits(model, prompt_ids: list) -> list:
    """float32 logits (1, length, vocab) of each prompt, computed in the model's own precision."""
    import torch

    with torch.no_grad():
        return [model(input_ids=ids, use_cache=False).logits.float() for ids in prompt_ids]


@contextlib.contextmanager
def _computed_in_fp32(model) -> Iterator[None]:
    """Each module's bf16/fp16 parameters upcast to float32 while it runs, restored after (an exact round trip),
    so the peak memory is the model plus one module in float32, not the model in float32. A module accelerate
    offloads (device_map with CPU or disk) has its weights only inside the forward accelerate wraps
    (`_old_forward`), so that one is wrapped there."""
    import torch

    low = (torch.bfloat16, torch.float16)
    patched = []

    def upcast_around(module, forward):
        def run(*args, **kwargs):
            saved = []
            for param in module.parameters(recurse=False):
                if param.dtype in low and param.device.type != "meta":
                    saved.append((param, param.data))
                    param.data = param.data.float()
            try:
                return forward(*args, **kwargs)
            finally:
                for param, data in saved:
                    param.data = data

        return run

    for module in model.modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        attr = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        had_own = attr in vars(module)
        original = getattr(module, attr)
        setattr(module, attr, upcast_around(module, original))
        patched.append((module, attr, had_own, original))
    try:
        yield
    finally:
        for module, attr, had_own, original in patched:
            if had_own:
                setattr(module, attr, original)
            else:
                delattr(module, attr)


def fp32_logits(model, prompt_ids: list) -> list:
    """The logits `logits` gives, with every matmul, norm and activation computed in float32 (the model's
    weights upcast exactly, one module at a time). For a float32 model it is `logits`."""
    with _computed_in_fp32(model):
        return logits(model, prompt_ids)


def compare(got: list, reference: list) -> dict[str, Any]:
    """Max and mean |logit difference| and top-1 agreement (a share) over every position of every prompt.
    Both lists hold (1, length, vocab) tensors of the same shapes."""
    diffs = [(g.to(r.device) - r).abs() for g, r in zip(got, reference)]
    positions = sum(r.shape[1] for r in reference)
    agree = sum(int((g.to(r.device).argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference))
    return {"max_abs_logit_diff": max(d.max().item() for d in diffs),
            "mean_abs_logit_diff": sum(d.mean(-1).sum().item() for d in diffs) / positions,
            "top1_agreement": agree / positions, "positions": positions, "prompts": len(reference),
            "outputs": reference[0].shape[-1]}  # 1: a reward model's score (top-1 says nothing)


def verdict(result: dict[str, Any], floor: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The check record: `result` (the folder vs the float32 reference) within the bound measured from `floor`
    (the reference in `dtype` vs in float32). Returns the record with `bound` and `passed`."""
    bound = {key: FLOOR_FACTOR * floor[key] + MIN_SLACK for key in ("max_abs_logit_diff", "mean_abs_logit_diff")}
    passed = all(result[key] <= bound[key] for key in bound)
    return result | {"noise_floor": {k: floor[k] for k in ("max_abs_logit_diff", "mean_abs_logit_diff",
                                                          "top1_agreement")} | {"dtype": dtype},
                     "bound": bound | {"floor_factor": FLOOR_FACTOR, "min_slack": MIN_SLACK}, "passed": passed}


def check(got: list, reference_model, prompt_ids: list, dtype: str) -> dict[str, Any]:
    """`got` (logits of the checked folder, in `dtype`) against `reference_model` computed in float32, bounded
    by the noise floor of `reference_model` in its own precision (`verdict`). Returns the record."""
    reference = fp32_logits(reference_model, prompt_ids)
    floor = compare(logits(reference_model, prompt_ids), reference)
    return verdict(compare(got, reference), floor, dtype)


def describe(record: dict[str, Any]) -> str:
    """One line: the distance, the measured bound, top-1 agreement next to the floor's."""
    floor, bound = record["noise_floor"], record["bound"]
    if record.get("outputs", 2) == 1:  # a reward model: one score per position
        return (f"max |score difference| {record['max_abs_logit_diff']:.4f} (bound "
                f"{bound['max_abs_logit_diff']:.4f}), mean {record['mean_abs_logit_diff']:.5f} (bound "
                f"{bound['mean_abs_logit_diff']:.5f}; {floor['dtype']} noise floor: max "
                f"{floor['max_abs_logit_diff']:.4f}, mean {floor['mean_abs_logit_diff']:.5f})")
    return (f"max |logit difference| {record['max_abs_logit_diff']:.4f} (bound {bound['max_abs_logit_diff']:.4f}), "
            f"mean {record['mean_abs_logit_diff']:.5f} (bound {bound['mean_abs_logit_diff']:.5f}); top-1 tokens agree "
            f"{record['top1_agreement']:.1%} ({floor['dtype']} noise floor: max {floor['max_abs_logit_diff']:.4f}, "
            f"mean {floor['mean_abs_logit_diff']:.5f}, top-1 {floor['top1_agreement']:.1%})")

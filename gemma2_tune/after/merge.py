"""`gemma2-tune merge`: fold the LoRA adapter into the base weights, save for serving, check the result.

The merged model has the precision the run trained in (model.dtype: bf16 by default, float32 for the CPU
recipes). A 4-bit QLoRA run's base is reloaded unquantized in that precision (merging into 4-bit weights
would round the adapter away). Before anything reaches the target folder, the merged model's logits are
compared with base + adapter on a few prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.turns import END
from ..errors import UserError
from ..files import staged_dir
from ..models.loading import LoadRequest, load_model
from .inference import load, prompt_ids, read_run

# The bound on the merge itself (merged vs the same unquantized base + adapter): bf16 logits near Gemma 2's
# 30.0 soft-cap are spaced 0.125 apart, and the merged weights are rounded to the dtype once more.
LOGIT_TOLERANCE = 0.5
TOP1_AGREEMENT = 0.95
CHECK_PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "144."},
     {"role": "user", "content": "And 13 times 13?"}],
]


def merge(adapter: str, output: str, model: str | None = None, dtype: str | None = None, echo=print) -> dict:
    """Merge a run's LoRA into its base and write it to `output` (a new folder), self-checked.

    `dtype`: of the merged weights (default: the run's model.dtype). Two comparisons on the written folder,
    reloaded as a server would: against the same unquantized base + adapter (bounded: max |logit
    difference| <= LOGIT_TOLERANCE and top-1 agreement >= 95%; a merge must not change the function), and,
    for a QLoRA run, against the model that was trained (4-bit base + adapter; reported, not bounded: it
    differs from any unquantized model by the base's NF4 quantization error, which a merge cannot remove).
    Returns the report (also merge.json). Raises UserError: an existing target, a full fine-tune, a base
    that doesn't fit, or a failed bounded check (nothing is written then).
    """
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out}: already exists and is not empty; choose a new folder (nothing was written)")
    run = read_run(adapter, model)
    if not run.is_adapter:
        raise UserError(f"--adapter {adapter}: a full fine-tune; its folder already is a complete model")
    was_4bit = bool(run.config and run.config.quantization.load_in_4bit)
    dtype = dtype or (run.config.model.dtype if run.config else "bfloat16")
    trained_logits = None
    if was_4bit:
        echo(f"the run trained 4-bit NF4 QLoRA: the merged model is the unquantized base ({dtype}) + adapter; "
             "comparing it with the trained 4-bit model too")
        trained = load(run, "as-trained")
        trained_logits = _logits(trained.model, _prompts(run, trained))
        del trained
    loaded = load(run, "auto", dtype)
    peft_model, tokenizer = loaded.model, loaded.tokenizer
    prompts = _prompts(run, loaded)
    reference = _logits(peft_model, prompts)
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True  # training turned it off; serving wants it
    end = tokenizer.convert_tokens_to_ids(END)
    if getattr(merged, "generation_config", None) is not None:  # a reward model (one score per sequence) does not generate
        merged.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    head = run.config.head if run.config else "causal-lm"

    with staged_dir(out) as tmp:  # nothing reaches `out` unless the bounded check passes
        merged.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)  # with the run's generated chat template
        got = _reloaded_logits(tmp, prompts, run.attn_implementation, dtype, head)
        check = _compare(got, reference) | {"against": f"unquantized base ({dtype}) + adapter",
                                            "tolerance": LOGIT_TOLERANCE}
        check["passed"] = check["max_abs_logit_diff"] <= LOGIT_TOLERANCE and check["top1_agreement"] >= TOP1_AGREEMENT
        report = {"base_model": run.base_model, "adapter": str(run.path), "trained_in_4bit": was_4bit,
                  "merged_dtype": dtype, "check": check}
        if trained_logits is not None:
            report["trained_model_check"] = _compare(got, [t.to(g.device) for t, g in zip(trained_logits, got)]) | {
                "against": "the trained model (4-bit NF4 base + adapter)", "bounded": False}
        (tmp / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
        if not check["passed"]:
            hint = "; merging in float32 (--dtype float32) keeps the adapter's small updates" if dtype != "float32" else ""
            raise UserError(f"merge self-check failed against the {check['against']}: max |logit difference| "
                            f"{check['max_abs_logit_diff']:.4f} (tolerance {LOGIT_TOLERANCE}), top-1 tokens agree "
                            f"{check['top1_agreement']:.1%} (needs {TOP1_AGREEMENT:.0%}){hint}; nothing was written "
                            f"to {out}")
    echo(f"merged: {out}/ ({dtype})")
    echo(f"  vs {check['against']}: max |logit difference| {check['max_abs_logit_diff']:.4f} (tolerance "
         f"{LOGIT_TOLERANCE}: the merge must not change the function), top-1 tokens agree {check['top1_agreement']:.1%}")
    if "trained_model_check" in report:
        t = report["trained_model_check"]
        echo(f"  vs {t['against']}: max |logit difference| {t['max_abs_logit_diff']:.4f}, top-1 tokens agree "
             f"{t['top1_agreement']:.1%} (not bounded: the base's 4-bit quantization error, which no merge removes)")
    return report


def _prompts(run, loaded) -> list:
    return [prompt_ids(p, loaded.tokenizer, run.system_policy, loaded.family).to(loaded.model.device)
            for p in CHECK_PROMPTS]


def _logits(model, prompts) -> list:
    """fp32 logits (1, length, vocab) of each prompt."""
    import torch

    with torch.no_grad():
        return [model(input_ids=ids, use_cache=False).logits.float() for ids in prompts]


def _reloaded_logits(folder: Path, prompts, kernel: str, dtype: str, head: str = "causal-lm") -> list:
    """Reload what was written (as a server would, through the checked loading path, with the run's head: a
    reward model's scores are (1, 1) logits) and score the prompts."""
    reloaded, _ = load_model(LoadRequest(str(folder), dtype=dtype, attn_implementation=kernel, head=head))
    reloaded.to(prompts[0].device)
    return _logits(reloaded, prompts)


def _compare(got: list, reference: list) -> dict:
    """Max |logit difference| and top-1 agreement over every position of every prompt."""
    diff = max((g - r).abs().max().item() for g, r in zip(got, reference))
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference))
    return {"max_abs_logit_diff": diff, "top1_agreement": agree / sum(r.shape[1] for r in reference),
            "prompts": len(reference)}

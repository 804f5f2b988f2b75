"""`gemma2-tune merge`: fold the LoRA adapter into the base weights, save for serving, check the result.

The merged model has the precision the run trained in (model.dtype: bf16 by default, float32 for the CPU
recipes). A 4-bit QLoRA run's base is reloaded unquantized in that precision (merging into 4-bit weights
would round the adapter away). Before anything reaches the target folder, the merged model's logits are
compared with base + adapter on a few prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.turns import END, chat_template
from ..errors import UserError
from ..files import staged_dir
from ..models.loading import LoadRequest, load_model
from .inference import load, prompt_ids, read_run

# bf16 logits near the 30.0 soft-cap are spaced 0.125 apart; merged weights are rounded to bf16 once more.
LOGIT_TOLERANCE = 0.5
CHECK_PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "144."},
     {"role": "user", "content": "And 13 times 13?"}],
]


def merge(adapter: str, output: str, model: str | None = None, echo=print) -> dict:
    """Merge a run's LoRA into its base (in the run's precision) and write it to `output` (a new folder),
    self-checked.

    Returns the merge report (also written as merge.json). Raises UserError: an existing target, a
    full fine-tune, a base that doesn't fit, or a failed self-check (nothing is written then).
    """
    import torch

    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out}: already exists and is not empty; choose a new folder (nothing was written)")
    run = read_run(adapter, model)
    if not run.is_adapter:
        raise UserError(f"--adapter {adapter}: a full fine-tune; its folder already is a complete model")
    was_4bit = bool(run.config and run.config.quantization.load_in_4bit)
    dtype = run.config.model.dtype if run.config else "bfloat16"
    if was_4bit:
        echo(f"the run trained 4-bit NF4 QLoRA: the base is loaded unquantized in {dtype} for the merge; "
             f"the merged model is {dtype}")
    loaded = load(run, "bf16", dtype)
    peft_model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [prompt_ids(p, tokenizer, run.system_policy, loaded.family).to(peft_model.device) for p in CHECK_PROMPTS]
    with torch.no_grad():
        reference = [peft_model(input_ids=ids, use_cache=False).logits.float() for ids in prompts]
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True  # training turned it off; serving wants it
    end = tokenizer.convert_tokens_to_ids(END)
    merged.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    if not tokenizer.chat_template:
        tokenizer.chat_template = chat_template(loaded.family)

    with staged_dir(out) as tmp:  # nothing reaches `out` unless the self-check passes
        merged.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        check = _check(tmp, prompts, reference, run.attn_implementation, dtype)
        report = {"base_model": run.base_model, "adapter": str(run.path), "trained_in_4bit": was_4bit,
                  "merged_dtype": dtype, "check": check}
        (tmp / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
        if not check["passed"]:
            raise UserError(f"merge self-check failed: max |logit difference| {check['max_abs_logit_diff']:.4f} > "
                            f"{LOGIT_TOLERANCE} (or top-1 tokens differ); nothing was written to {out}")
    echo(f"merged: {out}/ — logits vs base + adapter on {len(prompts)} prompts: max |difference| "
         f"{check['max_abs_logit_diff']:.4f} (tolerance {LOGIT_TOLERANCE}), top-1 tokens agree "
         f"{check['top1_agreement']:.1%}")
    return report


def _check(folder: Path, prompts, reference, kernel: str, dtype: str) -> dict:
    """Reload what was written (as a server would, through the checked loading path) and compare its
    logits with base + adapter."""
    import torch

    reloaded, _ = load_model(LoadRequest(str(folder), dtype=dtype, attn_implementation=kernel))
    reloaded.to(reference[0].device)
    diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for ids, ref in zip(prompts, reference):
            got = reloaded(input_ids=ids, use_cache=False).logits.float()
            diff = max(diff, (got - ref).abs().max().item())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[1]
    top1 = agree / total
    return {"max_abs_logit_diff": diff, "tolerance": LOGIT_TOLERANCE, "top1_agreement": top1,
            "prompts": len(prompts), "passed": diff <= LOGIT_TOLERANCE and top1 >= 0.95}

"""`gemma2-tune merge`: fold the LoRA adapter into the base weights, save for serving, check the result.

The merged model has the precision the run trained in (model.dtype: bf16 by default, float32 for the CPU
recipes). A 4-bit QLoRA run's base is reloaded unquantized in that precision (merging into 4-bit weights
would round the adapter away). Before anything reaches the target folder, the merged model's logits are
compared with base + adapter on a few prompts, within a bound measured from that precision's own noise
(after/selfcheck.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..files import clean_stale_staging, staged_dir, writable_problem
from ..models.loading import LoadRequest, load_model
from ..models.serving import stop_ids
from ..models.tokenizer_files import save_tokenizer
from . import selfcheck
from .inference import load, read_run


def merge(adapter: str, output: str, model: str | None = None, dtype: str | None = None, echo=print) -> dict:
    """Merge a run's LoRA into its base and write it to `output` (a new folder), self-checked.

    `dtype`: of the merged weights (default: the run's model.dtype). Two comparisons on the written folder,
    reloaded as a server would: against the same unquantized base + adapter computed in float32 (bounded by the
    noise floor measured for `dtype`: how far base + adapter itself moves when computed in `dtype`; see
    selfcheck), and, for a QLoRA run, against the model that was trained (4-bit base + adapter; reported, not
    bounded: it differs from any unquantized model by the base's NF4 quantization error, which a merge cannot
    remove). Staging folders of `output` left by a killed earlier merge are removed first (said through
    `echo`). Returns the report (also merge.json). Raises UserError: an existing target, a full fine-tune, a
    base that doesn't fit, or a failed bounded check (nothing is written then).
    """
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out}: already exists and is not empty; choose a new folder (nothing was written)")
    problem = writable_problem(out)
    if problem:
        raise UserError(f"--output {out}: cannot create it ({problem})")
    run = read_run(adapter, model)
    if not run.is_adapter:
        raise UserError(f"--adapter {adapter}: a full fine-tune; its folder already is a complete model")
    for folder, size in clean_stale_staging(out):
        echo(f"removed {folder}: the staging folder of an earlier, interrupted merge into {out} "
             f"({size / 2**30:.2f} GiB)")
    was_4bit = bool(run.config and run.config.quantization.load_in_4bit)
    dtype = dtype or (run.config.model.dtype if run.config else "bfloat16")
    trained_logits = None
    if was_4bit:
        echo(f"the run trained 4-bit NF4 QLoRA: the merged model is the unquantized base ({dtype}) + adapter; "
             "comparing it with the trained 4-bit model too")
        trained = load(run, "as-trained")
        trained_logits = selfcheck.logits(trained.model, _prompts(run, trained))
        del trained
    loaded = load(run, "auto", dtype)
    peft_model, tokenizer = loaded.model, loaded.tokenizer
    prompts = _prompts(run, loaded)
    reference = selfcheck.fp32_logits(peft_model, prompts)  # the function the merge must keep
    floor = selfcheck.compare(selfcheck.logits(peft_model, prompts), reference)  # what `dtype` alone does to it
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True  # training turned it off; serving wants it
    if getattr(merged, "generation_config", None) is not None:  # a reward model (one score per sequence) does not generate
        merged.generation_config.eos_token_id = stop_ids(tokenizer)
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    head = run.head

    with staged_dir(out, echo=echo) as tmp:  # nothing reaches `out` unless the bounded check passes
        merged.save_pretrained(tmp, max_shard_size="5GB")
        save_tokenizer(tokenizer, tmp)  # with the run's generated chat template and its SentencePiece model
        if loaded.images is not None:  # the image processor the run trained with: chat, serve and export read it
            loaded.images.save(tmp)
        got = _reloaded_logits(tmp, prompts, run.attn_implementation, dtype, head)
        check = selfcheck.verdict(selfcheck.compare(got, reference), floor, dtype)
        check = {"against": f"unquantized base + adapter, computed in float32 (merged in {dtype})"} | check
        report = {"base_model": run.base_model, "adapter": str(run.path), "trained_in_4bit": was_4bit,
                  "merged_dtype": dtype, "check": check}
        if trained_logits is not None:
            report["trained_model_check"] = selfcheck.compare(got, trained_logits) | {
                "against": "the trained model (4-bit NF4 base + adapter)", "bounded": False}
        (tmp / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
        if not check["passed"]:
            hint = "; merging in float32 (--dtype float32) keeps the adapter's small updates" if dtype != "float32" else ""
            raise UserError(f"merge self-check failed against the {check['against']}: {selfcheck.describe(check)}; "
                            f"the merged model moved beyond {selfcheck.FLOOR_FACTOR:g} times {dtype}'s own noise "
                            f"(a wrong LoRA scaling, a module left out, another base){hint}; nothing was written "
                            f"to {out}")
    echo(f"merged: {out}/ ({dtype})")
    echo(f"  vs {check['against']}: {selfcheck.describe(check)}")
    if "trained_model_check" in report:
        t = report["trained_model_check"]
        top1 = f", top-1 tokens agree {t['top1_agreement']:.1%}" if t["outputs"] > 1 else ""
        what = "logit" if t["outputs"] > 1 else "score"
        echo(f"  vs {t['against']}: max |{what} difference| {t['max_abs_logit_diff']:.4f}{top1} (not bounded: the "
             "base's 4-bit quantization error, which no merge removes)")
    return report


def _prompts(run, loaded) -> list:
    return selfcheck.prompts(loaded.tokenizer, run.system_policy, loaded.family, loaded.model.device)


def _reloaded_logits(folder: Path, prompts, kernel: str, dtype: str, head: str = "causal-lm") -> list:
    """Reload what was written (as a server would, through the checked loading path, with the run's head: a
    reward model's scores are (1, 1) logits) and score the prompts."""
    reloaded, _ = load_model(LoadRequest(str(folder), dtype=dtype, attn_implementation=kernel, head=head))
    reloaded.to(prompts[0].device)
    return selfcheck.logits(reloaded, prompts)

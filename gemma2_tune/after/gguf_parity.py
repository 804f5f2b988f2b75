"""Parity of an exported GGUF with transformers: does the file, run by llama.cpp, compute what the trained model
computes? Measured, then bounded by floors measured on the same positions, then decided.

Measured on PARITY_PROMPTS, each rendered by our renderer (which the GGUF's template must reproduce):
- the reference: the exported folder in transformers, float32, eager attention: its prompt ids, its greedy
  continuation of each prompt (up to GREEDY_TOKENS, or to a stop token: <end_of_turn>/<eos>; Gemma 4's <turn|>/<eos>/
  <|tool_response>), and its logits teacher-forced over
  prompt + continuation (after the final soft-cap);
- the file in llama.cpp (llama-cpp-python): the prompt ids it makes (as its servers do: the template's text
  without its <bos>, BOS added as the GGUF says), its own greedy continuation, its logits on the same positions;
- for a quantized file: the quantized reference, the exported folder in transformers with each weight matrix rounded
  to the type llama.cpp gave its tensor in the file (by ggml's own quantizer, after/ggml_quant.py; only the types
  are read from the file, not its weights), float32; and two floors on the same positions: the unquantized GGUF
  the quantizer read (the converter's output, in the weights' own precision) run by llama.cpp, its distance to the
  reference being llama.cpp's own arithmetic (kernels, float16 KV cache); and the quantized reference with each
  matrix product's input rounded as ggml-cpu rounds it for that weight type (8-bit blocks), its distance to the
  quantized reference being that rounding's.

Compared per position over the vocabulary: KL divergence from the reference's next-token distribution (nats;
llama.cpp's own measure of a quantization, `llama-perplexity --kl-divergence`), max and mean |logit difference|,
top-1 agreement.

Bounds (every type): prompt ids equal; llama.cpp ends generation at every stop token (the family's end of turn). f32/f16/bf16, and the
unquantized GGUF behind a quantized one: greedy continuations equal token for token, or parting only at a near-tie
the file's arithmetic explains (NEAR_TIE_LOGIT_DIFF; reported in the bound's `near_ties`). A quantized file: its mean KL
divergence and max |logit difference| from the quantized reference each at most FLOOR_FACTOR x (the two floors) +
SLACK: the file must compute the quantized model, up to llama.cpp's arithmetic. What the quantization itself costs
(the file and the quantized reference against the reference) is reported, not bounded: it is the type's, chosen by
the user; bounding the file against the quantized reference keeps the check sharp where a type costs much (a
weight matrix zeroed in the 270M's q4_k_m file stayed within 4x of what q4_k_m itself costs). Top-1 agreement is
reported: near-ties between a small model's logits flip top-1 tokens under any rounding (a 270M run's own bfloat16
noise floor agrees at 93%), so it bounds nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.turns import BOS, end_of_turn, normalise, render
from ..families import Family

PARITY_PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Write about the sea."}],
    [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "144."},
     {"role": "user", "content": "And 13 times 13?"}],
    [{"role": "user", "content": "Grüße aus Köln — 東京 😀: translate the first two words."}],
]
GREEDY_TOKENS = 32
EXACT_TYPES = ("f32", "f16", "bf16")  # greedy continuations must equal transformers'
BOUNDED = ("mean_kl_divergence", "max_abs_logit_diff")
# llama.cpp's arithmetic and its input rounding add up: KL divergence is quadratic in small logit changes, so two
# error sources of the floors' size give at most 2x their sum when aligned (|logit difference| adds linearly: also
# at most 2x); 4 leaves 2x for the input rounding landing differently in the two engines (measured file / floors:
# 0.81-1.01 on the 270M, q8_0 and q4_k_m). A damaged tensor or a wrong graph moves the logits by far more
# (tests/e2e/test_export.py).
FLOOR_FACTOR = 4.0
SLACK = {"mean_kl_divergence": 1e-6, "max_abs_logit_diff": 1e-3}  # float32 summation order alone: ~1e-5 logits
# A greedy continuation may leave transformers' only at a near-tie the file's arithmetic explains: where the reference's
# own margin between its token and the file's is at most twice the file's largest |logit difference| at that position
# (each of the two logits moved by at most that), and that difference is small: f16 weights move a tiny model's logits
# by up to 0.1 (measured, tiny Gemma 4), a damaged tensor by whole units. Random tiny models have margins of 0.003.
NEAR_TIE_LOGIT_DIFF = 0.25
NAMES = {"mean_kl_divergence": "mean KL divergence", "max_abs_logit_diff": "max |logit difference|"}


@dataclass
class Reference:
    """The exported folder in transformers: rendered prompts, their ids, greedy continuations and logits
    ((positions, vocab) float32 per prompt, over prompt + continuation), and the model (for
    `quantized_reference`)."""

    texts: list[str]
    ids: list[list[int]]
    continuations: list[list[int]]
    logits: list[np.ndarray]
    answers: list[str]
    end_id: int  # the family's end of turn (<end_of_turn>; Gemma 4: <turn|>)
    model: Any
    stop: list[int] = field(default_factory=list)  # every id generation stops at (models/serving.stop_ids)
    problems: list[str] = field(default_factory=list)

    def sequence(self, i: int) -> list[int]:
        return self.ids[i] + self.continuations[i]


@dataclass
class GgufRun:
    """One GGUF run by llama.cpp on the reference's positions."""

    ids: list[list[int]]  # the prompts as llama.cpp tokenizes them
    continuations: list[list[int]]  # its own greedy continuations
    logits: list[np.ndarray]  # teacher-forced over the reference's prompt + continuation
    answers: list[str]
    end_is_eog: bool
    bos: int


def measure_reference(folder: Path, family: Family, policy: str, template: str,
                      empty_thought: bool = False) -> Reference:
    """Load `folder` in transformers (float32, eager) and measure it on PARITY_PROMPTS, rendered in `family`'s turn
    format (`empty_thought`: Gemma 4's empty thought block after the generation prompt, as the template writes it);
    generation stops where serving stops (models/serving.stop_ids: <eos> and the end of turn; Gemma 4 also
    <|tool_response>)."""
    import torch

    from ..models.loading import LoadRequest, load_model, load_tokenizer
    from ..models.serving import stop_ids

    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = template
    model, _ = load_model(LoadRequest(str(folder), dtype="float32", attn_implementation="eager"))
    model.eval()
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn(family))
    stop = stop_ids(tokenizer)
    texts, problems = [], []
    for messages in PARITY_PROMPTS:
        text = render(normalise(messages, policy, allow_open_end=True, family=family), add_generation_prompt=True,
                      family=family, empty_thought=empty_thought).text
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered != text:  # the GGUF's template must reproduce the training renderer
            problems.append(f"the GGUF's chat template renders prompt {len(texts)} differently from our renderer")
        texts.append(text)
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    continuations = []
    for prompt in ids:
        with torch.no_grad():
            generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                       eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        continuations.append(generated[0, len(prompt):].tolist())
    reference = Reference(texts, ids, continuations, [], [tokenizer.decode(c, skip_special_tokens=True)
                                                         for c in continuations], end_id, model, stop, problems)
    reference.logits = transformers_logits(model, reference, len(tokenizer))
    return reference


def transformers_logits(model, reference: Reference, n_vocab: int) -> list[np.ndarray]:
    """`model`'s float32 logits over each prompt + continuation, the first `n_vocab` columns."""
    import torch

    out = []
    for i in range(len(reference.ids)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([reference.sequence(i)]), use_cache=False).logits
        out.append(logits[0, :, :n_vocab].float().numpy())
    return out


def measure_gguf(path: Path, reference: Reference) -> GgufRun:
    """Run the GGUF in llama.cpp on the reference's prompts: tokenize, generate greedily, score the reference's
    positions."""
    from llama_cpp import Llama, llama_vocab_is_eog

    n_ctx = max(len(ids) for ids in reference.ids) + GREEDY_TOKENS + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                n_threads=os.cpu_count() or 1, seed=0)
    try:
        vocab = llm._model.vocab
        add_bos = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        n_vocab = min(llm.n_vocab(), reference.logits[0].shape[-1])
        # every stop id must end llama.cpp's generation too (Gemma 4: <eos> <turn|> <|tool_response>)
        ends = all(llama_vocab_is_eog(vocab, i) for i in {reference.end_id, *reference.stop})
        run = GgufRun([], [], [], [], bool(ends), llm.token_bos())
        for i, text in enumerate(reference.texts):
            run.ids.append(llm.tokenize(text[len(BOS):].encode(), add_bos=add_bos, special=True))
            llm.reset()
            llm.eval(run.ids[-1])
            new: list[int] = []
            while len(new) < GREEDY_TOKENS:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1, :n_vocab]))
                new.append(token)
                if llama_vocab_is_eog(vocab, token):
                    break
                llm.eval([token])
            run.continuations.append(new)
            run.answers.append(llm.detokenize(new, special=False).decode("utf-8", "replace"))
            sequence = reference.sequence(i)
            llm.reset()
            llm.eval(sequence)
            # a copy: llm.scores is llama-cpp-python's buffer, overwritten by the next eval
            run.logits.append(np.array(llm.scores[: len(sequence), :n_vocab], dtype=np.float32, copy=True))
    finally:
        llm.close()  # its destructor raises at interpreter shutdown otherwise
    return run


@dataclass
class Quantized:
    """The measures a quantized file is held to (see the module's docstring): the unquantized GGUF in llama.cpp,
    the quantized reference's logits, the same with each product's input rounded, and how many weight matrices
    got each type ("not in the file": a weight llama.cpp does not use)."""

    unquantized: GgufRun
    weights_rounded: list[np.ndarray]
    inputs_rounded: list[np.ndarray]
    tensor_types: dict[str, int]


def measure_quantized(reference: Reference, gguf_file: Path, unquantized: Path) -> Quantized:
    """Run `unquantized` in llama.cpp and compute the quantized reference of `gguf_file` in transformers. Changes
    the reference model in place (call it last)."""
    unquantized_run = measure_gguf(unquantized, reference)
    weights, inputs, types = quantized_reference(reference, gguf_file)
    return Quantized(unquantized_run, weights, inputs, types)


def quantized_reference(reference: Reference, gguf_file: Path) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """The reference's logits with each weight matrix rounded to the type `gguf_file` gives its tensor (ggml's
    quantizer, then dequantized: after/ggml_quant.py), float32; then the same with each product's input rounded as
    ggml-cpu rounds it for that type. Only the types are read from the file. Changes the reference model in place.
    Returns both logits and the count of weight matrices per type."""
    import gguf
    import torch
    from gguf import GGUFReader

    from .ggml_quant import round_activations, round_trip

    reader = GGUFReader(str(gguf_file))
    types = {t.name: t.tensor_type for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     reference.model.config.get_text_config().num_hidden_layers)
    counts: Counter = Counter()
    rounded: dict[int, str] = {}  # id(weight) -> its ggml type's name (a tied output head shares the embedding's)
    with torch.no_grad():
        for name, param in reference.model.named_parameters():
            if param.ndim != 2:  # norms: float32 in every llama.cpp type
                continue
            qtype = types.get(file_tensor_name(names, name) or "")
            if qtype is None:
                counts["not in the file"] += 1
                continue
            param.copy_(torch.from_numpy(round_trip(param.detach().cpu().float().numpy(), qtype)))
            rounded[id(param)] = qtype.name
            counts[qtype.name.lower()] += 1
    n_vocab = reference.logits[0].shape[-1]
    weights_rounded = transformers_logits(reference.model, reference, n_vocab)
    hooks = [module.register_forward_pre_hook(
                 lambda _, args, kind=rounded[id(module.weight)]: (round_activations(args[0], kind), *args[1:]))
             for module in reference.model.modules()
             if isinstance(module, torch.nn.Linear) and id(module.weight) in rounded]
    try:
        inputs_rounded = transformers_logits(reference.model, reference, n_vocab)
    finally:
        for hook in hooks:
            hook.remove()
    return weights_rounded, inputs_rounded, dict(counts)


def file_tensor_name(names, parameter: str) -> str | None:
    """The GGUF tensor llama.cpp's converter writes for transformers' `parameter` (`names`: gguf's tensor name map
    of the architecture), None for a parameter it does not write. An image + text checkpoint's decoder weights
    (model.language_model.*) are named as a text model's (model.*), as the converter names them; its image tower
    goes to another file."""
    if parameter.startswith("model.language_model."):
        parameter = "model." + parameter[len("model.language_model."):]
    return names.get_name(parameter, try_suffixes=(".weight", ".bias"))


# --- compare -------------------------------------------------------------------------------------------------

def compare(got: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    """Per prompt and over all positions: mean KL divergence of `got`'s next-token distribution from the
    reference's (nats per position), max and mean |logit difference|, top-1 agreement (a share), positions.
    Both lists hold (positions, vocab) arrays; `got` may have fewer vocab columns (the rest are ignored)."""
    per_prompt = []
    for g, r in zip(got, reference):
        n = min(g.shape[-1], r.shape[-1])
        g64, r64 = g[:, :n].astype(np.float64), r[:, :n].astype(np.float64)
        log_r, log_g = _log_softmax(r64), _log_softmax(g64)
        kl = (np.exp(log_r) * (log_r - log_g)).sum(-1)
        diff = np.abs(g64 - r64)
        per_prompt.append({"positions": int(r.shape[0]), "kl_sum": float(kl.sum()),
                           "max_abs_logit_diff": float(diff.max()), "abs_sum": float(diff.mean(-1).sum()),
                           "top1_agree": int((g64.argmax(-1) == r64.argmax(-1)).sum())})
    positions = sum(p["positions"] for p in per_prompt)
    return {"mean_kl_divergence": sum(p["kl_sum"] for p in per_prompt) / positions,
            "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in per_prompt),
            "mean_abs_logit_diff": sum(p["abs_sum"] for p in per_prompt) / positions,
            "top1_agreement": sum(p["top1_agree"] for p in per_prompt) / positions, "positions": positions,
            "per_prompt": per_prompt}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _figures(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("mean_kl_divergence", "max_abs_logit_diff", "mean_abs_logit_diff",
                                    "top1_agreement", "positions")}


# --- bound and decide ----------------------------------------------------------------------------------------

def quantized_figures(reference: Reference, run: GgufRun, quantized: Quantized) -> dict[str, Any]:
    """The report's section on a quantized file: the tensor types, what the weights' rounding costs, the file
    against the quantized reference, and the floors."""
    return {
        "quantized_reference": "transformers, the exported folder with each weight matrix rounded to its tensor's "
                               "type in the file by ggml's quantizer, float32",
        "tensor_types": quantized.tensor_types,
        "weight_rounding": _figures(compare(quantized.weights_rounded, reference.logits)),  # the type's cost
        "file_vs_quantized_reference": _figures(compare(run.logits, quantized.weights_rounded)),  # bounded
        "floors": {
            "unquantized_gguf": {"what": "the unquantized GGUF the quantizer read, in llama.cpp, against the reference",
                                 "greedy_equal": len(reference.ids) - len(greedy_differences(quantized.unquantized,
                                                                                             reference))}
                                | _figures(compare(quantized.unquantized.logits, reference.logits)),
            "input_rounding": {"what": "the quantized reference with each product's input rounded as ggml-cpu rounds "
                                       "it, against the quantized reference"}
                              | _figures(compare(quantized.inputs_rounded, quantized.weights_rounded)),
        },
    }


def quantized_bound(floors: dict[str, dict]) -> dict[str, Any]:
    """The limits for a quantized file's distance to the quantized reference: FLOOR_FACTOR x (the unquantized
    GGUF's distance to the reference + the input rounding's) + SLACK, for each BOUNDED measure."""
    engine, inputs = floors["unquantized_gguf"], floors["input_rounding"]
    limits = {k: FLOOR_FACTOR * (engine[k] + inputs[k]) + SLACK[k] for k in BOUNDED}
    return limits | {"floor_factor": FLOOR_FACTOR, "slack": dict(SLACK),
                     "derived": f"{FLOOR_FACTOR:g} x (the unquantized GGUF's distance to transformers + the input "
                                "rounding's, measured on the same positions) + slack"}


def greedy_differences(run: GgufRun, reference: Reference) -> list[int]:
    """The prompts whose greedy continuations differ between `run` and the reference."""
    return [i for i, (a, b) in enumerate(zip(run.continuations, reference.continuations)) if a != b]


def near_tie(run: GgufRun, reference: Reference, i: int) -> dict | None:
    """Where prompt `i`'s greedy continuations part, whether the flip is a near-tie the file's arithmetic explains
    (NEAR_TIE_LOGIT_DIFF): {token, margin, logit_diff, explained}; None where they do not part at a token (equal, or
    one stopped where the other went on without a different token)."""
    k = first_difference(run.continuations[i], reference.continuations[i])
    if k is None or k >= min(len(run.continuations[i]), len(reference.continuations[i])):
        return None
    row = len(reference.ids[i]) + k - 1  # the logits predicting continuation token k (teacher-forced, same prefix)
    ours, theirs = reference.continuations[i][k], run.continuations[i][k]
    ref_row, run_row = reference.logits[i][row], run.logits[i][row]
    margin = float(ref_row[ours] - ref_row[theirs])
    diff = float(np.abs(run_row - ref_row).max())
    return {"token": k, "margin": margin, "logit_diff": diff,
            "explained": margin <= 2 * diff and diff <= NEAR_TIE_LOGIT_DIFF}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (the shorter one's length when one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def decide(quant: str, reference: Reference, run: GgufRun, quantized: dict | None,
           unquantized_run: GgufRun | None, outtype: str | None) -> dict[str, Any]:
    """The bounds for `quant` applied to the measurements (`quantized`: `quantized_figures`, for a quantized
    type). Returns {bound, passed, failure}."""
    problems = list(reference.problems)
    if not run.end_is_eog:
        problems.append(f"llama.cpp does not end generation at every stop token of the model (ids {sorted(set(reference.stop))})")
    bad_ids = [i for i, (a, b) in enumerate(zip(run.ids, reference.ids)) if a != b]
    if bad_ids:
        problems.append(f"prompt ids differ from transformers' on prompt(s) {bad_ids}")
    exact = unquantized_run if quant not in EXACT_TYPES else run
    what = quant if quant in EXACT_TYPES else f"the unquantized {outtype} GGUF the quantizer read"
    diverged = greedy_differences(exact, reference) if exact is not None else []
    ties = {i: near_tie(exact, reference, i) for i in diverged}
    diverged = [i for i in diverged if not (ties[i] and ties[i]["explained"])]
    if diverged:
        i = diverged[0]
        tie = ties[i]
        problems.append(f"{what}: greedy continuations differ on prompt(s) {diverged} (first at token "
                        f"{first_difference(exact.continuations[i], reference.continuations[i])}"
                        + (f": transformers' margin between the two tokens {tie['margin']:.4f}, the file's |logit "
                           f"difference| there {tie['logit_diff']:.4f}, not a near-tie it explains" if tie else "")
                        + ")")
    equal = (f"greedy continuations equal token for token, up to a near-tie the file's arithmetic explains (the "
             f"reference's margin <= 2 x the file's |logit difference| there, itself <= {NEAR_TIE_LOGIT_DIFF})")
    if quant in EXACT_TYPES:
        bound = {"rule": f"{quant}: prompt ids equal, {equal}"}
    else:
        bound = {"rule": f"{quant}: prompt ids equal; the unquantized {outtype} GGUF's {equal}; against the {quant} "
                         f"reference, mean KL divergence and max |logit difference| within {FLOOR_FACTOR:g} x the "
                         "floors"}
        bound |= quantized_bound(quantized["floors"])
        if not set(quantized["tensor_types"]) - {"not in the file"}:  # else the quantized reference is the reference
            problems.append("no weight matrix of the model was found among the file's tensors: its quantized "
                            "reference cannot be computed")
        measured = quantized["file_vs_quantized_reference"]
        over = [f"{NAMES[key]} {measured[key]:.4g} exceeds its bound {bound[key]:.4g}" for key in BOUNDED
                if not measured[key] <= bound[key]]  # NaN (a tensor decoding to non-finite values) fails too
        if over:
            problems.append(f"against the {quant} reference, {' and '.join(over)} over {measured['positions']} "
                            f"positions (the bound: {bound['derived']}); the file computes something other than "
                            f"the {quant} model")
    bound["near_ties"] = {str(i): tie for i, tie in ties.items() if tie and tie["explained"]}
    return {"bound": bound, "passed": not problems, "failure": "; ".join(problems) or None}


# --- the check -----------------------------------------------------------------------------------------------

def check_parity(gguf_file: Path, folder: Path, family: Family, policy: str, template: str, quant: str,
                 echo: Callable[[str], None], unquantized: Path | None = None, outtype: str | None = None,
                 empty_thought: bool = False) -> dict:
    """Measure `gguf_file` (type `quant`) against `folder` in transformers and decide (see the module's
    docstring). `unquantized`: for a quantized type, the GGUF the quantizer read (type `outtype`). Returns the
    report: the file's figures against the reference (per prompt and overall); for a quantized type, `quantized`
    (its figures against the quantized reference, the floors); the bound it was held to, `passed`, `failure`
    (None or why)."""
    reference = measure_reference(folder, family, policy, template, empty_thought)
    run = measure_gguf(gguf_file, reference)
    metrics = compare(run.logits, reference.logits)
    quantized, unquantized_run = None, None
    if quant not in EXACT_TYPES:
        measured = measure_quantized(reference, gguf_file, unquantized)
        quantized, unquantized_run = quantized_figures(reference, run, measured), measured.unquantized
    prompts = [{
        "prompt_tokens": len(reference.ids[i]), "prompt_ids_equal": run.ids[i] == reference.ids[i],
        "double_bos": len(run.ids[i]) > 1 and run.ids[i][1] == run.ids[i][0] == run.bos,
        "greedy_tokens": len(reference.continuations[i]),
        "greedy_equal": run.continuations[i] == reference.continuations[i],
        "first_difference": first_difference(run.continuations[i], reference.continuations[i]),
        "llama_cpp_answer": run.answers[i], "transformers_answer": reference.answers[i],
        "stopped_at_end_of_turn": bool(run.continuations[i]) and run.continuations[i][-1] == reference.end_id,
        "positions": p["positions"], "top1_agree": p["top1_agree"], "max_abs_logit_diff": p["max_abs_logit_diff"],
        "mean_kl_divergence": p["kl_sum"] / p["positions"],
    } for i, p in enumerate(metrics["per_prompt"])]
    report = {"reference": "transformers, the exported folder in float32, eager attention", "prompts": prompts,
              "greedy_equal": sum(p["greedy_equal"] for p in prompts), "end_of_turn_ends_generation": run.end_is_eog,
              } | _figures(metrics)
    if quantized is not None:
        report["quantized"] = quantized
    report |= decide(quant, reference, run, quantized, unquantized_run, outtype)
    echo(describe(report, quant))
    return report


def describe(report: dict, quant: str) -> str:
    """One line: what was bounded and measured, against what."""
    prompts = report["prompts"]
    ids = sum(p["prompt_ids_equal"] for p in prompts)
    line = (f"parity ({report['bound']['rule']}): prompt ids equal on {ids}/{len(prompts)} prompts, greedy "
            f"continuations equal on {report['greedy_equal']}/{len(prompts)}, top-1 agreement "
            f"{report['top1_agreement']:.1%} of {report['positions']} positions, ")
    if "quantized" not in report:
        return line + (f"max |logit difference| {report['max_abs_logit_diff']:.4f}, mean KL divergence "
                       f"{report['mean_kl_divergence']:.3g}")
    bound, q = report["bound"], report["quantized"]
    measured, engine, inputs = q["file_vs_quantized_reference"], q["floors"]["unquantized_gguf"], q["floors"]["input_rounding"]
    return line + (f"mean KL divergence {report['mean_kl_divergence']:.3g} ({quant} weights alone in transformers: "
                   f"{q['weight_rounding']['mean_kl_divergence']:.3g}, top-1 {q['weight_rounding']['top1_agreement']:.1%}); "
                   f"against the {quant} reference: mean KL divergence {measured['mean_kl_divergence']:.3g} (bound "
                   f"{bound['mean_kl_divergence']:.3g}), max |logit difference| {measured['max_abs_logit_diff']:.4f} "
                   f"(bound {bound['max_abs_logit_diff']:.4f}); floors: the unquantized GGUF KL "
                   f"{engine['mean_kl_divergence']:.3g}, max {engine['max_abs_logit_diff']:.4f}, greedy equal "
                   f"{engine['greedy_equal']}/{len(prompts)}; input rounding KL {inputs['mean_kl_divergence']:.3g}, max "
                   f"{inputs['max_abs_logit_diff']:.4f}")

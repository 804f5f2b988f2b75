"""What `export` checks before it writes, without llama.cpp: the parity bound of a GGUF (after/gguf_parity.py) on
synthetic logits (what it measures, that a healthy quantized file is never refused for near-ties, that a broken
one is), and the metadata every GGUF must carry (our template, the soft-caps, the layer pattern llama.cpp runs).

The end-to-end cases (tiny models through llama.cpp: a Gemma 2 run, a damaged tensor) are in
tests/e2e/test_export.py; the real Gemma 3 270M's in tests/real/test_real_weights.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gemma2_tune.after import gguf_parity as gp

POSITIONS, VOCAB = 142, 64


def near_tie_logits(seed: int = 0) -> list[np.ndarray]:
    """Logits of a small model: at every position the two best tokens within 0.02 of each other (a 270M run's
    top-1 flips under any rounding at such positions)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (POSITIONS, VOCAB)).astype(np.float32)
    best = logits.argmax(-1)
    second = np.where(best == 0, 1, 0)
    logits[np.arange(POSITIONS), second] = logits[np.arange(POSITIONS), best] - rng.uniform(0, 0.02, POSITIONS)
    return [logits[:70], logits[70:]]


def perturbed(reference: list[np.ndarray], scale: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [r + rng.normal(0, scale, r.shape).astype(np.float32) for r in reference]


def reference_and_runs(file_logits, unquantized_logits, unquantized_greedy=None):
    ids, continuations = [[2, 4, 5], [2, 4, 6]], [[7, 8], [9]]
    reference = gp.Reference(["a", "b"], ids, continuations, near_tie_logits(), ["", ""], 5, model=None)
    run = gp.GgufRun(ids, continuations, file_logits, ["", ""], True, 2)
    unquantized = gp.GgufRun(ids, unquantized_greedy or continuations, unquantized_logits, ["", ""], True, 2)
    return reference, run, unquantized


def decided(quantization: float, file_offset: float, engine: float = 0.004, inputs: float = 0.01,
            unquantized_greedy=None, broken=None) -> tuple[dict, dict]:
    """A q8_0 decision on synthetic logits: the quantized reference moves the reference by `quantization` (the
    type's own cost), its input rounding by `inputs`; the file is the quantized reference plus llama.cpp's own
    input rounding and arithmetic (`inputs`, `engine`: independent draws) plus `file_offset` (a broken file)."""
    reference_logits = near_tie_logits()
    weights = perturbed(reference_logits, quantization, 1)
    file = perturbed(perturbed(weights, inputs, 2), engine, 3)
    if file_offset:
        file = perturbed(file, file_offset, 4)
    if broken is not None:
        broken(file)
    reference, run, unquantized = reference_and_runs(file, perturbed(reference_logits, engine, 5), unquantized_greedy)
    measured = gp.Quantized(unquantized, weights, perturbed(weights, inputs, 6), {"q8_0": 2})
    figures = gp.quantized_figures(reference, run, measured)
    return figures, gp.decide("q8_0", reference, run, figures, unquantized, "bf16")


def test_compare_measures_kl_divergence_logit_differences_and_top1():
    reference = near_tie_logits()
    same = gp.compare(reference, reference)
    assert same["mean_kl_divergence"] == pytest.approx(0, abs=1e-12) and same["max_abs_logit_diff"] == 0
    assert same["top1_agreement"] == 1 and same["positions"] == POSITIONS
    shifted = gp.compare([r + 3.0 for r in reference], reference)  # softmax ignores a constant shift
    assert shifted["mean_kl_divergence"] == pytest.approx(0, abs=1e-9) and shifted["top1_agreement"] == 1
    assert shifted["max_abs_logit_diff"] == pytest.approx(3.0) and shifted["mean_abs_logit_diff"] == pytest.approx(3.0)
    two = [np.log(np.array([[0.5, 0.5]])), np.log(np.array([[0.9, 0.1]]))]
    one = [np.log(np.array([[0.9, 0.1]])), np.log(np.array([[0.9, 0.1]]))]
    expected = (0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)) / 2  # KL(reference || got), nats per position
    assert gp.compare(one, two)["mean_kl_divergence"] == pytest.approx(expected)


@pytest.mark.parametrize("quantization", [0.02, 1.0])
def test_a_healthy_quantized_file_passes_whatever_its_type_costs(quantization):
    """The class of the 270M q8_0 refusal: top-1 agreement with the trained model well under 95% from near-ties
    alone (and far under it for a type that costs much, as q4_k_m on a 270M model), while the file computes the
    quantized model up to llama.cpp's input rounding and arithmetic."""
    figures, verdict = decided(quantization, 0)
    assert figures["weight_rounding"]["top1_agreement"] < 0.9  # a fixed 95% top-1 bound refused this
    assert verdict["passed"], verdict["failure"]
    bound, measured = verdict["bound"], figures["file_vs_quantized_reference"]
    assert bound["floor_factor"] == gp.FLOOR_FACTOR and "derived" in bound and "q8_0" in bound["rule"]
    floors = figures["floors"]
    for key in gp.BOUNDED:
        assert measured[key] <= bound[key] == pytest.approx(
            gp.FLOOR_FACTOR * (floors["unquantized_gguf"][key] + floors["input_rounding"][key]) + gp.SLACK[key])
    assert floors["unquantized_gguf"]["greedy_equal"] == 2 and figures["tensor_types"] == {"q8_0": 2}


@pytest.mark.parametrize("quantization", [0.02, 1.0])
def test_a_file_far_from_its_quantized_model_is_refused(quantization):
    """A damage as large as the type's own cost is refused even for a type that costs much: the file is held to
    the quantized model, not to 4x the quantization's cost."""
    _, verdict = decided(quantization, 0.1 + quantization / 4)
    assert not verdict["passed"]
    assert "against the q8_0 reference, mean KL divergence" in verdict["failure"]
    assert "exceeds its bound" in verdict["failure"] and "something other than the q8_0 model" in verdict["failure"]


def test_non_finite_logits_are_refused():
    def nan_row(file):
        file[1][5, :] = np.nan

    _, verdict = decided(0.02, 0, broken=nan_row)
    assert not verdict["passed"] and "exceeds its bound" in verdict["failure"]


def test_an_unquantized_gguf_that_already_differs_refuses_the_quantized_file():
    """The floor is llama.cpp's rounding only when the unquantized file computes the trained function: its greedy
    continuations must equal transformers' (the f16 bound), else a wrong graph would widen its own bound."""
    unlikely = int(near_tie_logits()[0][3].argmin())  # far below transformers' token there: no near-tie
    _, verdict = decided(0.02, 0, unquantized_greedy=[[7, unlikely], [9]])
    assert not verdict["passed"]
    assert "the unquantized bf16 GGUF the quantizer read: greedy continuations differ on prompt(s) [0]" in verdict["failure"]


def test_a_file_whose_tensors_name_no_weight_of_the_model_is_refused():
    """The quantized reference is the reference with each weight rounded to its tensor's type in the file: with no
    weight found there it would be the float reference, and the bound would not be the quantized model's."""
    reference, run, unquantized = reference_and_runs(near_tie_logits(), near_tie_logits())
    measured = gp.Quantized(unquantized, near_tie_logits(), near_tie_logits(), {"not in the file": 29})
    verdict = gp.decide("q8_0", reference, run, gp.quantized_figures(reference, run, measured), unquantized, "bf16")
    assert not verdict["passed"] and "no weight matrix of the model was found" in verdict["failure"]


def test_decoder_weights_of_an_image_and_text_checkpoint_map_to_the_files_tensors():
    """llama.cpp's converter writes a Gemma 3 image + text checkpoint's decoder (model.language_model.*) under a
    text model's tensor names; its image tower is not in the file."""
    gguf = pytest.importorskip("gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 6)
    for prefix in ("model.", "model.language_model."):
        assert gp.file_tensor_name(names, prefix + "layers.5.mlp.down_proj.weight") == "blk.5.ffn_down.weight"
        assert gp.file_tensor_name(names, prefix + "embed_tokens.weight") == "token_embd.weight"
    assert gp.file_tensor_name(names, "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") is None


def test_exact_types_need_equal_greedy_continuations():
    reference, run, _ = reference_and_runs(near_tie_logits(), near_tie_logits())
    assert gp.decide("f16", reference, run, None, None, None)["passed"]
    reference.logits[1][len(reference.ids[1]) - 1, 9] += 10.0  # transformers' token wins by far: no near-tie
    run.continuations = [[7, 8], [3]]
    verdict = gp.decide("f16", reference, run, None, None, None)
    assert not verdict["passed"] and "f16: greedy continuations differ on prompt(s) [1] (first at token 0" in verdict["failure"]
    run.ids = [[2, 2, 4, 5], [2, 4, 6]]
    assert "prompt ids differ from transformers' on prompt(s) [0]" in gp.decide("f16", reference, run, None, None,
                                                                                None)["failure"]



def flipped_at_a_tie(margin: float, file_shift: float) -> dict:
    """An f16 decision where the file's greedy continuation of prompt 1 takes token 3 instead of the reference's 9
    at its first token: the reference's margin between them `margin`, the file's logits there moved by `file_shift`
    (token 3 up, 9 down, as the file's arithmetic moves them)."""
    reference, run, _ = reference_and_runs(near_tie_logits(), near_tie_logits())
    row = len(reference.ids[1]) - 1  # the logits predicting continuation token 0
    ref_row = reference.logits[1][row]
    ref_row[:] = np.minimum(ref_row, 5.0)
    ref_row[9], ref_row[3] = 6.0, 6.0 - margin
    run.logits[1][row] = ref_row
    file_row = run.logits[1][row]
    file_row[3] += file_shift
    file_row[9] -= file_shift
    run.continuations = [[7, 8], [3]]
    return gp.decide("f16", reference, run, None, None, None)


def test_a_greedy_flip_at_a_near_tie_the_files_arithmetic_explains_passes_and_is_reported():
    """Random tiny models part at margins of thousandths of a logit, where any rounding flips the top token."""
    verdict = flipped_at_a_tie(margin=0.003, file_shift=0.01)
    assert verdict["passed"], verdict["failure"]
    tie = verdict["bound"]["near_ties"]["1"]
    assert tie["token"] == 0 and tie["margin"] == pytest.approx(0.003, abs=1e-5) and tie["explained"]


@pytest.mark.parametrize("margin,file_shift,why", [(0.5, 0.01, "margin"), (0.003, 1.0, "damaged")])
def test_a_flip_beyond_a_near_tie_or_by_a_damaged_file_is_refused(margin, file_shift, why):
    """A margin larger than twice the file's difference there, or a difference beyond NEAR_TIE_LOGIT_DIFF (a
    damaged tensor moves logits by whole units), is not explained by arithmetic."""
    verdict = flipped_at_a_tie(margin, file_shift)
    assert not verdict["passed"], why
    assert "greedy continuations differ on prompt(s) [1] (first at token 0: transformers' margin" in verdict["failure"]
    assert "not a near-tie it explains" in verdict["failure"]

# --- what the GGUF must carry (export.check_metadata) --------------------------------------------------------

TINY_GEMMA2 = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "num_hidden_layers": 4,
               "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"] * 2}


def gemma2_metadata(template: str) -> dict:
    return {"general.architecture": "gemma2", "tokenizer.chat_template": template,
            "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
            "gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
            "gemma2.attention.sliding_window": 32}


def failed_checks(metadata: dict) -> list[str]:
    from gemma2_tune.after.export import check_metadata
    from gemma2_tune.data.template import chat_template
    from gemma2_tune.families import GEMMA2

    checks = check_metadata(metadata, chat_template(GEMMA2, "fold"), TINY_GEMMA2, GEMMA2, terms=False)
    return [c["check"] for c in checks if not c["passed"]]


def test_a_gguf_carrying_what_it_must_passes():
    from gemma2_tune.data.template import chat_template
    from gemma2_tune.families import GEMMA2

    assert failed_checks(gemma2_metadata(chat_template(GEMMA2, "fold"))) == []


@pytest.mark.parametrize("broken, failed", [
    ({"tokenizer.chat_template": None}, "chat template (ours)"),  # our template missing: llama.cpp would guess one
    ({"tokenizer.chat_template": "{{ messages }}"}, "chat template (ours)"),
    ({"gemma2.final_logit_softcapping": None}, "final_logit_softcapping"),  # a soft-cap dropped
    ({"gemma2.final_logit_softcapping": 0.0}, "final_logit_softcapping"),  # llama.cpp skips a 0 cap
    ({"gemma2.attn_logit_softcapping": None}, "attn_logit_softcapping"),
    ({"gemma2.attention.sliding_window_pattern": [True, True, True, False]},  # the layer pattern wrong
     "sliding/global layers llama.cpp applies"),
    ({"tokenizer.ggml.add_bos_token": False}, "one <bos> (add_bos_token)"),
], ids=["template-missing", "template-other", "final-cap-dropped", "final-cap-zero", "attention-cap-dropped",
        "layer-pattern", "no-bos"])
def test_a_gguf_missing_what_it_must_carry_fails_its_check(broken, failed):
    from gemma2_tune.data.template import chat_template
    from gemma2_tune.families import GEMMA2

    metadata = gemma2_metadata(chat_template(GEMMA2, "fold"))
    for key, value in broken.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    assert failed_checks(metadata) == [failed]


# --- llama.cpp's quantized arithmetic in transformers (after/ggml_quant.py) -----------------------------------

def test_ggml_rounds_weights_as_gguf_py_reference_quantizers_do():
    """ggml's quantizer (through llama-cpp-python) and gguf-py's independent numpy implementation agree where
    gguf-py has one; every type lands within its format's step of the weights."""
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from gemma2_tune.after.ggml_quant import round_trip

    weights = np.random.default_rng(0).normal(0, 0.05, (64, 512)).astype(np.float32)
    for qtype in (T.Q8_0, T.Q5_0, T.Q4_0):
        assert np.array_equal(round_trip(weights, qtype), dequantize(quantize(weights, qtype), qtype))
    step = np.abs(weights).reshape(64, -1, 32).max(-1, keepdims=True)  # per block of 32
    for qtype, levels in ((T.Q8_0, 127), (T.Q6_K, 31), (T.Q4_K, 7)):
        error = np.abs(round_trip(weights, qtype) - weights).reshape(64, -1, 32)
        assert (error <= step / levels).all(), qtype  # within one step of a block scale
    assert np.array_equal(round_trip(weights, T.F32), weights)
    with pytest.raises(ValueError, match="not whole blocks"):
        round_trip(weights[:, :100], T.Q4_K)


def test_activations_round_as_ggml_cpu_rounds_a_products_input():
    """8 bits per block with the block's max as scale: blocks of 32 with a float16 scale as ggml's q8_0 (equal to
    ggml's own q8_0 quantizer on the same values), of 256 for the k-quants' q8_K; a large activation costs its
    whole block precision, as it does in llama.cpp."""
    import torch

    from gemma2_tune.after.ggml_quant import round_activations

    x = torch.tensor(np.random.default_rng(1).normal(0, 1, (3, 512)).astype(np.float32))
    x[0, 5] = 300.0  # one of Gemma's large activations
    for kind, block in (("Q8_0", 32), ("Q5_1", 32), ("Q4_K", 256)):
        error = (round_activations(x, kind) - x).abs().reshape(3, -1, block)
        step = x.abs().reshape(3, -1, block).amax(-1, keepdim=True) / 127
        assert (error <= 0.6 * step).all(), kind  # half a step, and the float16 scale's rounding
        assert error[0, 0].max() > 50 * error[1, 0].max(), kind  # the large activation's block
    if importlib.util.find_spec("llama_cpp") is not None:
        from gguf import GGMLQuantizationType as T

        from gemma2_tune.after.ggml_quant import round_trip

        assert np.array_equal(round_activations(x, "Q8_0").numpy(), round_trip(x.numpy(), T.Q8_0))
    assert torch.equal(round_activations(x, "F16"), x.half().float())
    assert torch.equal(round_activations(x, "BF16"), x.bfloat16().float())
    assert torch.equal(round_activations(x, "F32"), x)


def test_kv_sharing_as_transformers_and_llama_cpp_run_it():
    """transformers feeds a KV-shared layer from the last earlier layer of its kind; llama.cpp from the
    second-to-last (sliding) or last (global) layer before the shared ones. Equal for the published layout (E2B:
    35 layers, 4 sliding : 1 global, 20 shared), different for the tiny 2 : 1 shape."""
    from gemma2_tune.after.export import config_kv_reuse, llama_kv_reuse

    def both(types: list[str], shared: int) -> tuple[str, str | None]:
        config = {"layer_types": types, "num_hidden_layers": len(types), "num_kv_shared_layers": shared}
        metadata = {"gemma4.attention.shared_kv_layers": shared, "gemma4.block_count": len(types)}
        pattern = "".join("s" if t == "sliding_attention" else "g" for t in types)
        return config_kv_reuse(config), llama_kv_reuse(metadata, "gemma4", pattern)

    s, g = "sliding_attention", "full_attention"
    published = ([s] * 4 + [g]) * 7
    expected, found = both(published, 20)
    assert expected == found and expected.startswith("15<-13,16<-13,17<-13,18<-13,19<-14")
    assert both([s, s, g] * 2, 2) == ("4<-3,5<-2", "4<-2,5<-3")
    assert llama_kv_reuse({}, "gemma4", "ssg") is None

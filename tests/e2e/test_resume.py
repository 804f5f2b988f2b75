"""Checkpoints and resume: SIGTERM mid-run, SIGKILL mid-run, incomplete and foreign checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import ROOT
from gemma2_tune.cli import app

pytestmark = pytest.mark.slow
STEPS = 12
RUN = ["sft", "--recipe", "quickstart-cpu", "--max-steps", str(STEPS), "--set", "training.save_steps=4",
       "--set", "training.logging_steps=1"]
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*RUN, *args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    r = cli("-o", str(out))
    assert r.exit_code == 0, r.output
    return out


def start(out, log):
    cmd = [sys.executable, "-m", "gemma2_tune", *RUN, "-o", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "training ended before the signal could be sent"
        time.sleep(0.05)
    raise AssertionError("timed out")


def same_adapter(a, b):
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_sigterm_saves_a_checkpoint_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = start(out, log)
        wait_for(lambda: "step 5/" in log_path.read_text(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    text = log_path.read_text()
    assert "stopped by SIGTERM" in text and "--resume" in text and "Traceback" not in text
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    stopped_at = manifest["global_step"]
    assert 5 <= stopped_at < STEPS
    assert (out / f"checkpoint-{stopped_at}" / "complete.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no final output from an unfinished run

    r = cli("-o", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming from {out / f'checkpoint-{stopped_at}'}" in r.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["global_step"] == STEPS
    assert [a["status"] for a in manifest["attempts"]] == ["interrupted", "completed"]
    uninterrupted = json.loads((reference / "run.json").read_text())["throughput"]["supervised_tokens_trained"]
    assert manifest["throughput"]["supervised_tokens_trained"] == uninterrupted  # totals over both attempts
    r = cli("-o", str(out), "--resume")  # a completed run: nothing to resume, nothing touched
    assert r.exit_code == 2 and "there is nothing to resume" in r.output
    assert json.loads((out / "run.json").read_text()) == manifest
    assert same_adapter(reference, out) <= 1e-6


def test_sigkill_while_training_resumes_from_the_newest_complete_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    with (tmp_path / "log.txt").open("w") as log:
        proc = start(out, log)
        wait_for(lambda: (out / "checkpoint-8" / "complete.json").is_file(), proc)
        proc.kill()
        proc.wait(timeout=60)
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # what a killed run leaves
    r = cli("-o", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output
    assert json.loads((out / "run.json").read_text())["global_step"] == STEPS
    assert same_adapter(reference, out) <= 1e-6


def unfinished_copy(reference, out):
    """The reference run as if it had been stopped after its last checkpoint (a completed run has nothing to
    resume)."""
    shutil.copytree(reference, out)
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(manifest | {"status": "interrupted"}))


def test_incomplete_newer_checkpoint_is_skipped_and_refused_by_path(reference, tmp_path):
    out = tmp_path / "run"
    unfinished_copy(reference, out)
    # a checkpoint killed while being written: files present, no completion marker
    broken = out / "checkpoint-20"
    shutil.copytree(out / "checkpoint-8", broken)
    (broken / "complete.json").unlink()
    before = (out / "run.json").read_text()
    r = cli("-o", str(out), "--resume-from", str(broken))
    assert r.exit_code == 2 and "incomplete checkpoint" in r.output
    assert (out / "run.json").read_text() == before
    r = cli("-o", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "skipping checkpoint" in r.output and "incomplete: no complete marker" in r.output
    assert "checkpoint-12" in r.output


def test_checkpoint_of_a_different_recipe_is_refused(reference, tmp_path):
    out = tmp_path / "run"
    unfinished_copy(reference, out)
    before = (out / "run.json").read_text()
    r = cli("-o", str(out), "--resume", "--set", "lora.r=8")
    assert r.exit_code == 2 and "different config" in r.output and "lora.r: checkpoint 16, now 8" in r.output
    assert (out / "run.json").read_text() == before


def test_resume_without_checkpoints_or_run(tmp_path):
    r = cli("-o", str(tmp_path / "nothing"), "--resume")
    assert r.exit_code == 2 and "holds no gemma2-tune run" in r.output
    r = cli("-o", str(tmp_path / "x"), "--resume-from", str(tmp_path / "not-a-checkpoint"))
    assert r.exit_code == 2 and "not a checkpoint folder" in r.output

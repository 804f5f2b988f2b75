"""Nothing lost, nothing silent in training: divergence, damaged checkpoints, --overwrite, concurrent runs,
changed data on resume, killed attempts, output folders that cannot be made, full fine-tunes' stop tokens."""

import errno
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.errors import UserError

pytestmark = pytest.mark.slow
runner = CliRunner()
QUICK = ["sft", "--recipe", "quickstart-cpu", "--set", "training.logging_steps=1"]


def cli(*args):
    return runner.invoke(app, [*QUICK, *map(str, args)])


def interrupted(folder):
    """Make a completed run look like one stopped mid-training (what SIGTERM/SIGKILL leave), so it resumes."""
    manifest = json.loads((folder / "run.json").read_text())
    manifest["status"] = "running"
    manifest["attempts"][-1]["status"] = "running"  # a SIGKILLed attempt never recorded its end
    (folder / "run.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model_dir):
    """A completed 4-step run with checkpoints at steps 2 and 4, and its data file."""
    tmp = tmp_path_factory.mktemp("safety")
    data = tmp / "chats.jsonl"
    from gemma2_tune.data.sources import ALIASES

    shutil.copy(ALIASES["quickstart"].local / "messages.jsonl", data)
    out = tmp / "run"
    r = cli("-o", out, "--dataset", data, "--max-steps", 4, "--set", "training.save_steps=2")
    assert r.exit_code == 0, r.output
    return out, data


def test_divergence_stops_names_the_step_and_keeps_the_old_run(done, tmp_path):
    out, data = done
    run = tmp_path / "run"
    shutil.copytree(out, run)
    r = cli("-o", run, "--dataset", data, "--max-steps", 6, "--overwrite", "--set", "training.learning_rate=1e30",
            "--set", "training.save_steps=1")
    assert r.exit_code == 3, r.output
    assert "error: training diverged at step 2" in r.output and "loss 0.0000" not in r.output
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["diverged_at_step"] == 2
    assert manifest["last_finite_checkpoint"] == str(run / "checkpoint-1") and (run / "checkpoint-1").is_dir()
    assert not (run / "adapter_model.safetensors").exists() and not (run / "checkpoint-2").exists()
    # the completed run --overwrite replaced is kept aside, said how to restore, and refused without --overwrite
    kept = tmp_path / ".run.replaced"
    assert (kept / "adapter_model.safetensors").is_file() and "rm -rf" in r.output
    again = cli("-o", run, "--dataset", data, "--max-steps", 1)
    assert again.exit_code == 2 and str(kept) in again.output and "mv" in again.output
    # a completed --overwrite run removes it
    ok = cli("-o", run, "--dataset", data, "--max-steps", 1, "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert not kept.exists() and "removed the run this one replaced" in ok.output


def test_a_damaged_checkpoint_is_named_and_skipped(done, tmp_path):
    out, data = done
    run = tmp_path / "run"
    shutil.copytree(out, run)
    interrupted(run)
    adapter = run / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # what a power loss leaves
    r = cli("-o", run, "--dataset", data, "--max-steps", 4, "--set", "training.save_steps=2", "--resume")
    assert r.exit_code == 0, r.output
    assert f"skipping checkpoint {run / 'checkpoint-4'}: cannot be loaded" in r.output and "truncated" in r.output
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["resumed_from"] == str(run / "checkpoint-2") and manifest["status"] == "completed"
    # every attempt on record: the killed one, then this one
    assert [a["status"] for a in manifest["attempts"]] == ["killed", "completed"]


def test_damage_is_found_in_each_file_kind(done, tmp_path):
    from gemma2_tune.training.checkpoints import damage

    out, _ = done
    for name, breaking in (("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:-200])),
                           ("trainer_state.json", lambda p: p.unlink()),
                           ("adapter_model.safetensors", lambda p: p.write_bytes(b"\x00" * 16))):
        copy = tmp_path / name / "checkpoint-2"
        shutil.copytree(out / "checkpoint-2", copy)
        assert damage(copy) is None
        breaking(copy / name)
        assert name in damage(copy)
    legacy = tmp_path / "legacy" / "checkpoint-2"  # a marker without file sizes (written before they were kept)
    shutil.copytree(out / "checkpoint-2", legacy)
    marker = json.loads((legacy / "complete.json").read_text())
    del marker["files"]
    (legacy / "complete.json").write_text(json.dumps(marker))
    (legacy / "optimizer.pt").write_bytes((legacy / "optimizer.pt").read_bytes()[:-200])
    assert "optimizer.pt is not a readable torch file" in damage(legacy)


def test_resume_on_changed_data_is_refused_unless_allowed(done, tmp_path):
    out, data = done
    run = tmp_path / "run"
    shutil.copytree(out, run)
    interrupted(run)
    original = data.read_text()
    data.write_text(original + original.splitlines()[0] + "\n")  # the same file, one row more
    try:
        r = cli("-o", run, "--dataset", data, "--max-steps", 4, "--set", "training.save_steps=2", "--resume")
        assert r.exit_code == 2 and "the data changed since" in r.output and "--allow-data-change" in r.output
        marker = json.loads((run / "checkpoint-4" / "complete.json").read_text())
        assert marker["data_fingerprint"] in r.output
        r = cli("-o", run, "--dataset", data, "--max-steps", 4, "--set", "training.save_steps=2", "--resume",
                "--allow-data-change")
        assert r.exit_code == 0, r.output
    finally:
        data.write_text(original)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["data_changed_on_resume"]["checkpoint"] == marker["data_fingerprint"]
    assert manifest["attempts"][-1]["data_changed_on_resume"] is not None


def test_a_live_writer_locks_the_folder_and_a_stale_lock_is_taken_over(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    r = cli("-o", out, "--max-steps", 1)
    assert r.exit_code == 2 and f"another gemma2-tune process (pid {os.getpid()}" in r.output
    assert not out.exists()
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "since": "then"}))
    r = cli("-o", out, "--max-steps", 1)
    assert r.exit_code == 0, r.output
    assert "taking over a stale lock" in r.output and not lock.exists()


def test_output_folders_that_cannot_be_made_exit_2(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = cli("-o", blocker / "run", "--max-steps", 1)
    assert r.exit_code == 2 and f"output.dir {blocker / 'run'}: cannot create it ({blocker} is a file" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["merge", "--adapter", str(tmp_path), "--output", str(blocker / "merged")])
    assert r.exit_code == 2 and "cannot create it" in r.output


def test_a_full_disk_is_one_line_and_exit_2(monkeypatch, tmp_path):
    from gemma2_tune.files import disk_errors

    with pytest.raises(UserError, match="cannot write: the disk is full"):
        with disk_errors(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    with pytest.raises(OSError):  # anything else is not disguised
        with disk_errors(tmp_path):
            raise OSError(errno.EACCES, "denied")


def test_a_full_fine_tune_stops_at_end_of_turn_wherever_it_is_written(tmp_path, tiny_model_dir):
    out = tmp_path / "full"
    r = cli("-o", out, "--max-steps", 2, "--set", "lora.enabled=false", "--set", "quantization.load_in_4bit=false",
            "--set", "training.save_steps=1", "--set", "training.ema_decay=0.5")
    assert r.exit_code == 0, r.output
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    for folder in (out, out / "checkpoint-2", out / "ema"):
        generation = json.loads((folder / "generation_config.json").read_text())
        assert end in generation["eos_token_id"] and tok.eos_token_id in generation["eos_token_id"], folder
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True, folder

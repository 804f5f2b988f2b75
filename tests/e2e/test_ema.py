"""training.ema_decay: the average of the trainable weights, against a direct computation over the weights
seen at each optimizer step; carried by checkpoints so a resumed run ends with the same average."""

import json
import shutil

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.training.lifecycle import RunLifecycle

pytestmark = pytest.mark.slow
DECAY = 0.8  # small enough that every step visibly moves the average
STEPS = 6
RUN = ["sft", "--recipe", "quickstart-cpu", "--max-steps", str(STEPS), "--set", f"training.ema_decay={DECAY}",
       "--set", "training.save_steps=3", "--set", "training.save_total_limit=5", "--set", "training.logging_steps=1"]
runner = CliRunner()


class RecordWeights(TrainerCallback):
    """The trainable weights before the first step and after every optimizer step (float64 copies)."""

    def __init__(self):
        self.seen: list[dict] = []

    def _record(self, model):
        self.seen.append({n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(model)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_model_dir):
    recorder = RecordWeights()
    original = RunLifecycle.attach

    def attach(self, trainer):
        stop = original(self, trainer)
        trainer.add_callback(recorder)
        return stop

    patch = pytest.MonkeyPatch()
    patch.setattr(RunLifecycle, "attach", attach)
    try:
        out = tmp_path_factory.mktemp("ema") / "run"
        r = runner.invoke(app, [*RUN, "-o", str(out)])
    finally:
        patch.undo()
    assert r.exit_code == 0, r.output
    return out, recorder.seen


def saved_name(parameter_name: str) -> str:
    return parameter_name.replace(".default.", ".")  # PEFT saves without the adapter's name


def test_ema_equals_the_direct_average_of_the_weights_at_each_step(ema_run):
    out, seen = ema_run
    assert len(seen) == STEPS + 1  # theta_0 .. theta_6
    direct = dict(seen[0])
    for weights in seen[1:]:
        direct = {n: DECAY * direct[n] + (1 - DECAY) * weights[n] for n in direct}
    saved = load_file(str(out / "ema" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(saved_name(n) for n in direct)
    worst = max((saved[saved_name(n)].double() - v).abs().max().item() for n, v in direct.items())
    assert worst <= 1e-6
    # and it is neither the final weights nor the initial ones
    final = load_file(str(out / "adapter_model.safetensors"))
    assert max((saved[k].double() - final[k].double()).abs().max().item() for k in saved) > 1e-4
    assert max((saved[saved_name(n)].double() - v).abs().max().item() for n, v in seen[0].items()) > 1e-4
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["ema"]["decay"] == DECAY and manifest["ema"]["updates"] == STEPS
    assert (out / "ema" / "config.yaml").is_file() and (out / "ema" / "tokenizer.json").is_file()
    assert (out / "checkpoint-3" / "ema.safetensors").is_file()


def test_resumed_run_ends_with_the_same_average(ema_run, tmp_path):
    reference, _ = ema_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "ema")
    (out / "adapter_model.safetensors").unlink()
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(manifest | {"status": "interrupted"}))
    r = runner.invoke(app, [*RUN, "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    a = load_file(str(reference / "ema" / "adapter_model.safetensors"))
    b = load_file(str(out / "ema" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert json.loads((out / "run.json").read_text())["ema"]["updates"] == STEPS


def test_a_checkpoint_with_a_damaged_average_is_skipped_or_refused(ema_run, tmp_path):
    reference, _ = ema_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(manifest | {"status": "interrupted"}))
    newest = max((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    state = newest / "ema.safetensors"
    state.unlink()  # what a full disk or a lost file leaves
    r = runner.invoke(app, [*RUN, "-o", str(out), "--resume-from", str(newest)])
    assert r.exit_code == 2 and "ema.safetensors is missing" in r.output and "pick an earlier one" in r.output
    r = runner.invoke(app, [*RUN, "-o", str(out), "--resume"])  # --resume names it and takes an earlier one
    assert r.exit_code == 0, r.output
    assert f"skipping checkpoint {newest}: cannot be loaded" in r.output and "ema.safetensors is missing" in r.output


def test_ema_is_refused_under_zero3(tmp_path):
    r = runner.invoke(app, [*RUN, "-o", str(tmp_path / "run"), "--launch", "zero3", "--dry-run"])
    assert r.exit_code == 2 and "training.ema_decay" in r.output and "ZeRO-3" in r.output

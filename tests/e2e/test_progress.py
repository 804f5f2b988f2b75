"""The live progress bar: on a terminal (or forced) for rank 0 only; log lines unchanged otherwise."""

import io
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.training.progress import LiveProgress, bar_wanted


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_when_the_bar_is_shown(monkeypatch):
    monkeypatch.delenv("GEMMA2_TUNE_PROGRESS", raising=False)
    assert bar_wanted(Terminal()) and not bar_wanted(io.StringIO())
    assert not bar_wanted(Terminal(), main_process=False)
    monkeypatch.setenv("GEMMA2_TUNE_PROGRESS", "lines")
    assert not bar_wanted(Terminal())
    monkeypatch.setenv("GEMMA2_TUNE_PROGRESS", "bar")
    assert bar_wanted(io.StringIO()) and not bar_wanted(io.StringIO(), main_process=False)


def test_bar_shows_step_loss_tokens_per_second_and_writes_lines_above_it():
    stream, printed, seen = Terminal(), [], {"n": 0}
    progress = LiveProgress(lambda: seen["n"], "supervised tok/s", stream=stream)
    say = progress.wrap(printed.append)
    state = SimpleNamespace(max_steps=4, global_step=0)
    progress.on_train_begin(None, state, None)
    for step in range(1, 5):
        state.global_step, seen["n"] = step, 100 * step
        progress.on_log(None, state, None, logs={"loss": 2.0 / step})
        say(f"step {step}/4")
        progress.on_step_end(None, state, None)
    progress.on_train_end(None, state, None)
    text = stream.getvalue()
    assert "4/4" in text and "loss=0.5000" in text and "supervised tok/s=" in text
    assert printed == [f"step {s}/4" for s in range(1, 5)]  # the log lines are all still there


@pytest.mark.slow
def test_sft_with_the_bar_forced(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("GEMMA2_TUNE_PROGRESS", "bar")
    r = CliRunner().invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(tmp_path / "run"), "--max-steps", "3",
                                 "--set", "training.save_steps=null", "--set", "training.logging_steps=1"])
    assert r.exit_code == 0, r.output
    assert "3/3" in r.stderr and "supervised tok/s" in r.stderr
    assert "step 3/3: loss" in r.stdout  # lines as in logs

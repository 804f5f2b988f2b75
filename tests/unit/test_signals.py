"""Stopping a run on request (training/callbacks.py StopOnSignal): SIGTERM and Ctrl-C ask for a checkpoint at the
end of the step; a second Ctrl-C, pressed later, stops at once in a single process."""

import signal
from types import SimpleNamespace

import pytest


def handler(processes: int):
    """A StopOnSignal as `processes` ranks hold it, and what it said."""
    import gemma2_tune.training.callbacks as callbacks

    said = []
    stop = callbacks.StopOnSignal(SimpleNamespace(num_processes=processes), said.append)
    return stop, said


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C (SIGINT)")])
def test_both_signals_ask_for_a_checkpoint_at_the_step_end(signum, name):
    stop, said = handler(1)
    stop._on_signal(signum, None)
    assert stop.requested and stop.signal_name == name
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.on_step_end(None, None, control)
    assert stop.stopped and control.should_save and control.should_training_stop
    assert bool(said) == (signum == signal.SIGINT)  # Ctrl-C says what happens next


def test_a_second_ctrl_c_stops_at_once_only_when_pressed_later_in_one_process(monkeypatch):
    import time

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    stop, _ = handler(1)
    stop._on_signal(signal.SIGINT, None)
    now[0] += 0.2
    stop._on_signal(signal.SIGINT, None)  # a repeat within a second (a key bounce): still the checkpoint
    now[0] += 1.0
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)
    several, _ = handler(2)  # ranks of a launch: the launcher forwards Ctrl-C, repeats are no second press
    for _ in range(3):
        several._on_signal(signal.SIGINT, None)
        now[0] += 2.0
    assert several.requested

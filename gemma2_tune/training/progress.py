"""A live progress bar for rank 0 on an interactive terminal: step, loss, tokens/s, ETA.

In logs (stderr not a terminal, or GEMMA2_TUNE_PROGRESS=lines) nothing changes: the run prints its
usual lines. While the bar is shown, those lines are written above it instead of through it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from transformers import TrainerCallback

Echo = Callable[[str], None]


def bar_wanted(stream: TextIO | None = None, main_process: bool = True) -> bool:
    """The bar is shown on rank 0 when stderr is a terminal, or when GEMMA2_TUNE_PROGRESS=bar forces it;
    GEMMA2_TUNE_PROGRESS=lines turns it off."""
    mode = os.environ.get("GEMMA2_TUNE_PROGRESS", "auto")
    if not main_process or mode == "lines":
        return False
    return mode == "bar" or bool(getattr(stream or sys.stderr, "isatty", lambda: False)())


class LiveProgress(TrainerCallback):
    """tqdm bar over optimizer steps. `tokens_seen()` returns the tokens trained so far by this process
    (named `unit` on the bar, e.g. "supervised tok/s"); the bar's own rate gives the ETA."""

    def __init__(self, tokens_seen: Callable[[], int], unit: str = "tok/s", stream: TextIO | None = None):
        self.tokens_seen = tokens_seen
        self.unit = unit
        self.stream = stream or sys.stderr
        self.bar = None
        self.loss: float | None = None
        self._start = 0.0
        self._tokens_at_start = 0

    def wrap(self, echo: Echo) -> Echo:
        """An echo that writes above the bar while it is shown (and as `echo` otherwise)."""

        def write(line: str) -> None:
            if self.bar is None:
                echo(line)
            else:
                self.bar.clear()
                echo(line)
                self.bar.refresh()

        return write

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ARG002
        from tqdm.auto import tqdm

        self._start, self._tokens_at_start = time.monotonic(), self.tokens_seen()
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", file=self.stream,
                        dynamic_ncols=True, desc="training", leave=True)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.tokens_seen() - self._tokens_at_start) / elapsed
        shown = {"loss": f"{self.loss:.4f}" if self.loss is not None else "-", self.unit: f"{rate:,.0f}"}
        self.bar.set_postfix(shown, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.bar is not None:
            self.bar.close()
            self.bar = None

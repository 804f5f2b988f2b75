"""Trainer callbacks of a run: readable loss lines, complete-checkpoint markers, SIGTERM and Ctrl-C, peak memory.
(The live progress bar is in progress.py.)"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from ..config.schema import RunConfig
from ..files import proc_status_bytes, sync_folder
from .checkpoints import mark_complete

Echo = Callable[[str], None]
# (logged key, name in the line, format): what TRL's DPO/KTO and reward trainers log per step
PREFERENCE_METRICS = (("rewards/accuracies", "accuracy", ".0%"), ("rewards/margins", "margin", ".3f"),
                      ("accuracy", "accuracy", ".0%"), ("margin", "margin", ".3f"))


class EchoLoss(TrainerCallback):
    """Prints one line per logging step instead of tqdm (logs stay readable under accelerate)."""

    def __init__(self, echo: Echo):
        self.echo = echo

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002
        if logs and "loss" in logs and state.is_world_process_zero:
            extra = ""
            if "generation_time" in logs and "step_time" in logs:  # on-policy distillation: what generating costs
                extra = f", generating {logs['generation_time']:.2f}s of the step's {logs['step_time']:.2f}s"
            for key, name, form in PREFERENCE_METRICS:  # preference and reward runs: how well the pairs are told apart
                if key in logs:
                    extra += f", {name} {logs[key]:{form}}"
            self.echo(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                      f"lr {logs.get('learning_rate', 0):.2e}{extra}")


class NonFinite(RuntimeError):
    """Raised inside the training loop when a loss or gradient is NaN/inf; `lifecycle.train` turns it into
    Diverged. `step`: the optimizer step that would have applied it (1-based); `what`: which value."""

    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


class StopOnDivergence(TrainerCallback):
    """Checks every optimizer step before the update: the trainable gradients must be finite (a NaN/inf loss
    makes them so); and every logged loss and gradient norm (the only signal where a sharded engine holds the
    gradients). On the first non-finite one, raises NonFinite: the weights never take a non-finite update, and
    no checkpoint after it is written."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ARG002
        import torch

        norms = [p.grad.detach().float().norm() for p in (model.parameters() if model is not None else [])
                 if p.requires_grad and p.grad is not None]
        if norms and not bool(torch.isfinite(torch.stack(norms)).all()):
            raise NonFinite(state.global_step + 1, "non-finite gradient (NaN or inf) in the trainable weights")

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002
        import math

        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFinite(state.global_step, f"{key} {value}")


class LogLastStep(TrainerCallback):
    """The last optimizer step is always logged, so the final loss is that of the final step."""

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        if state.global_step == state.max_steps:
            control.should_log = True
        return control


class TrackStep(TrainerCallback):
    """Keeps record['global_step'] at the last completed optimizer step."""

    def __init__(self, record: dict):
        self.record = record

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        self.record["global_step"] = state.global_step


class MarkCheckpoints(TrainerCallback):
    """After every rank has written checkpoint-N and flushed it to disk (fsync of its files and folder), the
    main process marks it complete with the files' sizes and the data's fingerprint (`record`: the run's
    manifest). `finish(folder)`: what a saved model folder gets before it is marked (a full fine-tune's stop
    tokens), or None."""

    def __init__(self, cfg: RunConfig, state, record: dict, finish: Callable[[Path], None] | None = None):
        self.cfg, self.dist, self.record, self.finish = cfg, state, record, finish

    def on_save(self, args, state, control, **kwargs):  # noqa: ARG002
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.dist.is_main_process and self.finish is not None:
            self.finish(folder)
        sync_folder(folder)  # every rank: what it wrote is on disk before the marker says so
        self.dist.wait_for_everyone()
        if self.dist.is_main_process:
            fingerprint = (self.record.get("dataset") or {}).get("fingerprint")
            mark_complete(folder, state.global_step, self.cfg, fingerprint)
        self.dist.wait_for_everyone()


def reset_peak_memory() -> None:
    """Start peak tracking now (called when training begins, after the model and data are loaded)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory() -> tuple[int, str]:
    """Peak memory since reset_peak_memory(), and what was measured."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max_memory_allocated during training, this rank"
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak, "process peak RSS (VmHWM) during training, this rank"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS since start, this rank"


def current_memory() -> int:
    """Bytes in use now: CUDA allocated, or this process's RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return proc_status_bytes("VmRSS") or 0


class PeakMemory(TrainerCallback):
    """Peak tracking from the first step: `start` is the memory in use then (model, data, optimizer setup)."""

    start = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ARG002
        reset_peak_memory()
        self.start = current_memory()


class StopOnSignal(TrainerCallback):
    """SIGTERM (how clusters preempt) or SIGINT (Ctrl-C): finish the current step, save a checkpoint, stop.

    Ranks agree on the flag at every step end so they all save the same step. In a single process a second Ctrl-C,
    a second or more after the first, stops at once without a checkpoint (KeyboardInterrupt, as without this
    handler); in a launch of several processes it does not: the launcher forwards the terminal's SIGINT to every
    rank, which would read as a second press. `signal_name` says which signal stopped the run.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}

    def __init__(self, state, say: Echo | None = None):
        self.dist = state
        self.say = say
        self.requested = False
        self.stopped = False
        self.signal_name: str | None = None
        self.first_sigint: float | None = None

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def handler():
            previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
            try:
                yield
            finally:
                for s, handler_before in previous.items():
                    signal.signal(s, handler_before)

        return handler()

    def _on_signal(self, signum, frame):  # noqa: ARG002
        import time

        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_sigint is not None and self.dist.num_processes == 1 and now - self.first_sigint >= 1.0:
                raise KeyboardInterrupt
            if self.first_sigint is None:
                self.first_sigint = now
                if self.say is not None:
                    self.say("Ctrl-C: stopping after this step with a checkpoint (resumable); Ctrl-C again to stop "
                             "at once without one")
        self.signal_name = self.signal_name or self.NAMES[signum]
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        requested = self.requested
        if self.dist.num_processes > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1.0 if requested else 0.0], device=self.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

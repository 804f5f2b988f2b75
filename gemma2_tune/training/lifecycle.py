"""A training run's life, whatever method trains it: the run order (`train`), and the record around it
(output folder, manifest, attempts, printing, throughput, card).

    train(runner):                            # the one run order; a method supplies a Runner's pieces
        RunLifecycle(cfg, ...)                # launch and output folder checked; no process state yet
        args = runner.prepare(launch, out)    # configs, tokenizers, checks; the trainer's arguments BEFORE any
                                              # process state (under ZeRO-3 they make from_pretrained shard)
        run.join()                            # process state; only rank 0 writes and prints
        checkpoint = run.resume_point(...)
        fields = runner.load_data(run)        # data read and checked before anything is written
        run.start(**fields)                   # output folder made safe, config.yaml + run.json (running)
        with run.attempt():                   # failed / interrupted / completed; every attempt kept
            trainer = runner.build(run, args) # models through the one loading path, checked; the TRL trainer
            runner.before_training(run, checkpoint)
            stop = run.attach(trainer)        # callbacks: memory, step, checkpoints, SIGTERM/SIGINT, lines/progress bar
            trainer.train(...)
            runner.record_training(run, trainer, runtime)
            run.finish_training(...)          # throughput, loss curve; Interrupted after SIGTERM or Ctrl-C
            runner.after_training(run, trainer)
            run.save(trainer, tokenizer)      # weights, tokenizer, loss.png, README.md (model card)

A method's runner (training/<method>.py) supplies only what differs: its data, its models and trainer, what
it records.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..config.layering import config_to_yaml
from ..config.schema import RunConfig
from ..errors import Diverged, Interrupted, UserError
from ..files import OutputLock, disk_errors, writable_problem, write_text_atomic
from ..models.serving import serving_config, stop_token_ids
from . import manifest as mf
from .callbacks import (
    EchoLoss,
    LogLastStep,
    MarkCheckpoints,
    NonFinite,
    PeakMemory,
    StopOnDivergence,
    StopOnSignal,
    TrackStep,
    peak_memory,
)
from .card import model_card, plot_run
from .checkpoints import Checkpoint, check_checkpoint, list_checkpoints, marked_data_fingerprint, newest_complete
from .ema import ExponentialMovingAverage, write_ema_folder
from .launch import Launch, launch_problems
from .progress import LiveProgress, bar_wanted

Echo = Callable[[str], None]
BASE_TEMPLATE = "chat_template.base.jinja"  # the checkpoint's own chat template, replaced by the run's


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_digest(cfg: RunConfig) -> str:
    """16 hex digits of the resolved config's YAML: equal on every rank of one launch."""
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]


def rank_echo(echo: Echo, state) -> Echo:
    """Rank 0 prints (prefixed `[rank 0/N]` when N > 1); other ranks say once that they started."""
    if state.num_processes == 1:
        return echo
    prefix = f"[rank {state.process_index}/{state.num_processes}] "
    if not state.is_main_process:
        echo(prefix + f"started (local rank {state.local_process_index}, {state.device}); rank 0 reports")
        return lambda line: None
    return lambda line: echo(prefix + line)


class RunLifecycle:
    """One attempt at a run in `cfg.output.dir`, as seen by one rank. `record` is the manifest (run.json)."""

    def __init__(self, cfg: RunConfig, command: str, echo: Echo, launch: Launch, recipe: Path | str | None = None,
                 resuming: bool = False):
        """Checks the launch against the config and that the output folder may be written; creates no
        process state (the trainer's arguments must come first under ZeRO-3). Raises UserError."""
        problems = launch_problems(cfg, launch)
        if problems:
            raise UserError("the launch contradicts the config:\n" + "\n".join(f"  - {p}" for p in problems))
        self.cfg, self.command, self.launch, self.resuming = cfg, command, launch, resuming
        self.echo, self.recipe = echo, recipe
        self.out = Path(cfg.output.dir)
        self.started = time.time()
        self.memory = PeakMemory()
        self.ema: ExponentialMovingAverage | None = None
        self.checkpoint = None
        self.tokenizer_ids: tuple[list[int], int | None] | None = None  # stop tokens and pad of the run's tokenizer
        mf.check_inputs_outside(cfg)
        problem = writable_problem(self.out)
        if problem:
            raise UserError(f"output.dir {self.out}: cannot create it ({problem})")
        self.replacing = None if resuming else mf.check_output_dir(self.out, cfg.output.overwrite)
        # one process writes a run folder at a time; rank 0 of a launch holds the lock for all ranks
        self.lock = OutputLock(self.out) if os.environ.get("RANK", "0") == "0" else None
        if self.lock is not None:
            taken_over = self.lock.acquire()
            if taken_over:
                echo(taken_over)

    def join(self) -> None:
        """Join the launch's processes: rank-aware printing, the same config on every rank, the record."""
        from accelerate import PartialState

        self.state = PartialState()
        self.main = self.state.is_main_process
        self.say = rank_echo(self.echo, self.state)
        self._same_config_on_every_rank()
        previous = self.previous = (mf.read_manifest(self.out) or {}) if self.resuming else {}
        cfg, launch, recipe = self.cfg, self.launch, self.recipe
        self.record: dict[str, Any] = {
            "command": self.command,
            "method": cfg.method,
            "status": "running",
            "started_at": now(),
            "recipe": str(recipe) if recipe else None,
            "config_digest": config_digest(cfg),
            "launch": {"mode": launch.mode, "num_processes": self.state.num_processes,
                       "zero_stage": launch.zero_stage, "mixed_precision": launch.mixed_precision},
            "resumed_from": None,
            "attempts": closed_attempts((previous or {}).get("attempts", [])),
            "versions": mf.library_versions(),
            "device": "cuda" if _has_cuda() else "cpu",
        }

    def _same_config_on_every_rank(self) -> None:
        if self.state.num_processes == 1:
            return
        from accelerate.utils import gather_object

        digests = set(gather_object([config_digest(self.cfg)]))
        if len(digests) != 1:
            raise UserError(f"ranks resolved different configs ({sorted(digests)}); launch all ranks with the same "
                            "recipe and flags")

    def resume_point(self, resume: bool, resume_from: str | None) -> Checkpoint | None:
        """The checkpoint to continue from (--resume: newest complete one; --resume-from: that one), or None.
        Raises UserError when the folder's run is of another command or already completed."""
        if self.previous and self.previous.get("command", "sft") != self.command and (resume or resume_from):
            raise UserError(f"output.dir: {self.out} holds a `{self.previous.get('command', 'sft')}` run; "
                            f"`gemma2-tune {self.command} --resume` cannot continue it")
        if self.previous.get("status") == "completed" and (resume or resume_from):
            raise UserError(f"output.dir: the run in {self.out} completed (step {self.previous.get('global_step')}); "
                            "there is nothing to resume (--overwrite starts it again, or choose another --output-dir)")
        if resume_from:
            checkpoint = check_checkpoint(Path(resume_from), self.cfg)
        elif resume:
            if mf.read_manifest(self.out) is None:
                raise UserError(f"--resume: {self.out} holds no gemma2-tune run to resume")
            checkpoint, skipped = newest_complete(self.out, self.cfg)
            for c, why in skipped:
                self.say(f"skipping checkpoint {c.path}: {why}; resuming from {checkpoint.path} instead")
        else:
            return None
        self.record["resumed_from"] = str(checkpoint.path)
        self.checkpoint = checkpoint
        return checkpoint

    def write(self) -> None:
        """Rewrite run.json (rank 0 only)."""
        if self.main:
            mf.write_manifest(self.out, self.record)

    def check_resumed_data(self, fingerprint: str | None, allow_change: bool) -> None:
        """On resume: the data must be what the checkpoint trained on (its marker's fingerprint), unless
        `allow_change` (--allow-data-change), which is recorded. Raises UserError naming both fingerprints."""
        if self.checkpoint is None:
            return
        saved = marked_data_fingerprint(self.checkpoint.path)
        if saved is None or fingerprint is None or saved == fingerprint:
            return
        if not allow_change:
            raise UserError(f"--resume: the data changed since {self.checkpoint.path} was written (dataset fingerprint "
                            f"{saved} then, {fingerprint} now): the resumed run would not be the run it continues; "
                            "restore the data, or pass --allow-data-change to continue on the new data (recorded "
                            "in run.json)")
        self.record["data_changed_on_resume"] = {"checkpoint": saved, "now": fingerprint}
        self.say(f"warning: the data changed since {self.checkpoint.path} (fingerprint {saved} -> {fingerprint}); "
                 "continuing on the new data as --allow-data-change asks")

    def start(self, **fields: Any) -> None:
        """Make the output folder safe to write (rank 0: a previous run replaced by --overwrite is moved aside,
        deleted only when this run completes), save config.yaml, record `fields` and this attempt, write
        run.json. Raises UserError when the folder cannot be written (disk full, read-only)."""
        if self.replacing:
            self.say(self.replacing)
        with disk_errors(self.out):
            if self.main:
                if not self.resuming:
                    note = mf.prepare_output_dir(self.out, self.cfg.output.overwrite)
                    if note:
                        self.say(note)
                self.out.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.out / mf.RESOLVED_CONFIG, config_to_yaml(self.cfg))
            self.state.wait_for_everyone()
            self.record.update(fields)
            # this attempt is on record from its start: a SIGKILL leaves it 'running', read as killed later
            self.record["attempts"] = self.record["attempts"] + [self._attempt_entry()]
            self.write()

    def _attempt_entry(self) -> dict[str, Any]:
        return {k: self.record.get(k) for k in ("started_at", "finished_at", "status", "resumed_from", "global_step",
                                                 "wall_time_s", "data_changed_on_resume")}

    def attempt(self):
        """Context for the attempt: a failure is recorded with its error; every exit appends the attempt."""
        import contextlib

        @contextlib.contextmanager
        def attempt():
            try:
                with disk_errors(self.out):
                    yield self
            except KeyboardInterrupt:  # Ctrl-C before training (loading) or pressed twice: stopped, not failed
                if self.record["status"] == "running":
                    self.record.update(status="interrupted", error="KeyboardInterrupt: stopped by Ctrl-C at step "
                                       f"{self.record.get('global_step') or 0} without a checkpoint")
                raise
            except BaseException as exc:
                if self.record["status"] == "running":
                    self.record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                raise
            finally:
                self.record["finished_at"] = now()
                self.record["wall_time_s"] = round(time.time() - self.started, 2)
                self.record["attempts"] = self.record["attempts"][:-1] + [self._attempt_entry()]
                try:
                    self.write()
                except OSError:
                    pass  # a full or read-only disk: the error being raised says so

        return attempt()

    def attach(self, trainer) -> StopOnSignal:
        """The run's callbacks on `trainer`: peak memory, the step reached (a run failing mid-training records
        how far it got), the last step logged, complete-checkpoint markers, SIGTERM and Ctrl-C, and the loss lines
        (above a live progress bar on a terminal). Returns the signal handler (`with stop.installed(): train`)."""
        stop = StopOnSignal(self.state, self.say)
        decay = self.cfg.training.ema_decay
        self.ema = ExponentialMovingAverage(decay, self.checkpoint.path if self.checkpoint else None) if decay else None
        finish = None if self.cfg.lora.enabled else self.finish_model_folder  # a full model: stop tokens
        for callback in (StopOnDivergence(), self.memory, TrackStep(self.record), LogLastStep(),
                         self.ema,  # the average before the marker
                         MarkCheckpoints(self.cfg, self.state, self.record, finish), stop):
            if callback is not None:
                trainer.add_callback(callback)
        say = self.say
        if bar_wanted(main_process=self.main):
            counter, unit = tokens_seen(trainer)
            progress = LiveProgress(counter, unit)
            trainer.add_callback(progress)
            say = progress.wrap(say)
        trainer.add_callback(EchoLoss(say))
        return stop

    def record_model(self, report) -> None:
        """The checked model report goes into run.json and the log."""
        self.record["model"] = report.to_dict()
        for line in report.summary_lines() + [f"warning: {w}" for w in report.warnings]:
            self.say(line)
        self.write()

    def diverged(self, exc: "NonFinite") -> Diverged:
        """Record a divergence (run.json: failed, the step, the last complete checkpoint) and return the error to
        raise. The weights never took the non-finite update; no later checkpoint exists."""
        complete = [c for c in list_checkpoints(self.out) if c.complete and c.step < exc.step]
        kept = str(complete[-1].path) if complete else None
        self.record.update(status="failed", diverged_at_step=exc.step, last_finite_checkpoint=kept,
                           error=f"training diverged at step {exc.step}: {exc.what}")
        where = (f"the last complete checkpoint, {kept}, holds finite weights (--resume-from it with a lower "
                 "training.learning_rate, or fix the data)" if kept else
                 "no checkpoint was written before it (lower training.learning_rate or training.save_steps)")
        return Diverged(f"training diverged at step {exc.step} ({exc.what}); nothing after step "
                        f"{exc.step - 1} was kept; {where}")

    def finish_training(self, trainer, data_report, runtime_s: float | None, stopped: str | None) -> None:
        """Losses and throughput into the record; raises Interrupted when a signal stopped training (`stopped`: its
        name, StopOnSignal.signal_name)."""
        step = trainer.state.global_step
        self.record.update(global_step=step, training=loss_summary(trainer.state.log_history) | {
            "train_runtime_s": runtime_s})
        self.record["throughput"] = throughput(trainer, data_report, runtime_s, self.memory)
        before = (self.previous.get("throughput") or {}).get("supervised_tokens_trained") or 0
        if before:  # a resumed run: totals over its attempts, rates of this one
            speed = self.record["throughput"]
            speed["supervised_tokens_this_attempt"] = speed["supervised_tokens_trained"]
            speed["supervised_tokens_trained"] += before
        if step == 0 and not stopped:  # e.g. fewer rows than one batch, dropped by the trainer's sampler
            raise UserError(f"training ran no optimizer step (the trainer found no full batch in the data: fewer "
                            "examples than training.per_device_train_batch_size x processes?); nothing was saved "
                            f"in {self.out}")
        if stopped:
            saved = self.out / f"checkpoint-{step}"
            self.record.update(status="interrupted", checkpoint=str(saved), stopped_by=stopped)
            raise Interrupted(f"stopped by {stopped} at step {step}; checkpoint saved in {saved}; continue with: "
                              f"gemma2-tune {self.command} ... --output-dir {self.out} --resume")

    def save(self, trainer, tokenizer, base_chat_template: str | None = None) -> None:
        """Final weights (adapter or model), tokenizer (with the run's generated chat template; a template
        it replaced is kept as chat_template.base.jinja), loss plot and model card; status completed."""
        trainer.save_model(str(self.out))
        if self.main and not self.cfg.lora.enabled:
            self.finish_model_folder(self.out)
        self.record.update(status="completed")
        if self.main:
            tokenizer.save_pretrained(str(self.out))
            if base_chat_template:
                (self.out / BASE_TEMPLATE).write_text(base_chat_template)
            plot_run(trainer.state.log_history, self.out / "loss.png")
        if self.ema is not None:  # every rank: saving goes through the trainer
            folder = write_ema_folder(self.ema, trainer, self.out, self.main)
            if self.main and not self.cfg.lora.enabled:
                self.finish_model_folder(folder)
            self.record["ema"] = self.ema.describe()
        if self.main:
            (self.out / "README.md").write_text(model_card(self.cfg, self.record, self.out))
            replaced = mf.drop_replaced(self.out)  # the run --overwrite replaced: only now that this one is whole
            if replaced:
                self.say(replaced)

    def finish_model_folder(self, folder: Path) -> None:
        """A full model the run writes (the run folder, checkpoint-N/, ema/) stops at <end_of_turn> wherever it
        is served (generation_config.json's eos_token_id, as `merge`'s output) and generates with the cache on
        (config.json's use_cache, which training turned off). Not for a reward model: it generates nothing."""
        if self.tokenizer_ids is not None and self.cfg.head == "causal-lm":
            serving_config(folder, *self.tokenizer_ids)

    def summary_lines(self) -> list[str]:
        """The last lines of a completed run: throughput, memory, loss."""
        t, speed = self.record["training"], self.record["throughput"]
        lines = [
            f"supervised tokens: {speed['supervised_tokens_trained']:,} trained at "
            f"{speed['supervised_tokens_per_s'] or 0:,.0f}/s; "
            + (f"padding {speed['padding_fraction']:.1%}; " if speed["padding_fraction"] is not None else "")
            + "peak memory "
            f"{speed['peak_memory_bytes'] / 2**20:,.0f} MiB ({speed['peak_memory_kind']})",
            f"done in {time.time() - self.started:.1f}s: {self.out}/ (loss {t['first_loss']:.4f} at the first step, "
            f"{t['final_loss']:.4f} at step {t['final_loss_step']} of {self.record['global_step']})",
        ]
        final = t["final_loss"]
        if final is not None and not math.isfinite(final):
            lines.append(f"warning: final loss is {final}; training diverged")
        return lines


class Runner:
    """A method's pieces of the run order (`train`). Subclasses set `tokenizer`, `data_report` (for
    throughput) and `base_chat_template` by the time `build` returns, and override what they need."""

    tokenizer: Any = None
    data_report: Any = None
    base_chat_template: str | None = None

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def set_up_base(self, padding_side: str | None = None):
        """The shared first step of `prepare` (training/setup.py): the base's family (kernel checked) and its
        tokenizer with the run's template. Sets family, tokenizer, empty_thought, base_chat_template; returns
        the base's transformers config. Raises UserError."""
        from .setup import base_model, run_tokenizer

        base = base_model(self.cfg)
        run = run_tokenizer(self.cfg, base.family, padding_side)
        self.family, self.tokenizer = base.family, run.tokenizer
        self.empty_thought, self.base_chat_template = run.empty_thought, run.base_chat_template
        return base.config

    def prepare(self, launch: Launch, out: Path) -> Any:
        """Checks from configs and tokenizers (no weights), then the trainer's arguments, created before any
        process state. Raises UserError."""
        raise NotImplementedError

    def load_data(self, run: "RunLifecycle") -> dict[str, Any]:
        """Read and check the data (nothing written yet); returns run.json fields (dataset, data, ...)."""
        raise NotImplementedError

    def build(self, run: "RunLifecycle", args: Any) -> Any:
        """Load the models through the one loading path (checked, reports recorded) and build the trainer."""
        raise NotImplementedError

    def before_training(self, run: "RunLifecycle", checkpoint: Checkpoint | None) -> None:
        """Lines said before the first step."""

    def record_training(self, run: "RunLifecycle", trainer, runtime_s: float | None) -> None:
        """Method totals into run.record once training returns (also after SIGTERM or Ctrl-C, before Interrupted)."""

    def after_training(self, run: "RunLifecycle", trainer) -> None:
        """After a completed training loop, before saving (a final evaluation)."""

    def final_lines(self, run: "RunLifecycle", trainer, runtime_s: float | None) -> list[str]:
        """Lines said after saving, before the run's summary."""
        return []


def train(runner: Runner, echo: Echo = print, recipe: Path | str | None = None, resume: bool = False,
          resume_from: str | None = None, allow_data_change: bool = False) -> dict[str, Any]:
    """Run `runner.cfg` through the one run order; returns the manifest (also output.dir/run.json).

    Raises UserError for anything the user can fix (launch, output folder, data, models, a resume on changed
    data without `allow_data_change`, a full or read-only disk), found before training where possible;
    Interrupted (exit 143) after a SIGTERM or Ctrl-C once a checkpoint is saved; Diverged (exit 3) at a NaN/inf loss or
    gradient, before the update (run.json `failed` with the step and the last complete checkpoint).
    """
    from transformers import set_seed

    from .launch import current_launch

    cfg = runner.cfg
    launch = current_launch()
    run = RunLifecycle(cfg, cfg.method, echo, launch, recipe, resuming=resume or bool(resume_from))
    try:
        args = runner.prepare(launch, run.out)  # before any process state: makes ZeRO-3 load weights sharded
        run.join()
        checkpoint = run.resume_point(resume, resume_from)
        set_seed(cfg.training.seed)
        fields = runner.load_data(run)
        run.check_resumed_data((fields.get("dataset") or {}).get("fingerprint"), allow_data_change)
        run.tokenizer_ids = stop_token_ids(runner.tokenizer)
        run.start(**fields)
        with run.attempt():
            trainer = runner.build(run, args)
            runner.before_training(run, checkpoint)
            stop = run.attach(trainer)
            try:
                with stop.installed():
                    result = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
            except NonFinite as exc:
                raise run.diverged(exc) from None
            runtime = result.metrics.get("train_runtime")
            runner.record_training(run, trainer, runtime)
            run.finish_training(trainer, runner.data_report, runtime, stop.signal_name if stop.stopped else None)
            runner.after_training(run, trainer)
            run.save(trainer, runner.tokenizer, runner.base_chat_template)
        for line in runner.final_lines(run, trainer, runtime) + run.summary_lines():
            run.say(line)
        return run.record
    finally:
        if run.lock is not None:
            run.lock.release()


def closed_attempts(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier attempts from run.json, an attempt still 'running' (its process was killed: SIGKILL, a lost node,
    a power loss) marked 'killed' (its end was never recorded)."""
    return [a | {"status": "killed"} if a.get("status") == "running" else a for a in attempts]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def loss_summary(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """First/final logged training loss, mean loss, and the whole curve, from the trainer's log history."""
    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    final = next((e for e in reversed(log_history) if "train_loss" in e), {})
    return {
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "final_loss_step": losses[-1][0] if losses else None,
        "mean_train_loss": final.get("train_loss"),
        "loss_history": [{"step": s, "loss": v} for s, v in losses],
    }


def tokens_seen(trainer) -> tuple[Callable[[], int], str]:
    """A counter of the tokens this process has trained on, and its unit: supervised tokens when the loss
    counts them, else every non-padding token the collator batched."""
    if hasattr(trainer, "supervised_seen"):
        return (lambda: trainer.supervised_seen), "supervised tok/s"
    collator = trainer.data_collator
    return (lambda: collator.total_tokens - collator.pad_tokens), "tok/s"


def throughput(trainer, data_report, runtime: float | None, memory: PeakMemory) -> dict[str, Any]:
    """Supervised tokens trained (summed over ranks) and per second, padding, peak memory (bytes)."""
    import torch

    if hasattr(trainer, "supervised_seen"):  # counted in the loss, summed over ranks (this attempt)
        count = torch.tensor([trainer.supervised_seen], device=trainer.accelerator.device)
        seen, exact = int(trainer.accelerator.gather(count).sum().item()), True
    else:  # whole epochs plus the fraction of the last one
        seen, exact = int(round(data_report.supervised_tokens * (trainer.state.epoch or 0.0))), False
    peak, kind = peak_memory()
    return {
        "supervised_tokens_trained": seen,
        "supervised_tokens_counted": "exact" if exact else "estimated",
        "supervised_tokens_per_s": seen / runtime if runtime else None,
        "padding_fraction": getattr(trainer.data_collator, "padding_fraction", None),  # None: nothing padded by us
        "peak_memory_bytes": peak,
        "peak_memory_growth_bytes": peak - memory.start,  # above what was in use when training began
        "peak_memory_kind": kind,
    }

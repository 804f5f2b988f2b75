"""`gemma2-tune sft`: the story of a run. The only module that imports trl.

config -> output dir -> tokenizer -> data -> model -> SFTTrainer -> adapter + manifest.
Data is read and tokenized before the model loads, so data problems surface in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from transformers import PrinterCallback, TrainerCallback

from . import manifest as mf
from .config import RunConfig
from .data import load_rows
from .examples import build_examples
from .modeling import load_model, load_tokenizer
from .recipes import config_to_yaml

Echo = Callable[[str], None]


def trainer_args(cfg: RunConfig, out: Path):
    from trl import SFTConfig

    t = cfg.training
    return SFTConfig(
        output_dir=str(out),
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        **_checkpointing_args(SFTConfig, t.gradient_checkpointing),
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        max_length=cfg.data.max_length,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are already Gemma-formatted, tokenized, masked
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not _has_accelerator(),
    )


def _checkpointing_args(args_class, enabled: bool) -> dict[str, Any]:
    """transformers 5.x renamed gradient_checkpointing to activation_checkpointing; use what exists."""
    fields = {f.name for f in dataclasses.fields(args_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_map(cfg: RunConfig) -> Any:
    """4-bit weights must be placed at load time, one full copy per process (no device_map under ZeRO-3)."""
    if not (cfg.quantization.load_in_4bit and _has_accelerator()):
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def loss_summary(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    final = next((e for e in reversed(log_history) if "train_loss" in e), {})
    return {
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "final_loss_step": losses[-1][0] if losses else None,
        "mean_train_loss": final.get("train_loss"),
        "loss_history": [{"step": s, "loss": v} for s, v in losses],
    }


def prepare_data(cfg: RunConfig, echo: Echo):
    """Tokenizer, rows, examples: everything that can fail on the user's data, before anything is written."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    rows, source = load_rows(cfg.data)
    examples, report = build_examples(rows, tokenizer, cfg.data)
    for line in report.summary_lines():
        echo(line)
    return tokenizer, examples, report, source


def run_sft(cfg: RunConfig, echo: Echo = print, recipe: Path | None = None) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    started = time.time()
    out = Path(cfg.output.dir)
    mf.check_output_dir(out, cfg.output.overwrite)
    set_seed(cfg.training.seed)
    tokenizer, examples, report, source = prepare_data(cfg, echo)

    mf.prepare_output_dir(out, cfg.output.overwrite)
    mf.write_text_atomic(out / mf.RESOLVED_CONFIG, config_to_yaml(cfg))
    record: dict[str, Any] = {
        "status": "running",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": str(recipe) if recipe else None,
        "versions": mf.library_versions(),
        "device": "cuda" if _has_accelerator() else "cpu",
        "dataset": {"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                    "fingerprint": source.fingerprint, "split": cfg.data.split},
        "data": report.to_dict(),
    }
    mf.write_manifest(out, record)
    try:
        model, model_report = load_model(cfg, device_map=_device_map(cfg))
        record["model"] = model_report.to_dict()
        for line in model_report.summary_lines() + [f"warning: {w}" for w in model_report.warnings]:
            echo(line)
        mf.write_manifest(out, record)

        train_set = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                       "labels": [e.labels for e in examples]})
        args = trainer_args(cfg, out)
        rows_per_step = cfg.rows_per_optimizer_step * args.world_size
        steps = args.max_steps if args.max_steps > 0 else (
            math.ceil(len(examples) / rows_per_step) * math.ceil(cfg.training.num_train_epochs))
        echo(f"training: {len(examples)} rows, {rows_per_step} rows per optimizer step "
             f"(batch {cfg.training.per_device_train_batch_size} x accumulation "
             f"{cfg.training.gradient_accumulation_steps} x {args.world_size} processes), ~{steps} steps, "
             f"at most {cfg.data.max_length * rows_per_step} tokens per step")
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # raw log dicts; _EchoLoss prints readable lines
        trainer.add_callback(_EchoLoss(echo))
        result = trainer.train()
        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(out))
        losses = loss_summary(trainer.state.log_history)
        record.update(
            status="completed",
            global_step=trainer.state.global_step,
            training=losses | {"train_runtime_s": result.metrics.get("train_runtime")},
            # whole epochs plus the fraction of the last one
            supervised_tokens_trained=int(round(report.supervised_tokens * (trainer.state.epoch or 0.0))),
        )
        _check_loss(losses, echo)
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["wall_time_s"] = round(time.time() - started, 2)
        mf.write_manifest(out, record)
    t = record["training"]
    echo(f"done in {record['wall_time_s']:.1f}s: {out}/ (loss {t['first_loss']:.4f} at the first step, "
         f"{t['final_loss']:.4f} at step {t['final_loss_step']} of {record['global_step']})")
    return record


def _check_loss(losses: dict[str, Any], echo: Echo) -> None:
    final = losses["final_loss"]
    if final is not None and not math.isfinite(final):
        echo(f"warning: final loss is {final}; training diverged")


class _EchoLoss(TrainerCallback):
    """Prints one line per logging step instead of tqdm (logs stay readable under accelerate)."""

    def __init__(self, echo: Echo):
        self.echo = echo

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002
        if logs and "loss" in logs and state.is_world_process_zero:
            self.echo(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                      f"lr {logs.get('learning_rate', 0):.2e}")

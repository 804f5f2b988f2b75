"""`gemma2-tune sft`: the story of a run. The only module that imports trl.

config -> launch checks -> data (before anything is written) -> output dir -> model -> SFTTrainer
(LoRA applied, placement checked) -> train (checkpoints, SIGTERM) -> adapter/model + manifest.
Every rank runs this; only the main process writes shared files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from transformers import PrinterCallback
from trl import SFTTrainer

from . import manifest as mf
from .callbacks import EchoLoss, MarkCheckpoints, PeakMemory, StopOnSignal, peak_memory
from .checkpoints import check_checkpoint, newest_complete
from .config import RunConfig
from .errors import UserError
from .launch import Launch, current_launch, launch_problems
from .loss import supervised_loss_sum
from .modeling import inspect_adapters, load_model, lora_config
from .outputs import model_card, plot_run
from .packing import BlockCollator
from .recipes import config_to_yaml
from .training_data import blocks_dataset, prepare_data

Echo = Callable[[str], None]
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped on request, checkpoint saved, resumable


class Interrupted(Exception):
    """Training stopped by SIGTERM after saving a checkpoint."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def trainer_args(cfg: RunConfig, out: Path, launch: Launch):
    """SFTConfig, built before the model loads: under ZeRO-3 it is what makes from_pretrained shard weights."""
    from trl import SFTConfig

    t = cfg.training
    # PEFT under ZeRO-3 needs reentrant checkpointing (TRL enforces it; say so rather than be overridden).
    reentrant = launch.zero3 and cfg.lora.enabled
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
        **_checkpointing_args(SFTConfig, t.gradient_checkpointing, reentrant),
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (cfg.data.eval_fraction or cfg.data.eval_split) else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        max_length=cfg.data.max_length,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are already Gemma-formatted, tokenized, masked
        remove_unused_columns=False,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,  # LoRA and full fine-tuning both use every trainable parameter
        use_cpu=not _has_accelerator(),
    )


def _checkpointing_args(args_class, enabled: bool, reentrant: bool) -> dict[str, Any]:
    """transformers 5.x renamed gradient_checkpointing to activation_checkpointing; use what exists."""
    fields = {f.name for f in dataclasses.fields(args_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": reentrant} if enabled else None}


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_map(cfg: RunConfig, launch: Launch, local_rank: int) -> Any:
    """4-bit weights are placed at load time, one copy per process; under ZeRO-3 DeepSpeed places them."""
    if cfg.quantization.load_in_4bit and _has_accelerator() and not launch.zero3:
        return {"": local_rank}
    return None


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


def config_digest(cfg: RunConfig) -> str:
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]


def effective_loss(cfg: RunConfig, launch: Launch) -> str:
    """The tiled loss reads lm_head's weight directly, which ZeRO-3 partitions: TRL's own loss there."""
    return "trl" if launch.zero3 else cfg.training.loss


class SupervisedLossTrainer(SFTTrainer):
    """SFTTrainer whose loss runs lm_head + soft-cap + cross-entropy only at supervised positions, tiled.

    The model is called through its wrappers (DDP, PEFT) with logits for one position only; the final
    norm's hidden states are taken from the decoder by a forward hook.
    """

    supervised_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}  # the caller's dict stays intact
        captured = {}

        def grab(module, args, output):  # noqa: ARG001
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = base.get_decoder().register_forward_hook(grab)
        try:
            outputs = model(**model_inputs, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        total, n = supervised_loss_sum(captured["hidden"], labels, base.get_output_embeddings().weight,
                                       base.config.final_logit_softcapping)
        self.supervised_seen += n
        # Same normalisation as TRL's loss: a sum over the accumulated batch's supervised tokens.
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(n, 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def build_trainer(cfg: RunConfig, model, tokenizer, train_set, args, launch: Launch, eval_set=None):
    import torch

    trainer_class = SupervisedLossTrainer if effective_loss(cfg, launch) == "supervised_chunked" else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=lora_config(cfg),
                            data_collator=BlockCollator(tokenizer.pad_token_id))
    trainer.remove_callback(PrinterCallback)  # raw log dicts; EchoLoss prints readable lines
    if cfg.lora.enabled and not launch.zero3:
        # TRL stores QLoRA adapters in bf16, but PEFT reloads them in fp32 when resuming, so a resumed run
        # would continue with other numerics. Keep the (few) trainable weights in fp32 from the start:
        # exact resumes, and Adam updates that bf16 would round away. ZeRO-3 needs one dtype: left as is.
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return trainer


def _same_config_on_every_rank(cfg: RunConfig, state) -> None:
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    digests = set(gather_object([config_digest(cfg)]))
    if len(digests) != 1:
        raise UserError(f"ranks resolved different configs ({sorted(digests)}); launch all ranks with the same "
                        "recipe and flags")


def _resume_point(cfg: RunConfig, out: Path, resume: bool, resume_from: str | None, echo: Echo):
    if resume_from:
        return check_checkpoint(Path(resume_from), cfg)
    if resume:
        if mf.read_manifest(out) is None:
            raise UserError(f"--resume: {out} holds no gemma2-tune run to resume")
        best, skipped = newest_complete(out, cfg)
        for c in skipped:
            echo(f"skipping incomplete checkpoint {c.path} (no complete marker)")
        return best
    return None


def run_sft(cfg: RunConfig, echo: Echo = print, recipe: Path | str | None = None, resume: bool = False,
            resume_from: str | None = None) -> dict[str, Any]:
    from accelerate import PartialState
    from transformers import set_seed

    started = time.time()
    launch = current_launch()
    problems = launch_problems(cfg, launch)
    if problems:
        raise UserError("the launch contradicts the config:\n" + "\n".join(f"  - {p}" for p in problems))
    out = Path(cfg.output.dir)
    resuming = resume or bool(resume_from)
    if not resuming:
        mf.check_output_dir(out, cfg.output.overwrite)
    args = trainer_args(cfg, out, launch)
    state = PartialState()
    main = state.is_main_process
    say = _rank_echo(echo, state)
    _same_config_on_every_rank(cfg, state)
    checkpoint = _resume_point(cfg, out, resume, resume_from, say)
    set_seed(cfg.training.seed)
    data = prepare_data(cfg, say, state)
    tokenizer, blocks, report, source = data.tokenizer, data.blocks, data.report, data.source

    previous = mf.read_manifest(out) if resuming else None
    if main:
        if not resuming:
            mf.prepare_output_dir(out, cfg.output.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        mf.write_text_atomic(out / mf.RESOLVED_CONFIG, config_to_yaml(cfg))
    state.wait_for_everyone()
    record: dict[str, Any] = {
        "status": "running",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": str(recipe) if recipe else None,
        "config_digest": config_digest(cfg),
        "launch": {"mode": launch.mode, "num_processes": state.num_processes, "zero_stage": launch.zero_stage,
                   "mixed_precision": launch.mixed_precision},
        "resumed_from": str(checkpoint.path) if checkpoint else None,
        "attempts": (previous or {}).get("attempts", []),
        "versions": mf.library_versions(),
        "device": "cuda" if _has_accelerator() else "cpu",
        "dataset": {"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                    "fingerprint": source.fingerprint, "split": cfg.data.split},
        "data": report.to_dict() | {"packing": cfg.data.packing, "blocks": len(blocks),
                                     "cache": {"key": data.cache_key, "hit": data.cache_hit},
                                     "eval": data.eval_report.to_dict() if data.eval_report else None},
        "loss_implementation": effective_loss(cfg, launch),
    }
    write = (lambda: mf.write_manifest(out, record)) if main else (lambda: None)
    write()
    stop = StopOnSignal(state)
    try:
        model, model_report = load_model(cfg, device_map=_device_map(cfg, launch, state.local_process_index))
        eval_set = blocks_dataset(data.eval_blocks) if data.eval_blocks else None
        trainer = build_trainer(cfg, model, tokenizer, blocks_dataset(blocks), args, launch, eval_set)
        inspect_adapters(trainer.model, cfg, model_report)
        record["model"] = model_report.to_dict()
        for line in model_report.summary_lines() + [f"warning: {w}" for w in model_report.warnings]:
            say(line)
        write()
        items_per_step = cfg.rows_per_optimizer_step * state.num_processes
        unit = "blocks" if cfg.data.packing else "rows"
        say(f"launch: {launch.describe()}; loss: {record['loss_implementation']}")
        say(f"training: {report.rows_kept} rows in {len(blocks)} {unit}, {items_per_step} {unit} per optimizer step "
            f"(batch {cfg.training.per_device_train_batch_size} x accumulation "
            f"{cfg.training.gradient_accumulation_steps} x {state.num_processes} processes), "
            f"at most {cfg.data.max_length * items_per_step} tokens per step"
            + (f"; resuming from {checkpoint.path} (step {checkpoint.step})" if checkpoint else ""))
        trainer.add_callback(EchoLoss(say))
        memory = PeakMemory()
        trainer.add_callback(memory)
        trainer.add_callback(MarkCheckpoints(cfg, state))
        trainer.add_callback(stop)
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
        losses = loss_summary(trainer.state.log_history)
        record.update(global_step=trainer.state.global_step, training=losses | {
            "train_runtime_s": result.metrics.get("train_runtime")})
        record["throughput"] = _throughput(trainer, report, result.metrics.get("train_runtime"), state, memory)
        if stop.stopped:
            saved = out / f"checkpoint-{trainer.state.global_step}"
            record.update(status="interrupted", checkpoint=str(saved))
            raise Interrupted(f"stopped by SIGTERM at step {trainer.state.global_step}; checkpoint saved in {saved}; "
                              f"continue with: gemma2-tune sft ... --output-dir {out} --resume")
        if eval_set is not None:
            record["training"]["final_eval_loss"] = trainer.evaluate()["eval_loss"]
            record["training"]["eval_history"] = [{"step": e["step"], "eval_loss": e["eval_loss"]}
                                                  for e in trainer.state.log_history if "eval_loss" in e]
        trainer.save_model(str(out))
        record.update(status="completed")
        if main:
            tokenizer.save_pretrained(str(out))
            plot_run(trainer.state.log_history, out / "loss.png")
            (out / "README.md").write_text(model_card(cfg, record, out))
    except BaseException as exc:
        if record["status"] == "running":
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["wall_time_s"] = round(time.time() - started, 2)
        record["attempts"] = record["attempts"] + [{k: record.get(k) for k in (
            "started_at", "finished_at", "status", "resumed_from", "global_step", "wall_time_s")}]
        write()
    t, speed = record["training"], record["throughput"]
    say(f"supervised tokens: {speed['supervised_tokens_trained']:,} trained at {speed['supervised_tokens_per_s']:,.0f}/s; "
        f"padding {speed['padding_fraction']:.1%}; peak memory {speed['peak_memory_bytes'] / 2**20:,.0f} MiB "
        f"({speed['peak_memory_kind']})")
    say(f"done in {record['wall_time_s']:.1f}s: {out}/ (loss {t['first_loss']:.4f} at the first step, "
        f"{t['final_loss']:.4f} at step {t['final_loss_step']} of {record['global_step']})")
    _check_loss(losses, say)
    return record


def _throughput(trainer, report, runtime: float | None, state, memory: PeakMemory) -> dict[str, Any]:
    import torch

    if isinstance(trainer, SupervisedLossTrainer):  # counted in the loss, summed over ranks (this attempt)
        count = torch.tensor([trainer.supervised_seen], device=trainer.accelerator.device)
        seen, exact = int(trainer.accelerator.gather(count).sum().item()), True
    else:  # whole epochs plus the fraction of the last one
        seen, exact = int(round(report.supervised_tokens * (trainer.state.epoch or 0.0))), False
    collator = trainer.data_collator
    peak, kind = peak_memory()
    return {
        "supervised_tokens_trained": seen,
        "supervised_tokens_counted": "exact" if exact else "estimated",
        "supervised_tokens_per_s": seen / runtime if runtime else None,
        "padding_fraction": collator.padding_fraction,
        "peak_memory_bytes": peak,
        "peak_memory_growth_bytes": peak - memory.start,  # above what was in use when training began
        "peak_memory_kind": kind,
    }


def _rank_echo(echo: Echo, state) -> Echo:
    if state.num_processes == 1:
        return echo
    prefix = f"[rank {state.process_index}/{state.num_processes}] "
    if not state.is_main_process:
        echo(prefix + f"started (local rank {state.local_process_index}, {state.device}); rank 0 reports")
        return lambda line: None
    return lambda line: echo(prefix + line)


def _check_loss(losses: dict[str, Any], echo: Echo) -> None:
    final = losses["final_loss"]
    if final is not None and not math.isfinite(final):
        echo(f"warning: final loss is {final}; training diverged")



"""The TRL trainer a run uses: its arguments, the supervised-only loss, and LoRA applied by TRL.

The only module (with sft.py) that imports trl.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from transformers import PrinterCallback
from trl import SFTTrainer

from ..config.schema import RunConfig
from ..data.packing import BlockCollator
from ..models.checks import softcaps
from ..models.lora import base_model, lora_config
from .batching import MicroBatch
from .launch import Launch
from .loss import supervised_loss_sum


def has_accelerator() -> bool:
    """A CUDA device is visible."""
    import torch

    return torch.cuda.is_available()


def common_args(args_class, cfg: RunConfig, out: Path, launch: Launch, micro: MicroBatch | None = None,
                evaluate: bool = False) -> dict[str, Any]:
    """How training.* (and the run's dtype, launch, output folder) become trainer arguments, for any TRL
    config class (SFTConfig, DistillationConfig): the one place that decides it. `micro`: the micro-batch
    shape to run (default: as configured); `evaluate`: held-out data exists."""
    t = cfg.training
    micro = micro or MicroBatch(t.per_device_train_batch_size, t.gradient_accumulation_steps, 1, "as configured")
    # PEFT under sharded parameters needs reentrant checkpointing (TRL enforces it; say so rather than be overridden).
    reentrant = launch.reentrant_checkpointing and cfg.lora.enabled
    return dict(
        output_dir=str(out),
        learning_rate=t.learning_rate,
        per_device_train_batch_size=micro.per_device,
        gradient_accumulation_steps=micro.accumulation,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        **_checkpointing_args(args_class, t.gradient_checkpointing, reentrant),
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (the filter would print a made-up number)
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=True,
        ddp_find_unused_parameters=False,  # LoRA and full fine-tuning both use every trainable parameter
        use_cpu=not has_accelerator(),
    )


def trainer_args(cfg: RunConfig, out: Path, launch: Launch, micro: MicroBatch | None = None):
    """SFTConfig, built before the model loads: under ZeRO-3 it is what makes from_pretrained shard weights."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(SFTConfig, cfg, out, launch, micro, evaluate=bool(cfg.data.eval_fraction or cfg.data.eval_split)),
        max_length=cfg.data.max_length,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are already Gemma-formatted, tokenized, masked
        remove_unused_columns=False,
    )


def _checkpointing_args(args_class, enabled: bool, reentrant: bool) -> dict[str, Any]:
    """transformers 5.x renamed gradient_checkpointing to activation_checkpointing; use what exists."""
    fields = {f.name for f in dataclasses.fields(args_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": reentrant} if enabled else None}


def device_map(cfg: RunConfig, launch: Launch, local_rank: int) -> Any:
    """4-bit weights are placed at load time, one copy per process; a sharded launch places them itself."""
    if cfg.quantization.load_in_4bit and has_accelerator() and not launch.places_weights:
        return {"": local_rank}
    return None


def effective_loss(cfg: RunConfig, launch: Launch) -> str:
    """The tiled loss reads lm_head's weight directly, which a sharded launch partitions: TRL's own loss there."""
    return cfg.training.loss if launch.reads_whole_weights else "trl"


class SupervisedLossTrainer(SFTTrainer):
    """SFTTrainer whose loss runs lm_head + soft-cap + cross-entropy only at supervised positions, tiled.

    The model is called through its wrappers (DDP, PEFT) with logits for one position only; the final
    norm's hidden states are taken from the decoder by a forward hook. `supervised_seen` counts the
    supervised tokens this process trained on.
    """

    supervised_seen = 0
    fused_loss = None  # training.loss=supervised_liger: Liger's kernel, set once its probe check passed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Summed supervised cross-entropy / num_items_in_batch (the step's supervised tokens), as TRL's loss."""
        base = base_model(self.model)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}  # the caller's dict stays intact
        captured = {}

        def grab(module, args, output):  # noqa: ARG001
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        # One position's logits, asked for by index: an int `logits_to_keep` also makes Gemma 4's KV-shared layers
        # drop every other position before they run, which would leave the decoder's hidden states one long.
        last = torch.tensor([labels.shape[-1] - 1], device=labels.device)
        handle = base.get_decoder().register_forward_hook(grab)
        try:
            outputs = model(**model_inputs, use_cache=False, logits_to_keep=last)
        finally:
            handle.remove()
        total, n = supervised_loss_sum(captured["hidden"], labels, base.get_output_embeddings().weight,
                                       softcaps(base.config)[1], fused=self.fused_loss)
        self.supervised_seen += n
        # Same normalisation as TRL's loss: a sum over the accumulated batch's supervised tokens.
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(n, 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def build_trainer(cfg: RunConfig, model, tokenizer, train_set, args, launch: Launch, eval_set=None, collator=None):
    """The trainer for a run: TRL applies LoRA (lora_config), our collator batches packed blocks (`collator`:
    another, e.g. the image one: data/collator.py), the supervised-only loss unless TRL's is asked for or ZeRO-3
    runs."""
    supervised = effective_loss(cfg, launch) in ("supervised_chunked", "supervised_liger")
    trainer_class = SupervisedLossTrainer if supervised else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=lora_config(cfg, model),
                            data_collator=collator or BlockCollator(tokenizer.pad_token_id))
    trainer.remove_callback(PrinterCallback)  # raw log dicts; EchoLoss prints readable lines
    keep_adapters_in_fp32(trainer, cfg, launch)
    return trainer


def keep_adapters_in_fp32(trainer, cfg: RunConfig, launch: Launch) -> None:
    """TRL stores QLoRA adapters in bf16, but PEFT reloads them in fp32 when resuming, so a resumed run would
    continue with other numerics. Keep the (few) trainable weights in fp32 from the start: exact resumes, and
    Adam updates that bf16 would round away. A sharded launch needs one dtype: left as is. (Every method.)"""
    import torch

    if cfg.lora.enabled and not launch.shards_parameters:
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()

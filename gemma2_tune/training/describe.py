"""A resolved run config in a few lines: printed by `sft` before training, `--dry-run` and `validate`.

Light: no torch (validate and --dry-run answer without it).
"""

from __future__ import annotations

from ..config.schema import RunConfig
from ..data.sources import describe_source
from ..families import family_of_checkpoint


def count(n: int, unit: str) -> str:
    """'1 row', '4 rows'."""
    return f"{n} {unit}{'' if n == 1 else 's'}"


def run_lines(cfg: RunConfig) -> list[str]:
    """model, quantization, adapters, data, training, output: one line each."""
    q, lora, t = cfg.quantization, cfg.lora, cfg.training
    family = family_of_checkpoint(cfg.model.name_or_path)
    quant = (
        f"4-bit {q.quant_type}{' + double quantization' if q.double_quant else ''}, compute {cfg.compute_dtype}, "
        f"storage {cfg.quant_storage}" if q.load_in_4bit else f"none (weights in {cfg.model.dtype})"
    )
    adapt = (
        f"LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout} on {', '.join(lora.target_modules)}"
        if lora.enabled else "full fine-tuning (all weights)"
    )
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.num_train_epochs:g} epoch(s)"
    if getattr(cfg, "distill", None) is not None:  # prompts, not packed training rows
        data = (f"{describe_source(cfg.data)}; prompts in Gemma turns (each row up to its last user turn), system "
                f"messages '{cfg.data.system_policy}', prompt + completion <= {cfg.data.max_length} tokens")
        items = count(cfg.rows_per_optimizer_step, "prompt")
    else:
        data = (f"{describe_source(cfg.data)}; Gemma turns, system messages '{cfg.data.system_policy}', loss on "
                f"{cfg.data.train_on.replace('_', ' ')}, max {cfg.data.max_length} tokens ({cfg.data.overlong} "
                "longer rows)")
        items = count(cfg.rows_per_optimizer_step, "packed block" if cfg.data.packing else "row")
    return [
        f"model:        {cfg.model.name_or_path} ({family.display if family else 'family read from its config'}, "
        f"{cfg.model.dtype}, attention {cfg.model.attn_implementation})",
        f"quantization: {quant}",
        f"adapters:     {adapt}",
        f"data:         {data}",
        f"training:     {steps}, lr {t.learning_rate:g} ({t.lr_scheduler_type}), {items} per optimizer step per process "
        f"(batch {t.per_device_train_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps}), gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
        f"output:       {cfg.output.dir}",
    ] + kernel_lines(cfg) + distill_lines(cfg)


def kernel_lines(cfg: RunConfig) -> list[str]:
    """The loss and the kernels a run asks for beyond the defaults (nothing when none)."""
    t = cfg.training
    loss = {"trl": "loss trl (TRL's own)", "supervised_liger": "loss supervised_liger (Liger's fused linear "
            "cross-entropy, CUDA only; checked against the fp32 tiles before training)"}
    parts = [loss[t.loss]] if t.loss in loss else []
    parts += ["Liger RMSNorm, GeGLU, RoPE (CUDA only; checked against the plain model before training)"
              ] if t.use_liger_kernel else []
    parts += [f"torch.compile {t.torch_compile} (checked against eager before training)"
              ] if t.torch_compile != "off" else []
    return [f"kernels:      {'; '.join(parts)}"] if parts else []


def distill_lines(cfg: RunConfig) -> list[str]:
    """The teacher and the divergence, for a distill config (nothing for sft)."""
    teacher, d = getattr(cfg, "teacher", None), getattr(cfg, "distill", None)
    if teacher is None or d is None:
        return []
    return [
        f"teacher:      {teacher.name_or_path} ({teacher.load_in}, attention {teacher.attn_implementation}), frozen",
        f"distill:      on-policy: the student writes up to {d.max_completion_length} tokens per prompt (temperature "
        f"{d.temperature}, top_p {d.top_p}); {d.divergence} to the teacher on those tokens",
    ]

"""A resolved run config in a few lines: printed by every training command before training, `--dry-run` and
`validate`.

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
    """model, quantization, adapters, data, training, output: one line each; then the method's own lines
    (its schema's `method_lines`: kernels for sft, the teacher and divergence for distill)."""
    q, lora, t = cfg.quantization, cfg.lora, cfg.training
    family = family_of_checkpoint(cfg.base_model)
    start = cfg.start
    quant = (
        f"4-bit {q.quant_type}{' + double quantization' if q.double_quant else ''}, compute {cfg.compute_dtype}, "
        f"storage {cfg.quant_storage}" if q.load_in_4bit else f"none (weights in {cfg.model.dtype})"
    )
    adapt = (
        f"LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout} on {', '.join(lora.target_modules)}"
        if lora.enabled else "full fine-tuning (all weights)"
    )
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.num_train_epochs:g} epoch(s)"
    data = f"{describe_source(cfg.data)}; {cfg.data_line()}"
    if family is not None and family.turn_format == "gemma4":  # the methods' lines say "Gemma turns"
        data = data.replace("Gemma turns", "Gemma 4 turns (<|turn>role ... <turn|>)")
    items = count(cfg.rows_per_optimizer_step, cfg.item_unit)
    return [
        f"model:        {start.describe() if start else cfg.model.name_or_path} "
        f"({family.display if family else 'family read from its config'}, "
        f"{cfg.model.dtype}, attention {cfg.model.attn_implementation})",
        f"quantization: {quant}",
        f"adapters:     {adapt}",
        f"data:         {data}",
        f"training:     {steps}, lr {t.learning_rate:g} ({t.lr_scheduler_type}), {items} per optimizer step per process "
        f"(batch {t.per_device_train_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps}), gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
        f"output:       {cfg.output.dir}",
    ] + cfg.method_lines()

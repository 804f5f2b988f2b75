"""`gemma2-tune plan`: per-GPU memory and tokens per step, estimated before launch, with advice when a run does not
fit. The memory model itself (every term, its formula and source) is config/memory.py; a model's shape comes from
its local config.json, a builtin, or the families' published shapes (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.memory import GIB, estimate
from ..config.schema import RunConfig
from ..errors import UserError
from ..families import Shape


GPUS = {  # usable memory in GiB as reported by the driver, and bf16 support
    "h200-141gb": (139.8, True), "h100-80gb": (79.6, True), "a100-80gb": (79.3, True), "a100-40gb": (39.4, True),
    "l40s-48gb": (44.4, True), "a6000-48gb": (47.5, True), "a10g-24gb": (22.0, True), "l4-24gb": (22.0, True),
    "rtx4090-24gb": (23.6, True), "v100-32gb": (31.7, False), "t4-16gb": (14.6, False),
}


def model_shape(name_or_path: str) -> tuple[Shape, str]:
    """Shape of a local checkpoint (config.json), a builtin, or a published size by name; no download.

    Returns (shape, where it came from). Raises UserError when the name doesn't say and there is no folder.
    """
    from ..families import FAMILIES, family_of_name
    from ..models.builtin import builtin_folder, builtin_path, is_builtin

    path = builtin_folder(name_or_path) if is_builtin(name_or_path) else Path(name_or_path).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from ..config.runs import adapter_run

        try:  # a LoRA run (a reward run beside an RL policy): its base's shape
            start = adapter_run(name_or_path)
        except ValueError:
            start = None
        if start and start.base != name_or_path:
            return model_shape(start.base)
    family = family_of_name(name_or_path)
    size = family.size_from_name(name_or_path) if family else None
    if is_builtin(name_or_path) and not (path / "config.json").is_file() and not (family and size in family.shapes):
        path = builtin_path(name_or_path)  # a tiny builtin without a published size: built in seconds
    if (path / "config.json").is_file():
        where = f"{path}/config.json"
        return Shape.from_config(json.loads((path / "config.json").read_text()), where), where
    if family and size in family.shapes:
        shape = family.shapes[size]
        return shape, f"published {family.display} {size.upper()} shape, {shape.source}"
    names = "; ".join(f"{f.display}: {', '.join(f.shapes)}" for f in FAMILIES)
    raise UserError(f"model.name_or_path: cannot tell the shape of '{name_or_path}' without downloading; "
                    f"pass a local checkpoint folder or a name with a published size ({names})")


def fits_length(shape: Shape, cfg: RunConfig, budget: float, **kw) -> int | None:
    """Longest max_length (multiple of 128) whose estimate fits `budget` bytes."""
    best = None
    for length in range(128, cfg.data.max_length + 1, 128):
        if estimate(shape, cfg, length=length, **kw).total <= budget:
            best = length
    return best


def advice(shape: Shape, cfg: RunConfig, budget: float, launch, micro, frozen: dict[str, Shape]) -> list[str]:
    """What to change so the run fits `budget` bytes, each checked against the estimate (a length that fits,
    folding less, batch 1, more sharded processes, offload; 4-bit is always worth naming when off). `launch`:
    the Launch; `micro`: the micro-batch the run would use (None: the method does not fold); `frozen`: the
    shapes of the models loaded beside the trained one."""
    n, shards, offload = launch.num_processes, launch.shards_parameters, launch.offload
    batch = micro.per_device if micro else None

    def need(**kw) -> float:
        args = {"num_processes": n, "shards": shards, "offload": offload, "frozen": frozen, "batch": batch} | kw
        return estimate(shape, cfg, **args).total

    found = []
    length = fits_length(shape, cfg, budget, num_processes=n, shards=shards, offload=offload, frozen=frozen,
                         batch=batch)
    if length and length < cfg.data.max_length:
        found.append(f"--max-length {length}")
    b = cfg.training.per_device_train_batch_size
    if micro is not None and micro.folded > 1 and micro.reason == "training.fold_accumulation=true":
        unfolded = need(batch=b)
        found.append("training.fold_accumulation=auto (folds only as far as the card allows" + (
            ")" if unfolded <= budget else f"; unfolded it needs {unfolded / GIB:.1f} GiB)"))
    elif b > 1 and need(batch=1) <= budget:
        found.append("training.per_device_train_batch_size=1 (raise gradient_accumulation_steps)")
    if not cfg.quantization.load_in_4bit:
        found.append("4-bit QLoRA (quantization.load_in_4bit=true, lora.enabled=true)")
    if shards:
        more = next((m for m in (2 * n, 4 * n, 8 * n) if need(num_processes=m) <= budget), None)
        if more:
            found.append(f"--num-processes {more} (ZeRO-3 shards weights and states)")
        if not offload and need(offload=True) <= budget:
            found.append("--launch zero3_offload")
    elif need(num_processes=8, shards=True) <= budget:
        found.append("more GPUs with --launch zero3 --num-processes 8")
    return found


def _image_lines(cfg: RunConfig) -> list[str]:
    """An image + text checkpoint's lines about images (imageplan.py); [] for a text one."""
    from ..models.builtin import builtin_folder, is_builtin
    from .imageplan import image_lines

    name = cfg.base_model
    path = builtin_folder(name) if is_builtin(name) else Path(name).expanduser()
    return image_lines(name, path if (path / "config.json").is_file() else None, cfg.data.max_length,
                       getattr(cfg.data, "pan_and_scan", False))


def report(cfg: RunConfig, gpu: str, num_processes: int | None, launch_name: str | None) -> tuple[list[str], bool]:
    """`gemma2-tune plan`'s lines and whether the run fits. `num_processes`: None takes the launch config's
    (1 without one), as a launch would. Raises UserError for an unknown GPU or model."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown (known: {', '.join(GPUS)})")
    memory, has_bf16 = GPUS[gpu]
    budget = memory * GIB
    from .batching import micro_batch
    from .launch import Launch, find_launch_config, read_launch_config

    launch = (read_launch_config(find_launch_config(launch_name), num_processes) if launch_name else
              Launch("ddp" if (num_processes or 1) > 1 else "single", num_processes or 1))
    num_processes, shards, offload = launch.num_processes, launch.shards_parameters, launch.offload
    if launch_name:
        from .launch import launch_problems

        problems = launch_problems(cfg, launch)
        if problems:
            raise UserError(f"--launch {launch_name}: this run would be refused at launch:\n  - "
                            + "\n  - ".join(problems))

    shape, where = model_shape(cfg.base_model)
    frozen = {m.key: (m, *model_shape(m.name_or_path)) for m in cfg.frozen_models()}
    frozen_shapes = {key: found[1] for key, found in frozen.items()}
    # a method that folds accumulation into the micro-batch does it as `micro_batch` decides on the run's GPU
    micro = micro_batch(cfg, shape, launch, budget) if cfg.folds_accumulation else None
    batch = micro.per_device if micro else None  # what each forward will hold; the advice below keeps it
    plan = estimate(shape, cfg, num_processes, shards, offload, frozen=frozen_shapes, batch=batch)
    mode = f"{launch.sharding} over {num_processes}" + (" with CPU offload" if offload else "") if shards else (
        f"{num_processes} process{'es' if num_processes > 1 else ''}, one full copy each")
    lines = [
        f"model: {cfg.model.name_or_path} ({where}): {plan.total_params / 1e9:.2f}B parameters"
        + (f" ({shape.tower_params / 1e9:.2f}B in image/audio towers, frozen)" if shape.tower_params else "")
        + f", {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab:,}",
    ] + [f"{key}: {m.name_or_path} ({w}): {s.total_params / 1e9:.2f}B parameters, {m.load_in}, frozen"
         for key, (m, s, w) in frozen.items()] + [
        f"run: {'4-bit QLoRA' if cfg.quantization.load_in_4bit else cfg.model.dtype + (' LoRA' if cfg.lora.enabled else ' full fine-tuning')}, "
        f"{plan.trainable_params / 1e6:,.1f}M trainable; {mode}; batch {cfg.training.per_device_train_batch_size} x "
        f"{cfg.data.max_length} tokens, accumulation {cfg.training.gradient_accumulation_steps}",
    ] + _image_lines(cfg) + ([f"on {gpu}: {micro.describe()}"] if micro else []) + [
        f"tokens per optimizer step: {plan.tokens_per_step:,}" + (
            " (at most: prompts + completions)" if cfg.generation_length else
            " (packed blocks)" if getattr(cfg.data, "packing", False) else " (at most)"),
        f"estimated memory per GPU on {gpu} ({memory:.0f} GiB usable)"
        + (f", micro-batch {micro.per_device}:" if micro else ":"),
    ]
    lines += [f"  {name:38s} {value / GIB:8.2f} GiB" for name, value in plan.terms.items()]
    lines.append(f"  {'total':38s} {plan.total / GIB:8.2f} GiB")
    lines.append(f"  (full logits, which the tiled loss avoids: {plan.full_logits_bytes / GIB:.2f} GiB)")
    ok = plan.total <= budget
    if not has_bf16 and cfg.model.dtype == "bfloat16":
        lines.append(f"warning: {gpu} has no bf16 support; Gemma needs bf16 (Gemma 2 27B is unstable in float16)")
        ok = False
    lines.append(f"verdict: {'fits' if ok else 'does NOT fit'} ({plan.total / budget:.0%} of the card)")
    if not has_bf16 and cfg.model.dtype == "bfloat16":
        lines.append("to fit, try: a card with bf16 (A100, H100, L4, A10G, RTX 4090, ...)")
    elif plan.total > budget:
        lines.append("to fit, try: " + ("; ".join(advice(shape, cfg, budget, launch, micro, frozen_shapes))
                                        or "nothing this plan can model fits; a larger card"))
    return lines, ok

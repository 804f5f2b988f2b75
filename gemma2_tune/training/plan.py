"""`gemma2-tune plan`: per-GPU memory and tokens per step, estimated before launch.

Every term is a formula over the model's shape and the resolved config, in bytes, per process:

  weights      4-bit linears 0.5 B/param + quantization constants (double quant: ~0.016 B/param), other
               weights (embeddings, norms) in model.dtype; bf16/fp32 weights at 2/4 B/param; / N under ZeRO-3.
               What 4-bit leaves in model.dtype has its own lines: Gemma 4's per-layer embeddings (an
               embedding table), its experts (3-D weights bitsandbytes does not quantize) and the image/audio
               towers (left unquantized, frozen)
  trainable    LoRA: fp32 weight + grad + Adam m, v = 16 B/param. Full fine-tuning (the towers stay frozen): bf16
               weight (counted above) + bf16 grad + Adam m, v in bf16 = +6 B/param; under ZeRO-3 DeepSpeed keeps
               fp32 master + m + v and bf16 grads: +14 B/param, / N (zero3_offload: optimizer states and master in
               CPU memory)
  activations  gradient checkpointing keeps each layer's input (B*T*H*2 B) and recomputes one layer at a time:
               eager attention's length-squared scores (B*heads*T*T, ~14 B per element over its copies) plus
               the projections and MLP (~(4H + 4I)*B*T*2 B); without checkpointing every layer's are kept
  loss         supervised_chunked: one tile (1024 x 8192 fp32, x3 with temporaries) + fp32 hidden at
               supervised positions; supervised_liger: Liger's chunk (~2 x positions x hidden logits, model
               dtype + fp32 gradient) + fp32 hidden; trl: TRL's fused tiles (4096 x 32768 fp32, x3); shown
               beside it, what full logits would take (B*T*V at bf16 + fp32 + fp32 gradient)
  overhead     1 GiB (CUDA context, allocator) + 10% fragmentation margin

Shapes come from the model families' published configurations (gemma2_tune/families). tests/unit/test_plan.py
checks the parameter counts against the published models and the activation and loss terms against peak
memory measured on tiny models on this CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import LOSS_TOKEN_CHUNK, LOSS_VOCAB_CHUNK, RunConfig
from ..errors import UserError
from ..families import Shape

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1}


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


@dataclass
class Plan:
    """A memory estimate per process, in bytes, term by term."""

    terms: dict[str, float]  # bytes per process
    full_logits_bytes: float
    tokens_per_step: int
    trainable_params: int
    total_params: int

    @property
    def total(self) -> float:
        """Sum of the terms, bytes."""
        return sum(self.terms.values())


def lora_params(shape: Shape, cfg: RunConfig) -> int:
    """LoRA parameters: r x (in + out) per targeted module each layer has (the decoder's only)."""
    if not cfg.lora.enabled:
        return 0
    return shape.lora_params(cfg.lora.r, list(cfg.lora.target_modules))


def weight_terms(shape: Shape, cfg: RunConfig, quantized: bool | None = None, n: int = 1) -> dict[str, float]:
    """Bytes of `shape`'s weights, / `n` (sharded): "weights" (the decoder; with `quantized`, default
    quantization.load_in_4bit, its linear layers in 4-bit NF4 with cfg.quantization's settings: half a byte per
    weight plus its block scales, an fp32 absmax per 64 weights or with double quantization an 8-bit one plus an
    fp32 per 256 of those; embeddings and norms in model.dtype), then what stays in model.dtype either way, each
    on its own line where the model has it: per-layer embeddings, experts, towers."""
    dtype = DTYPE_BYTES[cfg.model.dtype]
    special = {"weights: per-layer embeddings": shape.per_layer_embedding_params,
               "weights: experts (not 4-bit)": shape.expert_params,
               "weights: towers (frozen)": shape.tower_params}
    rest = shape.other_params - sum(special.values())
    if cfg.quantization.load_in_4bit if quantized is None else quantized:
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.quantization.double_quant else 4 / 64)
        decoder = shape.linear_params * per_param + rest * dtype
    else:
        decoder = (shape.linear_params + rest) * dtype
    return {"weights": decoder / n} | {name: count * dtype / n for name, count in special.items() if count}


def nf4_weight_bytes(shape: Shape, cfg: RunConfig) -> float:
    """Bytes of `shape`'s weights loaded in 4-bit NF4 with cfg.quantization's settings (`weight_terms`, summed)."""
    return sum(weight_terms(shape, cfg, quantized=True).values())


def estimate(shape: Shape, cfg: RunConfig, num_processes: int = 1, shards: bool = False, offload: bool = False,
             batch: int | None = None, length: int | None = None, frozen: dict[str, Shape] | None = None) -> Plan:
    """Per-process memory of training `shape` as `cfg` says. `shards`: parameters sharded over the
    `num_processes` (ZeRO-3); `batch`: items per forward (the micro-batch, default the config's per-device batch;
    tokens per optimizer step stay the config's batch x accumulation), `length`: tokens per item (default
    data.max_length). `frozen`: the shapes of the models the method loads beside the trained one, by config key
    (cfg.frozen_models(); the teacher). The method's own terms (its loss at least) come from its registry entry."""
    from .methods import method_for

    b = batch or cfg.training.per_device_train_batch_size
    t = length or cfg.data.max_length
    n = num_processes if shards else 1
    terms: dict[str, float] = {}

    terms.update(weight_terms(shape, cfg, n=n))
    # full fine-tuning trains the decoder: the towers stay frozen
    trainable = lora_params(shape, cfg) if cfg.lora.enabled else shape.total_params - shape.tower_params
    if cfg.lora.enabled:
        terms["trainable: weights, grads, Adam"] = trainable * 16 / n
    elif shards:
        terms["trainable: grads, Adam, fp32 master"] = trainable * (2 if offload else 14) / n
    else:
        terms["trainable: grads, Adam"] = trainable * 6

    terms["activations"] = activation_bytes(shape, cfg, b, t)
    terms.update(method_for(cfg).plan_terms(shape, cfg, b, t, n, shards, frozen or {}))
    base = sum(terms.values())
    terms["overhead"] = GIB + 0.10 * base
    full_logits = b * t * shape.vocab * (2 + 4 + 4)
    per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps * num_processes
    return Plan(terms, full_logits, per_step * t, trainable, shape.total_params)


def activation_bytes(shape: Shape, cfg: RunConfig, b: int, t: int) -> float:
    """Bytes of the trained model's activations for `b` sequences of `t` tokens (with gradients): gradient
    checkpointing keeps each layer's input and recomputes one layer at a time; without it every layer's are kept."""
    # a mixture of experts runs experts_per_token experts beside the dense MLP
    h, i, heads = shape.hidden, shape.intermediate + shape.experts_per_token * shape.expert_intermediate, shape.heads
    # eager keeps several copies of the (B, heads, T, T) scores: bf16 scores, soft-cap tanh, masked, fp32 softmax,
    # bf16 probs, and their gradients; 14 B per element is what tests/unit/test_plan.py measures on CPU. Fused
    # kernels (sdpa, flash-attn: Gemma 3 only) never hold them.
    scores = b * heads * t * t * 14 if cfg.model.attn_implementation == "eager" else 0
    layer_work = scores + (4 * h + 4 * i) * b * t * 2
    per_layer_inputs = b * t * shape.layers * shape.per_layer_dim * 2  # Gemma 4's PLE inputs, kept for every layer
    if cfg.training.gradient_checkpointing:
        return shape.layers * b * t * h * 2 + layer_work + per_layer_inputs
    return shape.layers * layer_work + per_layer_inputs


def forward_bytes(shape: Shape, attn_implementation: str, b: int, t: int) -> float:
    """Bytes of one layer's forward without gradients (a frozen model's forward: nothing kept between layers)."""
    scores = b * shape.heads * t * t * 6 if attn_implementation == "eager" else 0
    return scores + (4 * shape.hidden + 4 * shape.intermediate) * b * t * 2


def dpo_terms(shape: Shape, cfg, b: int, t: int, n: int, shards: bool, frozen: dict[str, Shape]) -> dict[str, float]:
    """A preference run's extra memory: chosen and rejected run as one batch of 2B sequences, so the policy's
    activations count twice (the shared term counts B); the reference's forward on the same 2B sequences (no
    gradients; with LoRA it is the policy with its adapter disabled, so no weights); with full fine-tuning the
    reference's weights in model.dtype (/ N under ZeRO-3). KTO (an unpaired loss) adds a forward of both models on
    the B mismatched KL sequences. Loss: TRL's chunked log-probabilities, fp32 tiles (x3 with temporaries)."""
    sequences = b if cfg.dpo.unpaired else 2 * b
    terms = {"activations, rejected sides" if not cfg.dpo.unpaired else
             "KL sequences (policy forward, no gradients)":
             activation_bytes(shape, cfg, b, t) if not cfg.dpo.unpaired else forward_bytes(
                 shape, cfg.model.attn_implementation, b, t)}
    reference = frozen.get("reference")
    if reference is not None:
        terms["reference weights"] = reference.total_params * DTYPE_BYTES[cfg.model.dtype] / n
    ref_sequences = sequences * (2 if cfg.dpo.unpaired else 1)
    terms["reference forward (no gradients)"] = forward_bytes(reference or shape, cfg.model.attn_implementation,
                                                              ref_sequences, t)
    terms["loss"] = min(sequences * t, 4096) * min(shape.vocab, 32768) * 4 * 3 + sequences * t * shape.hidden * 8
    return terms


def reward_terms(shape: Shape, cfg, b: int, t: int, n: int, shards: bool,
                 frozen: dict[str, Shape]) -> dict[str, float]:
    """A reward model's extra memory: chosen and rejected are scored as one batch of 2B sequences, so the
    activations count twice (the shared term counts B). No logits over the vocabulary: the score head reads one
    hidden state per sequence (its fp32 copy and gradient: 2B x hidden x 8 B)."""
    return {"activations, rejected sides": activation_bytes(shape, cfg, b, t),
            "loss": 2 * b * shape.hidden * 8}


def sft_terms(shape: Shape, cfg, b: int, t: int, n: int, shards: bool, frozen: dict[str, Shape]) -> dict[str, float]:
    """sft's loss: supervised_chunked: one fp32 tile (x3 with temporaries) + fp32 hidden states at the
    supervised positions (every position, as an upper bound); supervised_liger: Liger's chunk; TRL's loss
    (asked for, or under sharding): its fused tiles."""
    h, dtype = shape.hidden, DTYPE_BYTES[cfg.model.dtype]
    supervised = b * t  # upper bound: every position supervised
    if cfg.training.loss == "supervised_chunked" and not shards:
        return {"loss": min(supervised, LOSS_TOKEN_CHUNK) * min(shape.vocab, LOSS_VOCAB_CHUNK) * 4 * 3
                + supervised * h * 8}
    if cfg.training.loss == "supervised_liger" and not shards:
        # Liger sizes its chunk of rows so that rows x vocab ~ positions x hidden (rounded up to a power of 2:
        # up to 2x), logits in the model's dtype and their fp32 gradient; plus the gradient of the hidden states
        return {"loss": 2 * supervised * h * (dtype + 4) + supervised * h * 8}
    return {"loss": min(b * t, 4096) * min(shape.vocab, 32768) * 4 * 3 + b * t * h * 8}


def distill_terms(student: Shape, cfg, b: int, t: int, n: int, shards: bool,
                  frozen: dict[str, Shape]) -> dict[str, float]:
    """A distillation teacher's memory: weights (4-bit as the student's 4-bit settings, 8-bit with per-row
    scales, or full precision sharded), one layer's forward at a time (no gradients), the student's KV cache
    while it generates (batch x accumulation prompts at once, in model.dtype), and TRL's chunked divergence
    (fp32 tiles of both models' logits, x3 with temporaries, + both hidden states)."""
    teacher = frozen.get("teacher") or student
    dtype = DTYPE_BYTES[cfg.model.dtype]
    load_in = cfg.teacher.load_in
    if load_in == "4bit":
        weights = nf4_weight_bytes(teacher, cfg)
    elif load_in == "8bit":
        weights = teacher.linear_params * (1 + 4 / teacher.hidden) + teacher.other_params * dtype
    else:
        weights = teacher.total_params * dtype / n
    scores = b * teacher.heads * t * t * 6 if cfg.teacher.attn_implementation == "eager" else 0
    forward = scores + (4 * teacher.hidden + 4 * teacher.intermediate) * b * t * 2
    generation_batch = b * cfg.training.gradient_accumulation_steps  # prompts generated for at once
    kv_cache = generation_batch * t * student.layers * 2 * student.kv_heads * student.head_dim * dtype
    loss = 2 * min(b * t, 4096) * min(student.vocab, 32768) * 4 * 3 + b * t * (student.hidden + teacher.hidden) * 8
    return {"teacher weights": weights, "teacher forward (no gradients)": forward, "generation KV cache": kv_cache,
            "loss": loss}


def rl_terms(policy: Shape, cfg, b: int, t: int, n: int, shards: bool,
             frozen: dict[str, Shape]) -> dict[str, float]:
    """What online RL adds to the policy's memory: the KV cache while it generates the step's completions
    (per_device_train_batch_size x gradient_accumulation_steps of them at once: prompts x the group size, in
    model.dtype), the reference (LoRA: the policy with adapters switched, no extra weights; full fine-tuning with a
    KL term: a frozen copy, sharded by ZeRO-3) and its forward without gradients, the reward model's weights
    (4-bit, 8-bit with per-row scales, or model.dtype) and one layer's forward, and TRL's fused log-prob head
    (fp32 tiles of 4096 positions x the vocabulary chunk, x3 with temporaries, + fp32 hidden states)."""
    dtype = DTYPE_BYTES[cfg.model.dtype]
    r = cfg.rl
    completions = b * cfg.training.gradient_accumulation_steps
    terms: dict[str, float] = {
        f"generation KV cache ({completions} completions: {completions // r.num_generations} prompts x group "
        f"{r.num_generations})": completions * t * policy.layers * 2 * policy.kv_heads * policy.head_dim * dtype,
    }
    scores = b * policy.heads * t * t * 6 if cfg.model.attn_implementation == "eager" else 0
    forward = scores + (4 * policy.hidden + 4 * policy.intermediate) * b * t * 2
    if r.beta:
        if not cfg.lora.enabled:
            terms["reference weights (frozen copy)"] = policy.total_params * dtype / n
        terms["reference forward (no gradients)"] = forward
    reward = frozen.get("reward_model")
    if reward is not None:
        load_in = cfg.reward_model.load_in
        if load_in == "4bit":
            weights = nf4_weight_bytes(reward, cfg)
        elif load_in == "8bit":
            weights = reward.linear_params * (1 + 4 / reward.hidden) + reward.other_params * dtype
        else:
            weights = reward.total_params * dtype / n
        terms["reward model weights"] = weights
        terms["reward model forward (no gradients)"] = (b * reward.heads * t * t * 6 if
                                                        cfg.reward_model.attn_implementation == "eager" else 0) + (
            4 * reward.hidden + 4 * reward.intermediate) * b * t * 2
    terms["loss"] = min(b * t, 4096) * min(policy.vocab, 32768) * 4 * 3 + b * t * policy.hidden * 8
    return terms


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

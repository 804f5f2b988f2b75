"""The memory model: bytes per process of training a model of a given shape as a resolved config says, term by
term (pure arithmetic, no torch: `plan`, the dry run and the micro-batch choice read it).

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
  method       each method's own terms, from its schema (`RunConfig.memory_terms`): the loss at least, and the
               models it runs beside the trained one (reference, teacher, reward model), its generation's KV cache
  loss         supervised_chunked (and every method's log-probabilities): one tile (1024 x 8192 fp32, x3 with
               temporaries) + fp32 hidden at supervised positions; supervised_liger: Liger's chunk (~2 x positions
               x hidden logits, model dtype + fp32 gradient) + fp32 hidden; trl: TRL's fused tiles (4096 x 32768
               fp32, x3); distill: its divergence's blocks (divergence_bytes) or TRL's; shown beside it, what full
               logits would take (B*T*V at bf16 + fp32 + fp32 gradient)
  overhead     1 GiB (CUDA context, allocator) + 10% fragmentation margin

Shapes come from the model families' published configurations (gemma2_tune/families). tests/unit/test_plan.py
checks the parameter counts against the published models and the activation and loss terms against peak
memory measured on tiny models on this CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..families import Shape

if TYPE_CHECKING:
    from .schema import RunConfig

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1}


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


def frozen_weight_bytes(shape: Shape, load_in: str, cfg: RunConfig, n: int) -> float:
    """Bytes per process of a frozen model's weights (a teacher, a reward model) loaded as `load_in`: '4bit' as
    cfg's 4-bit settings, '8bit' (one byte per linear weight, fp32 per-row scales, the rest in model.dtype), else
    full precision in model.dtype sharded over `n` processes."""
    dtype = DTYPE_BYTES[cfg.model.dtype]
    if load_in == "4bit":
        return nf4_weight_bytes(shape, cfg)
    if load_in == "8bit":
        return shape.linear_params * (1 + 4 / shape.hidden) + shape.other_params * dtype
    return shape.total_params * dtype / n


def estimate(shape: Shape, cfg: RunConfig, num_processes: int = 1, shards: bool = False, offload: bool = False,
             batch: int | None = None, length: int | None = None, frozen: dict[str, Shape] | None = None) -> Plan:
    """Per-process memory of training `shape` as `cfg` says. `shards`: parameters sharded over the
    `num_processes` (ZeRO-3); `batch`: items per forward (the micro-batch, default the config's per-device batch;
    tokens per optimizer step stay the config's batch x accumulation), `length`: tokens per item (default
    data.max_length). `frozen`: the shapes of the models the method loads beside the trained one, by config key
    (cfg.frozen_models(); the teacher). The method's own terms (its loss at least) come from its schema
    (`cfg.memory_terms`)."""
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
    terms.update(cfg.memory_terms(shape, b, t, n, shards, frozen or {}))
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


def trl_tile_bytes(vocab: int, positions: int) -> float:
    """TRL's fused LM head's (and its chunked divergence's) fp32 tiles, per model: at most 4,096 positions x 32,768
    vocabulary entries, x3 with temporaries (trl/kernels: TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE)."""
    return min(positions, 4096) * min(vocab, 32768) * 4 * 3


def divergence_rows(hidden_student: int, hidden_teacher: int) -> int:
    """Vocabulary rows per block of distill's divergence (training/divergence.py): (hidden_student + hidden_teacher)
    / DIVERGENCE_ROWS_PER_WIDTH, rounded down to a power of two, within DIVERGENCE_ROWS (schema.py: the
    measurements)."""
    from .schema import DIVERGENCE_ROWS, DIVERGENCE_ROWS_PER_WIDTH

    least, most = DIVERGENCE_ROWS
    rows = max(1, (hidden_student + hidden_teacher) // DIVERGENCE_ROWS_PER_WIDTH)
    return min(most, max(least, 1 << (rows.bit_length() - 1)))


def divergence_bytes(student: Shape, teacher: Shape, positions: int, weights_fp32: bool) -> float:
    """distill's divergence for `positions` completion positions: its six fp32 buffers of divergence_rows(widths)
    rows (fewer when fewer positions), fp32 copies of both lm_heads when they are stored in 16 bits and fit
    DIVERGENCE_CAST_BYTES, + fp32 hidden states of both models and the student's hidden-state gradient."""
    from .schema import DIVERGENCE_CAST_BYTES

    rows = min(positions, divergence_rows(student.hidden, teacher.hidden))
    copies = 4 * student.vocab * (student.hidden + teacher.hidden)
    copies = 0 if weights_fp32 or copies > DIVERGENCE_CAST_BYTES else copies
    return 6 * 4 * rows * student.vocab + copies + positions * (2 * student.hidden + teacher.hidden) * 4


def logprob_head_bytes(shape: Shape, positions: int, trl_head: bool) -> float:
    """The LM head's scoring memory for `positions` scored positions (an upper bound: every position): ours
    (training/logprobs.py: one fp32 tile of LOSS_TOKEN_CHUNK x LOSS_VOCAB_CHUNK, x3 with its reused buffer and
    temporaries), or TRL's fused head where it runs instead (`trl_head`: under ZeRO-3, or sft's training.loss=trl:
    trl_tile_bytes); + fp32 hidden states and their gradient."""
    from .schema import LOSS_TOKEN_CHUNK, LOSS_VOCAB_CHUNK

    tiles = (trl_tile_bytes(shape.vocab, positions) if trl_head
             else min(positions, LOSS_TOKEN_CHUNK) * min(shape.vocab, LOSS_VOCAB_CHUNK) * 4 * 3)
    return tiles + positions * shape.hidden * 8

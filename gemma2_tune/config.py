"""The run configuration: one validated object, the single source of truth for a run.

Every default lives here, next to the reason for it. Field descriptions are written once and reused
by `--help`, `validate`, `--dry-run` and the README's config reference.

This module must stay light (pydantic and the standard library only): `validate` and `--help`
answer without importing torch.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

REFERENCE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = {"gate_proj", "up_proj", "down_proj"}
# Gemma 2's published soft-caps; real checkpoints carry these in config.json.
ATTENTION_SOFTCAP = 50.0
FINAL_SOFTCAP = 30.0
# Tile of the supervised-only loss (gemma2_tune/loss.py): token rows x vocabulary columns, fp32.
LOSS_TOKEN_CHUNK = 1024
LOSS_VOCAB_CHUNK = 8192

Dtype = Literal["bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name_or_path: str = Field(
        "google/gemma-2-9b",
        description="Hub id or local directory of a Gemma 2 checkpoint; `builtin:tiny-gemma2` is a tiny "
        "random Gemma 2 built locally (for the CPU quickstart and tests).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "eager",
        description="Attention kernel. `eager` keeps Gemma 2's attention soft-capping; `sdpa` is refused "
        "(it drops the soft-cap); `flash_attention_2` only with a flash-attn that supports softcap.",
    )
    dtype: Dtype = Field(
        "bfloat16",
        description="Weights and compute dtype. bfloat16 is Gemma 2's reference precision; float16 is "
        "refused for 27B (unstable) and warned against elsewhere.",
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading.")


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="QLoRA: load the base weights in 4-bit with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Dtype | None = Field(None, description="Dtype of 4-bit matmuls; default: model.dtype.")
    quant_storage: Dtype | Literal["uint8"] | None = Field(
        None,
        description="Storage dtype of packed 4-bit weights; default: the compute dtype (needed for ZeRO-3 / FSDP "
        "sharding).",
    )


class LoraSection(Section):
    enabled: bool = Field(True, description="Train LoRA adapters; false means full fine-tuning.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(REFERENCE_TARGET_MODULES),
        description="Modules to adapt. Gemma 2 reference: the attention projections q/k/v/o, never the MLP.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class DataSection(Section):
    dataset: str = Field(
        "oasst",
        description="`oasst` (OpenAssistant/oasst_top1_2023-08-25), `quickstart` (chats shipped with the "
        "package), a hub dataset id, or a local .jsonl/.json/.parquet/.csv file or folder.",
    )
    config_name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Dataset split to train on.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    system_policy: Literal["fold", "drop", "error"] = Field(
        "fold",
        description="System messages: `fold` into the first user turn, `drop` them, or treat them as bad rows "
        "(`error`). Gemma has no system role.",
    )
    on_bad_rows: Literal["skip", "error"] = Field(
        "skip", description="Rows that can't become valid Gemma turns: `skip` (counted, reported) or fail the run."
    )
    max_length: int = Field(1024, gt=8, description="Maximum tokens per training row.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than max_length: cut at max_length, or drop the row. Both are counted."
    )
    train_on: Literal["model_turns", "all"] = Field(
        "model_turns",
        description="Loss on model turns only (each with its <end_of_turn>), or on every token.",
    )
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows (after loading).")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Hold out this fraction of rows (seeded) for evaluation during training."
    )
    eval_split: str | None = Field(None, description="Or evaluate on this split of the same dataset (e.g. test).")
    packing: bool = Field(
        True,
        description="Pack rows into blocks of max_length tokens (best-fit), each row masked from the others "
        "(position ids restart, no cache); a batch item is then a block. False: one row per batch item.",
    )


class TrainingSection(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(1, gt=0, description="Rows per device per micro-batch.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides num_train_epochs.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="transformers optimizer name (e.g. adamw_torch, paged_adamw_8bit).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N optimizer steps.")
    eval_steps: int = Field(100, gt=0, description="Evaluate on the held-out rows every N steps (and at the end).")
    save_steps: int | None = Field(
        500, gt=0, description="Save a resumable checkpoint every N optimizer steps (null: none, only the final output)."
    )
    save_total_limit: int = Field(2, gt=0, description="Keep only the newest K checkpoints.")
    seed: int = Field(42, description="Seed for data order, LoRA init and dropout.")
    report_to: Literal["none", "wandb", "tensorboard"] = Field("none", description="Experiment tracker.")
    loss: Literal["supervised_chunked", "trl"] = Field(
        "supervised_chunked",
        description="`supervised_chunked`: lm_head, soft-cap and cross-entropy only at supervised positions, in "
        "tiles (no full logits). `trl`: TRL's own loss. Under ZeRO-3 TRL's loss is used.",
    )


class OutputSection(Section):
    dir: str = Field("runs/gemma2-sft", description="Output directory for adapter, tokenizer, config and manifest.")
    overwrite: bool = Field(False, description="Allow replacing the output of a previous run in `dir`.")


class RunConfig(Section):
    """Everything a run needs, resolved: defaults < recipe < --set < flags."""

    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)

    # Derived values: computed here once, read everywhere else.
    @property
    def compute_dtype(self) -> str:
        return self.quantization.compute_dtype or self.model.dtype

    @property
    def quant_storage(self) -> str:
        return self.quantization.quant_storage or self.compute_dtype

    @property
    def rows_per_optimizer_step(self) -> int:
        return self.training.per_device_train_batch_size * self.training.gradient_accumulation_steps


SECTIONS = {
    "model": ModelSection,
    "quantization": QuantizationSection,
    "lora": LoraSection,
    "data": DataSection,
    "training": TrainingSection,
    "output": OutputSection,
}

_SIZE_RE = re.compile(r"(?<![0-9.])(2|9|27)b(?![a-z0-9])", re.IGNORECASE)


def model_size_from_name(name: str) -> str | None:
    """'27b' for 'google/gemma-2-27b-it', None when the name doesn't say."""
    match = _SIZE_RE.search(name)
    return f"{match.group(1)}b" if match else None


def cross_field_problems(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Rules between fields. Returns (errors, warnings), each naming the key(s) involved."""
    errors: list[str] = []
    warnings: list[str] = []
    m, q, lora = cfg.model, cfg.quantization, cfg.lora

    if m.attn_implementation == "sdpa":
        errors.append(
            "model.attn_implementation: 'sdpa' drops Gemma 2's attention logit soft-capping (50.0); "
            "use 'eager' (or 'flash_attention_2' with a flash-attn that supports softcap)"
        )
    size = model_size_from_name(m.name_or_path)
    if m.dtype == "float16":
        if size == "27b":
            errors.append("model.dtype: float16 is unstable for Gemma 2 27B; use bfloat16")
        else:
            warnings.append("model.dtype: float16 can overflow with Gemma 2; bfloat16 is the reference precision")
    if q.load_in_4bit and not lora.enabled:
        errors.append(
            "quantization.load_in_4bit with lora.enabled=false: 4-bit weights can't be trained directly; "
            "enable LoRA (QLoRA) or set quantization.load_in_4bit=false for full fine-tuning"
        )
    if cfg.data.eval_fraction and cfg.data.eval_split:
        errors.append("data.eval_fraction and data.eval_split: choose one source of held-out rows")
    if not q.load_in_4bit and (q.compute_dtype or q.quant_storage):
        errors.append(
            "quantization.compute_dtype/quant_storage are set but quantization.load_in_4bit is false"
        )
    if lora.enabled:
        if not lora.target_modules:
            errors.append("lora.target_modules: empty; the reference is [q_proj, k_proj, v_proj, o_proj]")
        mlp = sorted(set(lora.target_modules) & MLP_MODULES)
        if mlp:
            warnings.append(
                f"lora.target_modules: {mlp} are MLP projections; the Gemma 2 reference adapts attention only"
            )
        if len(set(lora.target_modules)) != len(lora.target_modules):
            errors.append(f"lora.target_modules: duplicates in {lora.target_modules}")
    return errors, warnings

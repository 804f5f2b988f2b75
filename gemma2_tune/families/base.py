"""What a model family is: the data every check reads. No behaviour beyond looking facts up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

SystemFold = Literal["join_trimmed", "first_verbatim"]


@dataclass(frozen=True)
class Shape:
    """A decoder's shape, as in its config.json. Parameter counts are exact for Gemma 2 and Gemma 3 text
    (tied embedding/lm_head, 4 RMSNorms per layer, QK-norm in Gemma 3)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    sliding_window: int = 4096
    qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys (head_dim weights each)
    source: str = ""  # where the numbers come from (a URL for published shapes, a path for local ones)

    @property
    def attention_params(self) -> int:
        """q, k, v, o projections of one layer."""
        return 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def mlp_params(self) -> int:
        """gate, up, down projections of one layer."""
        return 3 * self.hidden * self.intermediate

    @property
    def linear_params(self) -> int:
        """Every layer's attention and MLP projections (what 4-bit quantizes)."""
        return self.layers * (self.attention_params + self.mlp_params)

    @property
    def other_params(self) -> int:
        """Tied embedding/lm_head, 4 norms per layer (+ q/k norms), final norm."""
        norms = 4 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.vocab * self.hidden + self.layers * norms + self.hidden

    @property
    def total_params(self) -> int:
        """All parameters (embedding counted once: it is tied to lm_head)."""
        return self.linear_params + self.other_params

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a linear module by its leaf name; KeyError for other names."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[name]

    @classmethod
    def from_config(cls, data: dict[str, Any], source: str = "") -> Shape:
        """From a config.json dict (Gemma 2 or Gemma 3 text); KeyError when a size field is missing."""
        return cls(data["vocab_size"], data["hidden_size"], data["num_hidden_layers"], data["num_attention_heads"],
                   data["num_key_value_heads"],
                   data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
                   data["intermediate_size"], data.get("sliding_window") or 4096,
                   qk_norm=data.get("model_type") == "gemma3_text", source=source)


@dataclass(frozen=True)
class AttentionKernel:
    """One `attn_implementation` and whether it computes this family's attention exactly."""

    name: str
    allowed: bool
    reason: str  # why it keeps (or loses) the family's numerics; shown in errors and `config`
    applies_softcap: bool = True  # computes an attention soft-cap when a checkpoint sets one
    needs: tuple[str, tuple[int, ...]] | None = None  # (distribution, minimum version) it depends on
    cpu_backward: bool = True  # can train on a CPU (flex_attention's kernel has no CPU backward)


@dataclass(frozen=True)
class Family:
    """Every fact gemma2-tune relies on about one Gemma generation."""

    key: str  # "gemma2"
    display: str  # "Gemma 2"
    model_types: tuple[str, ...]  # config.json model_type values it covers
    name_pattern: str  # regex recognising hub ids and builtin names of this family
    size_pattern: str  # regex with one group: the size in a name ("27b", "270m")
    attention_softcap: float | None  # tanh cap on attention scores; None: the family has none
    final_softcap: float | None  # tanh cap on the output logits
    kernels: dict[str, AttentionKernel]
    layer_pattern: str  # in words, e.g. "sliding-window (4096) and global layers alternate"
    sliding_per_global: int  # sliding-window layers per global layer
    shapes: dict[str, Shape]  # published sizes
    multimodal_sizes: dict[str, str] = field(default_factory=dict)  # sizes of this generation we refuse, and why
    system_fold: SystemFold = "join_trimmed"
    system_note: str = ""  # how system text reaches the model, in words
    # "gemma": <start_of_turn>ROLE ... <end_of_turn> (Gemma 2, Gemma 3); "gemma4": <|turn>ROLE ... <turn|> (Gemma 4)
    turn_format: str = "gemma"
    # Sizes whose official -it template writes an empty thought block after the model header when thinking is off
    # (Gemma 4 12B, 26B-A4B, 31B; not E2B/E4B): rows must carry it too, or training starts far off the -it model.
    empty_thought_sizes: tuple[str, ...] = ()
    attention_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    fp16_refused_sizes: tuple[str, ...] = ()
    fp16_note: str = ""
    config_class: str = ""  # transformers configuration class (the tiny builder uses it)
    liger_patch: str | None = None  # liger_kernel.transformers function patching this family's model (None: none)
    tiny_config: dict[str, Any] = field(default_factory=dict)  # shape of builtin:tiny-<key>

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """Leaf names of the linear modules LoRA can adapt."""
        return self.attention_modules + self.mlp_modules

    @property
    def tiny_name(self) -> str:
        """The builtin name of this family's tiny test model."""
        return f"builtin:tiny-{self.key}"

    def matches_name(self, name: str) -> bool:
        """Does a hub id or builtin name belong to this family (by `name_pattern`)?"""
        return re.search(self.name_pattern, name, re.IGNORECASE) is not None

    def size_from_name(self, name: str) -> str | None:
        """'27b' for 'google/gemma-2-27b-it'; None when the name doesn't say."""
        match = re.search(self.size_pattern, name, re.IGNORECASE)
        return match.group(1).lower() if match else None

    def size_of_shape(self, hidden: int, layers: int) -> str | None:
        """The published size with this width and depth (a checkpoint's config.json), or None."""
        return next((size for size, s in self.shapes.items() if (s.hidden, s.layers) == (hidden, layers)), None)

    def kernel_problem(self, kernel: str) -> str | None:
        """Why `kernel` can't be used with this family (None when it can), naming the key."""
        known = self.kernels.get(kernel)
        if known is None:
            return f"model.attn_implementation: '{kernel}' is not known for {self.display} (use {', '.join(self.kernels)})"
        return None if known.allowed else f"model.attn_implementation: '{kernel}' {known.reason}"

"""What a model family is: the data every check reads. No behaviour beyond looking facts up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

SystemFold = Literal["join_trimmed", "first_verbatim"]
SLIDING, GLOBAL = "sliding_attention", "full_attention"


def layer_pattern(layers: int, every: int) -> tuple[str, ...]:
    """Layer kinds for `layers` decoder layers where every `every`-th one is global (full attention) and the rest
    use the sliding window, as transformers' Gemma 3 and Gemma 4 configurations build `layer_types` (a model whose
    depth is no multiple of `every` ends on sliding layers, Gemma 3 4B's 34 layers for one)."""
    return tuple(GLOBAL if (i + 1) % every == 0 else SLIDING for i in range(layers))


@dataclass(frozen=True)
class Shape:
    """A decoder's shape, as in its config.json (the text configuration of a multimodal checkpoint), and the
    parameters of the towers beside it. Parameter counts are exact (tests/unit/test_families.py builds each
    published configuration with transformers on the meta device): tied embedding/lm_head, 4 RMSNorms per layer,
    QK-norm from Gemma 3 on.

    Gemma 4 layers are not all alike, so counts go layer by layer: global layers have `global_head_dim` (512) and
    may have `global_kv_heads` and keys reused as values (`k_eq_v`: no v_proj); the last `kv_shared_layers` layers
    reuse earlier layers' keys and values (no k/v projections) and, with `double_wide_mlp`, have an MLP twice as
    wide; per-layer embeddings (PLE) add a `per_layer_vocab` x layers x `per_layer_dim` table, a projection into
    it and a gate and a projection in every layer; a mixture of experts adds `experts` experts of width
    `expert_intermediate` (3-D weights, which bitsandbytes does not quantize) beside each layer's dense MLP."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    sliding_window: int = 4096
    qk_norm: bool = False  # Gemma 3 and 4: RMSNorm on queries and keys (head_dim weights each)
    source: str = ""  # where the numbers come from (a URL for published shapes, a path for local ones)
    layer_types: tuple[str, ...] = ()  # per layer, SLIDING or GLOBAL; () when every layer has the same shape
    global_head_dim: int = 0  # head_dim of global layers (0: head_dim)
    global_kv_heads: int = 0  # key/value heads of global layers (0: kv_heads)
    k_eq_v: bool = False  # global layers use their keys as values (no v_proj)
    kv_shared_layers: int = 0  # the last N layers reuse earlier layers' keys and values (no k/v projections)
    double_wide_mlp: bool = False  # KV-shared layers have an MLP of twice `intermediate`
    per_layer_dim: int = 0  # per-layer embeddings (PLE): width per layer (0: none)
    per_layer_vocab: int = 0  # PLE table rows
    experts: int = 0  # mixture of experts: experts per layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0
    tower_params: int = 0  # vision/audio towers and their projectors into the decoder (frozen, never 4-bit)

    def is_global(self, layer: int) -> bool:
        """Is `layer` a global (full attention) layer? False for every layer of a uniform shape."""
        return bool(self.layer_types) and self.layer_types[layer] == GLOBAL

    def shares_kv(self, layer: int) -> bool:
        """Does `layer` reuse an earlier layer's keys and values (and so have no k/v projections)?"""
        return layer >= self.layers - self.kv_shared_layers

    def layer_projections(self, layer: int) -> dict[str, tuple[int, int]]:
        """{leaf name: (in_features, out_features)} of one decoder layer's attention and MLP projections, only
        those the layer has."""
        wide = self.is_global(layer)
        head_dim = self.global_head_dim if wide and self.global_head_dim else self.head_dim
        kv_heads = self.global_kv_heads if wide and self.global_kv_heads else self.kv_heads
        q, kv = self.heads * head_dim, kv_heads * head_dim
        mlp = self.intermediate * (2 if self.double_wide_mlp and self.shares_kv(layer) else 1)
        found = {"q_proj": (self.hidden, q)}
        if not self.shares_kv(layer):
            found["k_proj"] = (self.hidden, kv)
            if not (self.k_eq_v and wide):
                found["v_proj"] = (self.hidden, kv)
        return found | {"o_proj": (q, self.hidden), "gate_proj": (self.hidden, mlp), "up_proj": (self.hidden, mlp),
                        "down_proj": (mlp, self.hidden)}

    def layer_head_dim(self, layer: int) -> int:
        """head_dim of `layer` (global layers may be wider)."""
        return self.global_head_dim if self.is_global(layer) and self.global_head_dim else self.head_dim

    @property
    def linear_params(self) -> int:
        """The decoder's linear layers (what 4-bit quantizes): every layer's attention and MLP projections, PLE's
        projections, the routers' projections."""
        projections = sum(i * o for layer in range(self.layers) for i, o in self.layer_projections(layer).values())
        ple = self.layers * 2 * self.hidden * self.per_layer_dim + self.hidden * self.layers * self.per_layer_dim
        return projections + ple + self.layers * self.hidden * self.experts

    @property
    def expert_params(self) -> int:
        """The experts' gate/up and down weights (3-D tensors: bitsandbytes leaves them 16-bit)."""
        return self.layers * self.experts * 3 * self.hidden * self.expert_intermediate

    @property
    def per_layer_embedding_params(self) -> int:
        """The PLE table: per_layer_vocab x layers x per_layer_dim (an embedding: never 4-bit)."""
        return self.per_layer_vocab * self.layers * self.per_layer_dim

    @property
    def norm_params(self) -> int:
        """RMSNorm weights (4 per layer, query and key norms, PLE's and MoE's own), routers' scales, final norm."""
        per_layer = 0
        for layer in range(self.layers):
            per_layer += 4 * self.hidden
            if self.qk_norm:
                per_layer += self.layer_head_dim(layer) * (1 if self.shares_kv(layer) else 2)
        ple = (self.layers * self.hidden + self.per_layer_dim) if self.per_layer_dim else 0
        moe = self.layers * (4 * self.hidden + self.experts) if self.experts else 0
        return per_layer + ple + moe + self.hidden

    @property
    def other_params(self) -> int:
        """Everything 4-bit leaves in 16-bit: the tied embedding/lm_head, the PLE table, norms, experts, towers."""
        return (self.vocab * self.hidden + self.per_layer_embedding_params + self.norm_params + self.expert_params
                + self.tower_params)

    @property
    def total_params(self) -> int:
        """All parameters (embedding counted once: it is tied to lm_head), towers included."""
        return self.linear_params + self.other_params

    def lora_params(self, r: int, targets: list[str]) -> int:
        """LoRA parameters of rank `r` on the leaf names `targets`: r x (in + out) per adapted module, counting
        only the modules each layer has."""
        return sum(r * sum(shape) for layer in range(self.layers)
                   for name, shape in self.layer_projections(layer).items() if name in targets)

    @classmethod
    def from_config(cls, data: dict[str, Any], source: str = "") -> Shape:
        """From a config.json dict: a text model's (Gemma 2, Gemma 3 text, Gemma 4 text) or a multimodal one's
        (its `text_config`, and its towers counted by families/towers.py). KeyError when a size field is
        missing."""
        from .towers import tower_params

        text = data.get("text_config") or data
        text_type = text.get("model_type") or data.get("model_type") or ""
        gemma4 = text_type.startswith("gemma4")
        global_head_dim = global_kv_heads = 0
        if gemma4:  # transformers 5 writes the global layers' shape as per_layer_config; published files as keys
            per_layer = next(iter((text.get("per_layer_config") or {}).values()), None)
            if per_layer is not None:
                global_head_dim = per_layer.get("head_dim", 0)
                global_kv_heads = per_layer.get("num_key_value_heads", 0)
            else:
                global_head_dim = text.get("global_head_dim") or 512  # Gemma4TextConfig's default
                global_kv_heads = (text.get("num_global_key_value_heads") or 0) if text.get("attention_k_eq_v") else 0
        return cls(text["vocab_size"], text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
                   text["num_key_value_heads"],
                   text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
                   text["intermediate_size"], text.get("sliding_window") or 4096,
                   qk_norm=text_type in ("gemma3_text",) or gemma4, source=source,
                   layer_types=tuple(text.get("layer_types") or ()) if gemma4 else (),
                   global_head_dim=global_head_dim, global_kv_heads=global_kv_heads,
                   k_eq_v=bool(text.get("attention_k_eq_v")),
                   kv_shared_layers=text.get("num_kv_shared_layers") or 0,
                   double_wide_mlp=bool(text.get("use_double_wide_mlp")),
                   per_layer_dim=text.get("hidden_size_per_layer_input") or 0,
                   per_layer_vocab=(text.get("vocab_size_per_layer_input") or text["vocab_size"])
                   if text.get("hidden_size_per_layer_input") else 0,
                   experts=(text.get("num_experts") or 0) if text.get("enable_moe_block") else 0,
                   experts_per_token=text.get("top_k_experts") or 0,
                   expert_intermediate=text.get("moe_intermediate_size") or 0,
                   tower_params=tower_params(data))


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
class ImageFacts:
    """How a family's checkpoints take images, as their processors and official templates write them."""

    placeholder: str  # what the official template writes for an image part; the processor expands it
    begin: str  # the marker before an image's soft tokens
    soft_token: str  # one per soft token (the image encoder's output vectors are put in their place)
    end: str  # the marker after them
    soft_token_config_key: str  # config.json key holding the soft token's id
    projector: str  # module path of the projector into the decoder (one of `towers`)
    token_type_key: str  # the forward's input marking image tokens: without it the image mask silently is causal
    processor_class: str  # transformers' processor of the published checkpoints (its expansion is reproduced)


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
    # Module names (prefixes, in the checkpoint's own class) of the vision/audio towers and their projectors into
    # the decoder: frozen in training, never adapted by LoRA, left unquantized by 4-bit loading, kept by merges.
    towers: tuple[str, ...] = ()
    # Images (None: this family's checkpoints read no images): the markers its processor writes around an image's
    # soft tokens and the placeholder the official template writes for an image part, the module projecting image
    # features into the decoder (trained only on request: model.train_projector), the forward's token-type input
    # that makes image tokens attend to each other. Families/gemma3.py and gemma4.py give the sources.
    images: ImageFacts | None = None
    gguf_architecture: str = ""  # llama.cpp's name for the decoder (general.architecture); "" -> key
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
    def gguf_arch(self) -> str:
        """llama.cpp's architecture name for this family's decoder (what a GGUF's general.architecture says)."""
        return self.gguf_architecture or self.key

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

"""Gemma 3 text models (google/gemma-3-270m, gemma-3-1b-pt and their -it versions; model_type gemma3_text).

Sources: the published config.json of each size (URLs on each shape), the Gemma 3 report (arXiv 2503.19786):
no logit soft-capping (QK-norm instead), five local sliding-window layers per global layer (window 512 at
these sizes), and Gemma 3's chat template, which folds a first system message verbatim plus a blank line
into the first user turn. The 4B, 12B and 27B Gemma 3 models are multimodal (model_type gemma3): refused.
"""

from __future__ import annotations

from .base import AttentionKernel, Family, Shape

_HUB = "https://huggingface.co/google/gemma-3-{}/blob/main/config.json"
_MULTIMODAL = "multimodal (image + text, model_type gemma3); only the text models 270m and 1b are supported"

GEMMA3_TEXT = Family(
    key="gemma3",
    display="Gemma 3 text",
    model_types=("gemma3_text",),
    name_pattern=r"gemma-?3(?![0-9a-z])",
    size_pattern=r"(?<![0-9.])(270m|1b|4b|12b|27b)(?![a-z0-9])",
    attention_softcap=None,
    final_softcap=None,
    kernels={
        "eager": AttentionKernel("eager", True, "the reference attention"),
        "sdpa": AttentionKernel("sdpa", True, "exact for Gemma 3: it has no attention soft-cap (QK-norm instead)",
                                applies_softcap=False),
        "flash_attention_2": AttentionKernel("flash_attention_2", True, "exact for Gemma 3 (no soft-cap to keep)",
                                             needs=("flash-attn", (2, 0, 0))),
        "flex_attention": AttentionKernel("flex_attention", True, "masks packed rows and the sliding window through "
                                          "its block mask", cpu_backward=False),
    },
    layer_pattern="five sliding-window layers (512 tokens at 270M/1B) per global attention layer",
    sliding_per_global=5,
    shapes={
        "270m": Shape(262144, 640, 18, 4, 1, 256, 2048, 512, qk_norm=True, source=_HUB.format("270m")),
        "1b": Shape(262144, 1152, 26, 4, 1, 256, 6912, 512, qk_norm=True, source=_HUB.format("1b-pt")),
    },
    multimodal_sizes={"4b": _MULTIMODAL, "12b": _MULTIMODAL, "27b": _MULTIMODAL},
    system_fold="first_verbatim",
    system_note="Gemma 3's template takes one system message, first, and puts its text verbatim plus a blank "
                "line before the first user turn",
    fp16_note="float16 can overflow Gemma 3's activations; bfloat16 is the reference precision",
    config_class="Gemma3TextConfig",
    liger_patch="apply_liger_kernel_to_gemma3_text",
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=32,  # short, so ordinary rows cross it
        layer_types=["sliding_attention"] * 3 + ["full_attention"],  # Gemma 3's local:global pattern, shortened
        max_position_embeddings=4096,
        initializer_range=0.15,
    ),
)

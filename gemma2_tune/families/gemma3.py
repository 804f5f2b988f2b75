"""Gemma 3: the text models (google/gemma-3-270m, gemma-3-1b-pt and their -it versions; model_type gemma3_text)
and the image + text models (google/gemma-3-4b, -12b, -27b, -pt and -it; model_type gemma3,
Gemma3ForConditionalGeneration: a SigLIP image encoder and a projector beside the decoder).

Sources: the published config.json of each size (URLs on each shape), the Gemma 3 report (arXiv 2503.19786):
no logit soft-capping (QK-norm instead), five local sliding-window layers per global layer (window 512 at
270M/1B, 1,024 at 4B and up), and Gemma 3's chat template, which folds a first system message verbatim plus a
blank line into the first user turn. The image + text sizes share the text models' turn format; their towers
are frozen in training and kept whole by every command (families/base.py: Family.towers).
"""

from __future__ import annotations

from .base import AttentionKernel, Family, ImageFacts, Shape
from .towers import siglip_params

_HUB = "https://huggingface.co/google/gemma-3-{}/blob/main/config.json"

_KERNELS = {
    "eager": AttentionKernel("eager", True, "the reference attention"),
    "sdpa": AttentionKernel("sdpa", True, "exact for Gemma 3: it has no attention soft-cap (QK-norm instead)",
                            applies_softcap=False),
    "flash_attention_2": AttentionKernel("flash_attention_2", True, "exact for Gemma 3 (no soft-cap to keep)",
                                         needs=("flash-attn", (2, 0, 0))),
    "flex_attention": AttentionKernel("flex_attention", True, "masks packed rows and the sliding window through "
                                      "its block mask", cpu_backward=False),
}
_SYSTEM_NOTE = ("Gemma 3's template takes one system message, first, and puts its text verbatim plus a blank line "
                "before the first user turn")
_FP16_NOTE = "float16 can overflow Gemma 3's activations; bfloat16 is the reference precision"

GEMMA3_TEXT = Family(
    key="gemma3",
    display="Gemma 3 text",
    model_types=("gemma3_text",),
    # the 4B, 12B and 27B names are GEMMA3's (image + text), as is builtin:tiny-gemma3-vision
    name_pattern=r"gemma-?3(?![0-9a-z])(?!-(?:(?:4|12|27)b(?![0-9a-z])|vision))",
    size_pattern=r"(?<![0-9.])(270m|1b)(?![a-z0-9])",
    attention_softcap=None,
    final_softcap=None,
    kernels=_KERNELS,
    layer_pattern="five sliding-window layers (512 tokens at 270M/1B) per global attention layer",
    sliding_per_global=5,
    shapes={
        "270m": Shape(262144, 640, 18, 4, 1, 256, 2048, 512, qk_norm=True, source=_HUB.format("270m")),
        "1b": Shape(262144, 1152, 26, 4, 1, 256, 6912, 512, qk_norm=True, source=_HUB.format("1b-pt")),
    },
    system_fold="first_verbatim",
    system_note=_SYSTEM_NOTE,
    fp16_note=_FP16_NOTE,
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

# The image encoder of every image + text size (vision_config of google/gemma-3-4b-pt, -12b-pt, -27b-pt):
# SigLIP so400m at 896 x 896 pixels, 14-pixel patches, without its pooling head; 256 image tokens per image.
_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
               image_size=896, patch_size=14, vision_use_head=False)


def _vision_shape(size: str, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                  intermediate: int) -> Shape:
    # vocab 262,208: 262,144 text tokens + the image tokens and padding (the -pt configs' vocab_size)
    return Shape(262208, hidden, layers, heads, kv_heads, head_dim, intermediate, 1024, qk_norm=True,
                 tower_params=siglip_params(_SIGLIP, hidden), source=_HUB.format(f"{size}-pt"))


GEMMA3 = Family(
    key="gemma3-vision",
    display="Gemma 3 (image + text)",
    model_types=("gemma3",),
    name_pattern=r"gemma-?3-(?:(?:4|12|27)b(?![0-9a-z])|vision)",
    size_pattern=r"(?<![0-9.])(4b|12b|27b)(?![a-z0-9])",
    attention_softcap=None,
    final_softcap=None,
    kernels=_KERNELS | {
        "flash_attention_2": AttentionKernel(
            "flash_attention_2", False,
            "is refused for Gemma3ForConditionalGeneration by transformers: flash-attn cannot apply the "
            "bidirectional mask over image tokens; use 'sdpa' (exact: Gemma 3 has no soft-cap) or 'eager'"),
    },
    layer_pattern="five sliding-window layers (1,024 tokens) per global attention layer",
    sliding_per_global=5,
    shapes={
        "4b": _vision_shape("4b", 2560, 34, 8, 4, 256, 10240),
        "12b": _vision_shape("12b", 3840, 48, 16, 8, 256, 15360),
        "27b": _vision_shape("27b", 5376, 62, 32, 16, 128, 21504),
    },
    towers=("model.vision_tower", "model.multi_modal_projector"),
    # transformers 5.25's Gemma3Processor: the template's <start_of_image> becomes "\n\n<start_of_image>" + 256
    # <image_soft_token> + "<end_of_image>\n\n"; token_type_ids 1 on the soft tokens (Gemma3Model builds the
    # bidirectional image mask from them)
    images=ImageFacts("<start_of_image>", "<start_of_image>", "<image_soft_token>", "<end_of_image>",
                      "image_token_index", "model.multi_modal_projector", "token_type_ids", "Gemma3Processor"),
    gguf_architecture="gemma3",  # llama.cpp converts the decoder of Gemma3ForConditionalGeneration as gemma3
    system_fold="first_verbatim",
    system_note=_SYSTEM_NOTE,
    fp16_note=_FP16_NOTE,
    config_class="Gemma3Config",
    # Liger's Gemma3ForConditionalGeneration patch (it also fuses the SigLIP tower's LayerNorms); the probe check
    # (training/kernels.py) compares logits and gradients with the plain model before the first step
    liger_patch="apply_liger_kernel_to_gemma3",
    tiny_config=dict(
        text_config=GEMMA3_TEXT.tiny_config,
        # a SigLIP encoder at toy size: 32 x 32 pixels in 8-pixel patches, 16 patches pooled to 4 image tokens
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4,
        initializer_range=0.15,  # the composite model initialises every part with its own config's range
    ),
)

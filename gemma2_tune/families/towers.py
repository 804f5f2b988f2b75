"""Parameters of the vision and audio towers beside a multimodal Gemma's decoder, from its config.json.

Each function follows the module structure of the transformers class it names (5.25): the count is what
`named_parameters()` yields (buffers such as Gemma 4's clipping bounds are not parameters). A missing key takes
the default of that transformers configuration class. tests/unit/test_families.py compares every formula with the
model built on the meta device.

    tower_params(config.json as a dict) -> int   (0 for a text-only checkpoint)
"""

from __future__ import annotations

from typing import Any

Config = dict[str, Any]


def siglip_params(vision: Config, text_hidden: int) -> int:
    """Gemma 3's SigLIP image encoder (SiglipVisionModel; its pooling head only with vision_use_head) and the
    projector into the decoder (Gemma3MultiModalProjector: a vision-width x text-width matrix and an RMSNorm)."""
    h, i = vision.get("hidden_size", 768), vision.get("intermediate_size", 3072)
    patch, image = vision.get("patch_size", 16), vision.get("image_size", 224)
    embeddings = 3 * patch * patch * h + h + (image // patch) ** 2 * h  # patch convolution (with bias), positions
    layer = 2 * 2 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h)  # two LayerNorms, q/k/v/out, fc1/fc2, biases
    post = 2 * h  # post-LayerNorm
    # the attention-pooling head (probe, attention, LayerNorm, MLP); Gemma 3's configs turn it off
    head = (h + 4 * h * h + 4 * h + 2 * h + (h * i + i) + (i * h + h)) if vision.get("vision_use_head", True) else 0
    return embeddings + vision.get("num_hidden_layers", 12) * layer + post + head + h * text_hidden + h


def gemma4_vision_params(vision: Config, text_hidden: int) -> int:
    """Gemma 4's image encoder (Gemma4VisionModel: patch projection, a 2-D position table, layers with
    QK-norm and a gated MLP) and its embedder into the decoder (Gemma4MultimodalEmbedder)."""
    h, i = vision.get("hidden_size", 768), vision.get("intermediate_size", 3072)
    heads, kv_heads = vision.get("num_attention_heads", 12), vision.get("num_key_value_heads", 12)
    head_dim = vision.get("head_dim", 64)
    patch, positions = vision.get("patch_size", 16), vision.get("position_embedding_size", 10 * 1024)
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 2 * head_dim  # q, k, v, o; q/k norms
    layer = attention + 4 * h + 3 * h * i  # four RMSNorms, gate/up/down
    return 3 * patch * patch * h + 2 * positions * h + vision.get("num_hidden_layers", 16) * layer + h * text_hidden


def gemma4_audio_params(audio: Config, text_hidden: int) -> int:
    """Gemma 4's audio encoder (Gemma4AudioModel: two strided convolutions, conformer layers, an output
    projection) and its embedder into the decoder."""
    h, heads = audio.get("hidden_size", 1024), audio.get("num_attention_heads", 8)
    c0, c1 = audio.get("subsampling_conv_channels", [128, 32])
    out, kernel = audio.get("output_proj_dims", 1536), audio.get("conv_kernel_size", 5)
    subsample = 9 * c0 + c0 + 9 * c0 * c1 + c1 + (c0 // 4) * c1 * h  # two 3x3 convolutions + norms, input projection
    feed_forward = 2 * 4 * h * h + 2 * h  # two of these per layer
    attention = 5 * h * h + h // heads  # q, k, v, post, relative k; per-dimension scale
    convolution = 2 * h * h + h * h + h * kernel + 2 * h  # linear start (GLU), end, depthwise kernel, two norms
    layer = 2 * feed_forward + attention + convolution + 3 * h
    return subsample + audio.get("num_hidden_layers", 12) * layer + h * out + out + out * text_hidden


def gemma4_unified_vision_params(vision: Config, text_hidden: int) -> int:
    """Gemma 4 12B's encoder-free image path (Gemma4UnifiedVisionEmbedder: LayerNorm, dense patch projection,
    LayerNorm, a factorized 2-D position table, LayerNorm, then the projection into the decoder)."""
    width = vision.get("mm_embed_dim", 3840)
    patch_dim = (vision.get("patch_size", 16) * vision.get("pooling_kernel_size", 3)) ** 2 * 3
    return (2 * patch_dim + patch_dim * width + width + 2 * 2 * width + vision.get("mm_posemb_size", 1120) * 2 * width
            + vision.get("output_proj_dims", 3840) * text_hidden)


def gemma4_unified_audio_params(audio: Config, text_hidden: int) -> int:
    """Gemma 4 12B's encoder-free audio path: raw waveform frames projected into the decoder."""
    return audio.get("audio_embed_dim", 640) * text_hidden


TOWERS = {  # model_type -> (vision formula, audio formula)
    "gemma3": (siglip_params, None),
    "gemma4": (gemma4_vision_params, gemma4_audio_params),
    "gemma4_unified": (gemma4_unified_vision_params, gemma4_unified_audio_params),
}


def tower_params(config: Config) -> int:
    """Parameters of the towers (and their projectors) a config.json describes beside its decoder; 0 for a
    text-only configuration."""
    formulas = TOWERS.get(config.get("model_type") or "")
    if formulas is None:
        return 0
    text_hidden = (config.get("text_config") or {}).get("hidden_size", 2304)
    total = 0
    for formula, key in zip(formulas, ("vision_config", "audio_config")):
        if formula is not None and config.get(key) is not None:
            total += formula(config[key], text_hidden)
    return total

"""Gemma 4 (April 2026): google/gemma-4-E2B, -E4B, -26B-A4B, -31B and their -it versions (model_type gemma4,
Gemma4ForConditionalGeneration; text-only conversions: gemma4_text, Gemma4ForCausalLM), and google/gemma-4-12B
(-it) (model_type gemma4_unified, Gemma4UnifiedForConditionalGeneration: no encoder towers, images and audio
projected straight into the decoder).

Facts, with their sources (the published config.json of each size, URLs on each shape; transformers 5.25's
configuration_gemma4.py and modeling_gemma4.py; the -it generation configs and chat templates):
- Final-logit soft-cap 30.0 in every published config, though Gemma4TextConfig defaults it to None: a config
  without it is refused after loading (models/checks.py). No attention soft-cap (QK-norm).
- Sliding-window (512 tokens at E2B/E4B, 1,024 from 12B up) and global layers, 4:1 at E2B, 5:1 elsewhere; global
  layers have head_dim 512 (sliding ones 256), which flash-attn's kernels do not support (at most 256).
- 12B, 26B-A4B and 31B: global layers reuse keys as values (attention_k_eq_v: no v_proj) with fewer key/value
  heads (num_global_key_value_heads).
- E2B and E4B: the last 20 / 18 layers reuse the keys and values of the last earlier layer of their kind (no k/v
  projections; E2B's have a double-width MLP), and per-layer embeddings: a 262,144 x layers x 256 table (2.35B /
  2.82B parameters, an embedding: never 4-bit) added to every layer's input.
- 26B-A4B: a mixture of 128 experts (8 per token, width 704) beside each layer's dense MLP; the experts are 3-D
  tensors, which bitsandbytes leaves in 16-bit.
- Towers: an image encoder (16 layers, width 768 at E2B/E4B; 27 layers, width 1,152 at 26B-A4B/31B) and at
  E2B/E4B a 12-layer audio conformer, each with an embedder into the decoder; their q/k/v/o projections are
  Gemma4ClippableLinear modules named like the decoder's (LoRA must never be aimed at them).
- Turn format `<|turn>ROLE ... <turn|>`, a native system role, a thought channel; the 12B, 26B-A4B and 31B -it
  templates write an empty thought block when thinking is off.
Parameter counts were checked against transformers' classes built on the meta device (tests/unit/test_families.py);
the 31B's equals its published safetensors total (31,273,088,876) less its 2,364 stored buffers.
"""

from __future__ import annotations

from .base import AttentionKernel, Family, ImageFacts, Shape, layer_pattern
from .towers import gemma4_audio_params, gemma4_unified_audio_params, gemma4_unified_vision_params, gemma4_vision_params

_HUB = "https://huggingface.co/google/gemma-4-{}/blob/main/config.json"
_VOCAB = 262144

_KERNELS = {
    "eager": AttentionKernel("eager", True, "the reference attention"),
    "sdpa": AttentionKernel(
        "sdpa", True, "exact for Gemma 4: it has no attention soft-cap (QK-norm); the final soft-cap is applied "
        "after lm_head, outside the kernel", applies_softcap=False),
    "flash_attention_2": AttentionKernel(
        "flash_attention_2", False,
        "is refused for Gemma 4: its global layers have head_dim 512 and flash-attn's kernels support head dims up "
        "to 256 (transformers also refuses it for Gemma4ForConditionalGeneration: it drops the bidirectional mask "
        "over image tokens); use 'sdpa' or 'eager'"),
    "flex_attention": AttentionKernel(
        "flex_attention", False,
        "is refused for Gemma 4: torch.compile recompiles its kernel for each head dim (256 on sliding layers, 512 "
        "on global ones) and for each mask, hits its recompile limit and falls back to the uncompiled kernel "
        "(measured on the tiny Gemma 4); use 'sdpa' or 'eager'", cpu_backward=False),
}

# Image encoders (vision_config of the published configs) and the E2B/E4B audio encoder (audio_config).
_SMALL_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                     num_key_value_heads=12, head_dim=64, patch_size=16, position_embedding_size=10240)
_LARGE_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=72, patch_size=16, position_embedding_size=10240)
_AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=[128, 32],
              conv_kernel_size=5, output_proj_dims=1536)


def _shape(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, every: int,
           window: int, towers: int, **extra) -> Shape:
    return Shape(_VOCAB, hidden, layers, heads, kv_heads, 256, intermediate, window, qk_norm=True,
                 layer_types=layer_pattern(layers, every), global_head_dim=512, tower_params=towers,
                 source=_HUB.format(name), **extra)


def _towers(vision: dict, hidden: int, audio: bool) -> int:
    return gemma4_vision_params(vision, hidden) + (gemma4_audio_params(_AUDIO, hidden) if audio else 0)


GEMMA4 = Family(
    key="gemma4",
    display="Gemma 4",
    model_types=("gemma4", "gemma4_text"),
    name_pattern=r"gemma-?4(?![0-9a-z])(?!-12b(?![0-9a-z]))",  # the 12B is GEMMA4_UNIFIED's
    size_pattern=r"(?<![0-9.a-z])(e2b|e4b|26b-a4b|31b)(?![a-z0-9])",
    attention_softcap=None,
    final_softcap=30.0,
    kernels=_KERNELS,
    layer_pattern="sliding-window (512 tokens at E2B/E4B, 1,024 at 26B-A4B/31B) and global layers, 4:1 at E2B and "
                  "5:1 elsewhere; global layers have head_dim 512",
    sliding_per_global=5,
    shapes={
        "e2b": _shape("E2B-it", 1536, 35, 8, 1, 6144, 5, 512, _towers(_SMALL_VISION, 1536, True),
                      kv_shared_layers=20, double_wide_mlp=True, per_layer_dim=256, per_layer_vocab=_VOCAB),
        "e4b": _shape("E4B-it", 2560, 42, 8, 2, 10240, 6, 512, _towers(_SMALL_VISION, 2560, True),
                      kv_shared_layers=18, per_layer_dim=256, per_layer_vocab=_VOCAB),
        "26b-a4b": _shape("26B-A4B-it", 2816, 30, 16, 8, 2112, 6, 1024, _towers(_LARGE_VISION, 2816, False),
                          global_kv_heads=2, k_eq_v=True, experts=128, experts_per_token=8, expert_intermediate=704),
        "31b": _shape("31B-it", 5376, 60, 32, 16, 21504, 6, 1024, _towers(_LARGE_VISION, 5376, False),
                      global_kv_heads=4, k_eq_v=True),
    },
    towers=("model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"),
    # transformers 5.25's Gemma4Processor: the template's <|image|> becomes <|image> + one <|image|> per soft token
    # (as many as the image's size gives within max_soft_tokens) + <image|>; mm_token_type_ids 1 on the soft tokens
    # (Gemma4Model's bidirectional image mask, on sliding layers, when use_bidirectional_attention is "vision")
    images=ImageFacts("<|image|>", "<|image>", "<|image|>", "<image|>", "image_token_id", "model.embed_vision",
                      "mm_token_type_ids", "Gemma4Processor"),
    system_fold="join_trimmed",  # unused: Gemma 4 has a native system role (its turn format, data/turns.py)
    system_note="Gemma 4 has a native system role: system text is its own turn",
    turn_format="gemma4",
    empty_thought_sizes=("26b-a4b", "31b"),
    fp16_note="float16 can overflow Gemma 4's activations; bfloat16 is the reference precision",
    config_class="Gemma4Config",
    liger_patch=None,  # Liger has no Gemma 4 patch
    tiny_config=dict(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, global_head_dim=32,  # global layers twice as wide, as 512 is to 256
            sliding_window=32,  # short, so ordinary rows cross it
            # 2 sliding : 1 global, the last two layers KV-shared: each reuses the last earlier layer of its kind
            # (layer 3 feeds layer 4, layer 2 feeds layer 5), so both kinds are shared
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            num_kv_shared_layers=2, use_double_wide_mlp=True,
            hidden_size_per_layer_input=8,  # per-layer embeddings, vocab x 6 layers x 8
            final_logit_softcapping=30.0,  # as every published config (Gemma4TextConfig's default is None)
            max_position_embeddings=4096, initializer_range=0.15,
            # image tokens attend to each other on sliding layers (transformers builds that mask only with this;
            # its comment says the smaller Gemma 4 models leave it unset): set so the tests exercise the mask
            use_bidirectional_attention="vision",
        ),
        # Gemma 4's image encoder at toy size: 8-pixel patches, 2 x 2 of them pooled into one image token; 140
        # positions per axis, the longest side the tiny processor writes (70 soft tokens x 4 patches / 2 rows)
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=2,
                           position_embedding_size=140,
                           initializer_range=0.15),  # at 0.02 (the default) a toy tower maps all colours alike
        audio_config=None,  # audio is not trained (images are the next step); the E2B/E4B towers load and stay frozen
        initializer_range=0.15,  # the composite model initialises every part with its own config's range
    ),
)

GEMMA4_UNIFIED = Family(
    key="gemma4-unified",
    display="Gemma 4 (encoder-free)",
    model_types=("gemma4_unified",),
    name_pattern=r"gemma-?4-12b(?![0-9a-z])",
    size_pattern=r"(?<![0-9.a-z])(12b)(?![a-z0-9])",
    attention_softcap=None,
    final_softcap=30.0,
    kernels=_KERNELS,
    layer_pattern="five sliding-window layers (1,024 tokens) per global layer; global layers have head_dim 512",
    sliding_per_global=5,
    shapes={
        "12b": _shape("12B-it", 3840, 48, 16, 8, 15360, 6, 1024,
                      gemma4_unified_vision_params(dict(mm_embed_dim=3840, mm_posemb_size=1120, output_proj_dims=3840,
                                                        patch_size=16, pooling_kernel_size=3), 3840)
                      + gemma4_unified_audio_params(dict(audio_embed_dim=640), 3840),
                      global_kv_heads=1, k_eq_v=True),
    },
    towers=("model.embed_vision", "model.embed_audio"),
    gguf_architecture="gemma4",  # llama.cpp converts Gemma4UnifiedForConditionalGeneration's decoder as gemma4
    system_fold="join_trimmed",
    system_note=GEMMA4.system_note,
    turn_format="gemma4",
    empty_thought_sizes=("12b",),
    fp16_note=GEMMA4.fp16_note,
    config_class="Gemma4UnifiedConfig",
    liger_patch=None,
)

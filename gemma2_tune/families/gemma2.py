"""Gemma 2 (google/gemma-2-2b, -9b, -27b and their -it versions): the product's home family.

Sources: the published config.json of each size (URLs on each shape) and the Gemma 2 report
(arXiv 2408.00118): logit soft-capping, attention 50.0 and final 30.0; local sliding-window (4096) and
global attention in alternating layers; no system role in the chat format.
"""

from __future__ import annotations

from .base import AttentionKernel, Family, Shape

_HUB = "https://huggingface.co/google/gemma-2-{}/blob/main/config.json"

GEMMA2 = Family(
    key="gemma2",
    display="Gemma 2",
    model_types=("gemma2",),
    name_pattern=r"gemma-?2(?![0-9a-z])",
    size_pattern=r"(?<![0-9.])((?:2|9|27)b)(?![a-z0-9])",
    attention_softcap=50.0,
    final_softcap=30.0,
    kernels={
        "eager": AttentionKernel("eager", True, "computes the attention soft-cap (tanh, 50.0) exactly"),
        "sdpa": AttentionKernel(
            "sdpa", False,
            "drops Gemma 2's attention logit soft-capping (50.0); use 'eager' (or 'flash_attention_2' with a "
            "flash-attn that supports softcap)", applies_softcap=False),
        "flash_attention_2": AttentionKernel(
            "flash_attention_2", True,
            "applies the soft-cap through flash-attn's softcap argument (flash-attn >= 2.6.0; older builds "
            "silently compute without it)", needs=("flash-attn", (2, 6, 0))),
        "flex_attention": AttentionKernel(
            "flex_attention", True,
            "applies the soft-cap inside the kernel (its score_mod) and masks packed rows and the sliding window "
            "through its block mask; equal to eager within 1e-5 in fp32 (tests/e2e/test_attention.py)",
            cpu_backward=False),
    },
    layer_pattern="sliding-window (4,096 tokens) and global attention layers alternate",
    sliding_per_global=1,
    shapes={
        "2b": Shape(256000, 2304, 26, 8, 4, 256, 9216, 4096, source=_HUB.format("2b")),
        "9b": Shape(256000, 3584, 42, 16, 8, 256, 14336, 4096, source=_HUB.format("9b")),
        "27b": Shape(256000, 4608, 46, 32, 16, 128, 36864, 4096, source=_HUB.format("27b")),
    },
    system_fold="join_trimmed",
    system_note="Gemma 2 has no system role (its own template raises on one); `fold` puts the system text and "
                "a blank line before the first user turn",
    fp16_refused_sizes=("27b",),
    fp16_note="float16 can overflow Gemma 2's activations (27B is unstable in it); bfloat16 is the reference precision",
    config_class="Gemma2Config",
    liger_patch="apply_liger_kernel_to_gemma2",
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=32,  # short, so ordinary rows cross it and both layer kinds are exercised
        max_position_embeddings=4096,
        # Wider than the default 0.02 so logits can move: with hidden 64 the default caps them near +-1.3.
        initializer_range=0.15,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
)

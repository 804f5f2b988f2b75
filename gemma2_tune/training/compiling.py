"""training.torch_compile: regional compilation of the decoder layers, checked against the plain model.

`regional` compiles each decoder layer in place with torch.compile (nn.Module.compile; PyTorch's regional
compilation recipe, https://pytorch.org/tutorials/recipes/regional_compilation.html): the layers share one
compiled graph, the module tree, parameter names, LoRA wrappers and checkpoints stay as they are. On CUDA it
fuses the many small kernels of a layer (norms, GeGLU, RoPE, the soft-capped attention's separate ops) that
dominate a step at short lengths; on a CPU it only costs compile time.

Before training, the compiled model's logits on a probe batch are compared with the same model run eagerly
(torch.compiler.set_stance("force_eager")): a difference beyond the tolerance stops the run before its first
step. The run records what was compiled and what the check measured.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

# Bounds for the probe's logits, compiled vs eager: fp32 kernels differ by reassociation only (observed ~3e-6
# on the tiny model); bf16 logits near Gemma 2's 30.0 soft-cap are spaced 0.125 apart.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}
PROBE_TOKENS = 64


def decoder_layers(model) -> list:
    """The repeated transformer blocks (Gemma2DecoderLayer / Gemma3DecoderLayer), wherever PEFT put them."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_layers(model, dtype: str) -> dict[str, Any]:
    """Compile every decoder layer of `model` in place, then check the compiled logits against eager ones on
    a probe batch. Returns the manifest's record. Raises UserError when there is nothing to compile or the
    check fails."""
    import torch

    layers = decoder_layers(model)
    if not layers:
        raise UserError("training.torch_compile: regional compilation found no decoder layers in this model")
    for layer in layers:
        layer.compile()
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(p.device for p in model.parameters())
    probe = torch.randint(3, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            compiled = model(input_ids=probe, use_cache=False).logits.float()
            with torch.compiler.set_stance("force_eager"):
                eager = model(input_ids=probe, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    difference = (compiled - eager).abs().max().item()
    bound = TOLERANCE.get(dtype, 0.5)
    record = {"torch_compile": "regional", "compiled_layers": len(layers), "torch": torch.__version__,
              "probe_max_abs_logit_diff": difference, "tolerance": bound}
    if not difference <= bound:  # also catches NaN
        raise UserError(f"training.torch_compile: the compiled layers change the model's logits by {difference:.4g} "
                        f"on a probe batch (tolerance {bound} in {dtype}); train without it (training.torch_compile=off)")
    return record

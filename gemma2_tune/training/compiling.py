"""training.torch_compile: regional compilation of the decoder layers, checked against the plain model.

`regional` compiles each decoder layer in place with torch.compile (nn.Module.compile; PyTorch's regional
compilation recipe, https://pytorch.org/tutorials/recipes/regional_compilation.html): the layers share one
compiled graph, the module tree, parameter names, LoRA wrappers and checkpoints stay as they are. On CUDA it
fuses the many small kernels of a layer (norms, GeGLU, RoPE, the soft-capped attention's separate ops) that
dominate a step at short lengths; on a CPU it only costs compile time.

Before training, the compiled model's logits and first-layer trainable gradients on a probe batch are compared
with the same model run eagerly (torch.compiler.set_stance("force_eager")), with the probe and tolerances of
kernels.py: a difference beyond them stops the run before its first step. The run records what was compiled
and what the check measured.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .kernels import probe, verdict



def decoder_layers(model) -> list:
    """The repeated transformer blocks (Gemma2DecoderLayer / Gemma3DecoderLayer), wherever PEFT put them."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_layers(model, dtype: str) -> dict[str, Any]:
    """Compile every decoder layer of `model` in place, then check the compiled model against itself run eagerly
    on the probe batch of kernels.probe: logits and the first decoder layer's trainable gradients (so the
    compiled backward too). Returns the manifest's record. Raises UserError when there is nothing to compile or
    the check fails."""
    import torch

    layers = decoder_layers(model)
    if not layers:
        raise UserError("training.torch_compile: regional compilation found no decoder layers in this model")
    for layer in layers:
        layer.compile()
    with torch.compiler.set_stance("force_eager"):
        eager = probe(model)
    record = verdict(eager, probe(model), dtype, "training.torch_compile: the compiled model's",
                     "train without it (training.torch_compile=off)")
    return {"torch_compile": "regional", "compiled_layers": len(layers), "torch": torch.__version__, **record}

"""The one builder of bitsandbytes quantization configs, for training and for inference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from ..config.schema import RunConfig

Bits = Literal["4bit", "8bit"]


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16 (also float16, float32, uint8); KeyError for other names."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def bnb_config(bits: Bits | None, dtype: str = "bfloat16", quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype: str | None = None, quant_storage: str | None = None):
    """A BitsAndBytesConfig, or None for unquantized weights.

    4-bit: `quant_type` (nf4 or fp4), double quantization of the constants, matmuls in `compute_dtype`
    (default: `dtype`), packed weights stored as `quant_storage` (default: the compute dtype, which lets
    ZeRO-3 and FSDP shard them like any other weight). 8-bit: LLM.int8 with its defaults.
    """
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype or dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute),
        bnb_4bit_quant_storage=torch_dtype(quant_storage or compute),
    )


def run_bnb_config(cfg: RunConfig):
    """The quantization a training run's config asks for (None when quantization.load_in_4bit is false)."""
    q = cfg.quantization
    return bnb_config("4bit" if q.load_in_4bit else None, cfg.model.dtype, q.quant_type, q.double_quant,
                      cfg.compute_dtype, cfg.quant_storage)

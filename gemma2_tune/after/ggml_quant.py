"""llama.cpp's quantized arithmetic applied to a transformers model: what a quantized GGUF computes on the CPU.

`export`'s parity bound for a quantized file needs the error its quantization type is expected to make on this
model, measured without reading the file being checked (a damaged tensor there must not raise its own bound).
So the reference model computes as llama.cpp's CPU backend computes a quantized matrix product:

- each weight matrix rounded to the type llama.cpp gave its tensor: quantized by ggml's `ggml_quantize_chunk`
  (ggml.h; the function llama.cpp's quantizer calls, reached through llama-cpp-python's own handle on the ggml
  library, `llama_cpp._ggml`), dequantized by gguf-py's reference dequantizers;
- each product's input rounded as ggml-cpu rounds it before the dot products (`type_traits_cpu[type].vec_dot_type`
  in ggml/src/ggml-cpu/ggml-cpu.c): 8-bit blocks of 32 with a float16 scale (q8_0, q8_1) for the legacy types,
  of 256 with a float32 scale (q8_K) for the k-quants, float16 or bfloat16 for those types. On Gemma's large
  activations this rounding weighs as much as the weights' (the 270M's q8_0: 4x the weight rounding alone).

This module is the one place that touches those internals.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import UserError

CHUNK_ELEMENTS = 1 << 24  # rows are rounded in chunks of about this many weights (bounded temporary memory)
_lib: Any = None


def _ggml() -> Any:
    """ggml's library with the two functions used here declared (ggml.h). Raises UserError when this
    llama-cpp-python does not provide them."""
    global _lib
    if _lib is None:
        try:
            from llama_cpp._ggml import libggml

            quantize, row_size = libggml.ggml_quantize_chunk, libggml.ggml_row_size
        except (ImportError, AttributeError, OSError) as exc:
            import llama_cpp

            raise UserError(f"export cannot reach ggml's quantizer in llama-cpp-python {llama_cpp.__version__} "
                            f"({exc}), which the parity bound of a quantized file needs") from None
        # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start, int64_t nrows,
        #                            int64_t n_per_row, const float * imatrix)
        quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p]
        quantize.restype = ctypes.c_size_t
        row_size.argtypes = [ctypes.c_int, ctypes.c_int64]  # size_t ggml_row_size(enum ggml_type, int64_t ne)
        row_size.restype = ctypes.c_size_t
        _lib = libggml
    return _lib


def round_trip(weights: np.ndarray, qtype: int) -> np.ndarray:
    """`weights` (rows, n_per_row) float32, quantized row by row to ggml type `qtype` (a gguf
    GGMLQuantizationType value) and dequantized back: what a GGUF tensor of that type holds for them. F32 is
    returned as it is; F16 and BF16 are rounded to those formats. Raises ValueError when n_per_row is not a
    multiple of the type's block size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType(qtype)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return weights
    if qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return dequantize(quantize(weights, qtype), qtype).astype(np.float32)
    rows, n_per_row = weights.shape
    if n_per_row % GGML_QUANT_SIZES[qtype][0]:
        raise ValueError(f"{qtype.name}: rows of {n_per_row} weights are not whole blocks")
    lib = _ggml()
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.empty_like(weights)
    step = max(1, CHUNK_ELEMENTS // n_per_row)
    for first in range(0, rows, step):
        chunk = weights[first:first + step]
        packed = np.empty((chunk.shape[0], row_bytes), dtype=np.uint8)
        _quantize_rows(lib, int(qtype), chunk, packed)
        out[first:first + step] = dequantize(packed, qtype)
    return out


def _quantize_rows(lib, qtype: int, rows: np.ndarray, packed: np.ndarray) -> None:
    """ggml_quantize_chunk over `rows` into `packed`, split across threads (each call releases the GIL)."""
    n, n_per_row = rows.shape
    threads = max(1, min(os.cpu_count() or 1, n // 64 or 1))
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)

    def part(i: int) -> None:
        start, stop = int(bounds[i]), int(bounds[i + 1])
        if stop > start:
            lib.ggml_quantize_chunk(qtype, rows.ctypes.data, packed.ctypes.data, start * n_per_row, stop - start,
                                    n_per_row, None)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))


# ggml-cpu's vec_dot_type per weight type (ggml-cpu.c type_traits_cpu): what a product's input is rounded to.
# ("q8", block, float16 scale); "f16"/"bf16": the input in that format; absent (f32): not rounded.
_Q8_0, _Q8_K = ("q8", 32, True), ("q8", 256, False)
ACTIVATION_ROUNDING: dict[str, Any] = {
    "F16": "f16", "BF16": "bf16", "Q4_0": _Q8_0, "Q4_1": _Q8_0, "Q5_0": _Q8_0, "Q5_1": _Q8_0, "Q8_0": _Q8_0,
    "Q2_K": _Q8_K, "Q3_K": _Q8_K, "Q4_K": _Q8_K, "Q5_K": _Q8_K, "Q6_K": _Q8_K}  # q8_1 rounds as q8_0


def round_activations(x, weight_type: str):
    """`x` (..., n) float32 torch tensor, the input of a product with weights of ggml type `weight_type` (its
    name, e.g. "Q8_0"), rounded as ggml-cpu rounds it (quantize_row_q8_0: scale max|x|/127 stored in float16,
    round to nearest even; quantize_row_q8_K_ref: scale in float32). Returned as float32."""
    import torch

    rounding = ACTIVATION_ROUNDING.get(weight_type)
    if rounding is None:
        return x
    if rounding in ("f16", "bf16"):
        return x.to(torch.float16 if rounding == "f16" else torch.bfloat16).float()
    _, block, half_scale = rounding
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = amax / 127
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    if half_scale:
        scale = scale.half().float()
    return (q * scale).reshape(x.shape)


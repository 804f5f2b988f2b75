"""llama.cpp's own quantizer applied to a transformers model's weights: what a quantized GGUF's weights should be.

`export`'s parity bound for a quantized file needs the error its quantization type is expected to make on this
model, measured without reading the file being checked (a damaged tensor there must not raise its own bound).
So each weight of the reference model is rounded here as llama.cpp rounds it: quantized by ggml's
`ggml_quantize_chunk` (ggml.h; the function llama.cpp's quantizer calls, reached through llama-cpp-python's own
handle on the ggml library, `llama_cpp._ggml`) to the type llama.cpp chose for that tensor, then dequantized by
gguf-py's reference dequantizers. This module is the one place that touches those internals.
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

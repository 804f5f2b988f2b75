"""Model families: every fact about a Gemma generation, in one place, read by every check.

A family says which `model_type` it covers, its soft-caps, which attention kernels keep its numerics,
its layer pattern, its published shapes (with the URL each came from), how system text is folded
into the first user turn, the module names LoRA can target, the towers beside the decoder (image and audio
encoders: frozen, never adapted), and the shape of its tiny test model.

    family_of_model_type("gemma2")          -> GEMMA2       (from a checkpoint's config.json)
    family_of_name("google/gemma-3-1b-it")  -> GEMMA3_TEXT  (from a name, before anything loads)
    family_of_name("google/gemma-3-27b-it") -> GEMMA3       (image + text)
    family_of_name("google/gemma-4-E4B-it") -> GEMMA4
    family_of_checkpoint(name_or_path)      -> local config.json first, then the name; None if unknown

    base.py     what a family is (Family, Shape, AttentionKernel): the fields every check reads
    gemma2.py   Gemma 2 (2B, 9B, 27B)
    gemma3.py   Gemma 3 text (270M, 1B) and Gemma 3 image + text (4B, 12B, 27B)
    gemma4.py   Gemma 4 (E2B, E4B, 26B-A4B, 31B; 12B unified)
    towers.py   parameter counts of the vision and audio towers, from their configs
    gemma4_format.py  Gemma 4's turn format as data: markers, special-token ids, stop tokens, tool syntax

This package is pure data and standard library: `validate` reads it without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import AttentionKernel, Family, Shape
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3, GEMMA3_TEXT
from .gemma4 import GEMMA4, GEMMA4_UNIFIED

FAMILIES: tuple[Family, ...] = (GEMMA2, GEMMA3_TEXT, GEMMA3, GEMMA4, GEMMA4_UNIFIED)

# model_types that look close but are not supported, and why (named in the error message).
REFUSED_MODEL_TYPES = {
    "gemma": "Gemma 1 (no sliding-window layers, another vocabulary); Gemma 2, 3 and 4 models are supported",
    "gemma3n": "Gemma 3n (per-layer embeddings, audio/vision); not supported",
}

# Names that say another architecture (checked before anything loads), and why each is refused.
REFUSED_NAMES = {
    r"gemma-?3n": REFUSED_MODEL_TYPES["gemma3n"],
    r"(?<![a-z])gemma-?(?:1\.1-)?(?:2|7)b(?![a-z0-9])|codegemma": REFUSED_MODEL_TYPES["gemma"],
    r"recurrentgemma": "RecurrentGemma (Griffin recurrent layers); not supported",
    r"paligemma|shieldgemma-2": "PaliGemma / ShieldGemma 2 (other multimodal architectures); not supported",
}

__all__ = ["AttentionKernel", "FAMILIES", "Family", "GEMMA2", "GEMMA3", "GEMMA3_TEXT", "GEMMA4", "GEMMA4_UNIFIED",
           "REFUSED_MODEL_TYPES", "Shape",
           "family_of_checkpoint", "family_of_model_type", "family_of_name", "supported_summary",
           "refused_name", "unsupported_message"]


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family whose checkpoints carry this `model_type` in config.json, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of_name(name: str) -> Family | None:
    """The family a hub id or builtin name belongs to (e.g. google/gemma-2-9b-it), or None when the name
    doesn't say. Local folders are read by `family_of_checkpoint`."""
    return next((f for f in FAMILIES if f.matches_name(name)), None)


def local_model_type(name_or_path: str) -> str | None:
    """`model_type` from a local folder's config.json (no torch), or None."""
    path = Path(name_or_path).expanduser() / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def family_of_checkpoint(name_or_path: str) -> Family | None:
    """A local checkpoint's family from its config.json, else the family its name implies, else None."""
    model_type = local_model_type(name_or_path)
    if model_type is not None:
        return family_of_model_type(model_type)
    return family_of_name(name_or_path)


def refused_name(name: str) -> str | None:
    """Why a name that says another architecture is refused (None when it doesn't say so)."""
    return next((why for pattern, why in REFUSED_NAMES.items() if re.search(pattern, name, re.IGNORECASE)), None)


def supported_summary() -> str:
    """'Gemma 2 (gemma2: 2b, 9b, 27b), Gemma 3 text (gemma3_text: 270m, 1b), ...': for messages and the README."""
    return ", ".join(f"{f.display} ({'/'.join(f.model_types)}: {', '.join(f.shapes)})" for f in FAMILIES)


def unsupported_message(name: str, model_type: str | None) -> str:
    """Why a checkpoint of `model_type` is refused, naming what is supported."""
    why = REFUSED_MODEL_TYPES.get(model_type or "", f"a '{model_type}' model")
    return (f"model.name_or_path: '{name}' is {why}; gemma2-tune trains {supported_summary()} checkpoints "
            "(base and -it, or local conversions)")

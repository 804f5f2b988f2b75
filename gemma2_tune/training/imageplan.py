"""`plan`'s lines about images, for an image + text checkpoint: its processor's resolution, the tokens an image
takes in a row (and how many images a row of data.max_length holds), and the image tower's transient memory.

Read without loading anything: the checkpoint folder's processor_config.json (or preprocessor_config.json) and
config.json, else the published processors' settings (google/gemma-3-4b-it: 896 x 896 pixels, 256 soft tokens;
google/gemma-4-E2B-it: 16-pixel patches pooled 3 x 3, up to 280 soft tokens).

The tower's memory is an estimate, not in plan's total (a text-only run never spends it): the tower is frozen
and its input needs no gradient, so autograd keeps none of its activations; its peak is one layer's attention at
a time, per image of a micro-batch: heads x patches^2 scores in the model's dtype, their float32 softmax and the
softmax cast back (eager attention, transformers' SigLIP and Gemma 4 vision layers), 2 + 4 + 2 bytes per score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..families import Family, family_of_checkpoint

GIB = 2**30
PUBLISHED = {  # the published processors' settings (see the module docstring)
    "Gemma3Processor": {"size": {"height": 896, "width": 896}, "image_seq_length": 256},
    "Gemma4Processor": {"patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280},
}
# attention heads of the published image encoders (config.json vision_config; families/gemma3.py, gemma4.py)
PUBLISHED_HEADS = {"4b": 16, "12b": 16, "27b": 16, "e2b": 12, "e4b": 12, "26b-a4b": 16, "31b": 16}
SCORE_BYTES = 2 + 4 + 2  # a score in bf16, its float32 softmax, the softmax cast back


def _local(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(image processor settings with the processor's image_seq_length, vision_config) of a local folder."""
    settings = None
    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            saved = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        settings = (saved.get("image_processor") or saved) | {"image_seq_length": saved.get("image_seq_length")}
        break
    try:
        vision = json.loads((path / "config.json").read_text()).get("vision_config")
    except (OSError, ValueError, AttributeError):
        vision = None
    return settings, vision


def image_lines(name_or_path: str, folder: Path | None, max_length: int, pan_and_scan: bool = False) -> list[str]:
    """The lines, or [] for a text checkpoint. `folder`: where the checkpoint's files are (None: a hub id, the
    published settings)."""
    family: Family | None = family_of_checkpoint(str(folder) if folder is not None else name_or_path)
    if family is None or family.images is None:
        return []
    kind = family.images.processor_class
    settings, vision = _local(folder) if folder is not None else (None, None)
    source = "its processor_config.json" if settings else "the published processor"
    settings = settings or PUBLISHED[kind]
    heads = (vision or {}).get("num_attention_heads") or PUBLISHED_HEADS.get(family.size_from_name(name_or_path)
                                                                             or "", 16)
    if kind == "Gemma3Processor":
        size = settings.get("size") or PUBLISHED[kind]["size"]
        soft = settings.get("image_seq_length") or PUBLISHED[kind]["image_seq_length"]
        patch = (vision or {}).get("patch_size", 14)
        patches = (size["height"] // patch) * (size["width"] // patch)
        crops = 4 if pan_and_scan else 0  # Gemma3Processor's pan_and_scan_max_num_crops
        per_image = (soft + 2) * (1 + crops)  # soft tokens, <start_of_image>, <end_of_image>, per image and crop
        what = (f"{size['height']}x{size['width']} pixels, {soft} soft tokens per image ({soft + 2} with its markers"
                + (f"; pan-and-scan on: up to {crops} crops more, {per_image} tokens" if pan_and_scan else
                   "; pan-and-scan off") + ")")
        images = 1 + crops
    else:
        soft = settings.get("max_soft_tokens") or PUBLISHED[kind]["max_soft_tokens"]
        patch, pool = settings.get("patch_size", 16), settings.get("pooling_kernel_size", 3)
        patches = soft * pool * pool
        per_image = soft + 2
        what = (f"up to {soft} soft tokens per image ({per_image} with its markers): each image resized, keeping its "
                f"aspect ratio, to at most {patches:,} patches of {patch}x{patch} pixels")
        images = 1
    fits = max_length // per_image
    transient = images * heads * patches**2 * SCORE_BYTES
    return [f"images ({source}): {what}; a row of data.max_length {max_length:,} holds at most {fits} "
            f"image{'s' * (fits != 1)}, image tokens are never learned",
            f"  image tower (frozen): about {transient / GIB:.2f} GiB more at its peak per image (a micro-batch's images "
            f"add up; {heads} heads x {patches:,}^2 attention scores, eager; transient, not in the total: text rows "
            "never spend it)"]

"""Tokenized-data cache: a second run or a resume doesn't tokenize again.

The key covers everything that changes the blocks: the data's content fingerprint, every data.*
setting (source, split, system policy, max length, overlong rule, train_on, packing), the tokenizer's
full definition, and the version of the turn format and packing code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..config.schema import DataSection
from ..files import home, staged_dir
from .examples import DataReport
from .images import image_from_record, image_record
from .packing import Block

FORMAT_VERSION = 4  # bump when rendering, masking or packing changes what a row becomes


def cache_dir() -> Path:
    """$GEMMA2_TUNE_HOME/cache/tokenized."""
    return home() / "cache" / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex digits over the tokenizer's full definition (tokenizer.json, or the vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Data keys added after the cache existed: left out of the key while at their defaults, so older keys stay valid
LATER_KEYS = {"enable_thinking": False, "pan_and_scan": False, "max_image_mb": 20.0}


def cache_key(data: DataSection, source_fingerprint: str, tokenizer: Any, split_seed: int | None = None,
              family: str = "gemma2", empty_thought: bool = False, images: str | None = None) -> str:
    """A 24-hex-digit key over everything that changes the blocks.

    `split_seed`: the seed that drew a held-out fraction out of these rows (it changes which rows remain);
    `family`: the model family, whose rule for folding system text changes the rendered rows; `empty_thought`:
    Gemma 4 rows start their answers with an empty thought block (the checkpoint's size decides); `images`: over
    the rows' image bytes and the image processor's settings (data/images.py images_fingerprint,
    ImageProcessing.fingerprint), None when the rows have no images.
    """
    # keys of runs from before a setting existed stay as they were while it is off
    dumped = data.model_dump(mode="json", exclude={k for k, v in LATER_KEYS.items() if getattr(data, k, v) == v})
    parts = {"format": FORMAT_VERSION, "data": dumped, "source": source_fingerprint,
             "tokenizer": tokenizer_fingerprint(tokenizer), "split_seed": split_seed}
    if family != "gemma2":  # keys of Gemma 2 runs stay as they were
        parts["family"] = family
    if empty_thought:
        parts["empty_thought"] = True
    if images:
        parts["images"] = images
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load(key: str) -> tuple[list[Block], DataReport] | None:
    """Cached blocks and their report, or None when absent or unreadable."""
    import numpy as np

    path = cache_dir() / key
    try:
        arrays = np.load(path / "blocks.npz")
        report = DataReport(**json.loads((path / "report.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    bounds, rows = arrays["offsets"].tolist(), arrays["rows"].tolist()
    ids, labels, positions = (arrays[k].tolist() for k in ("input_ids", "labels", "position_ids"))
    blocks = [Block(ids[a:b], labels[a:b], positions[a:b], n) for a, b, n in zip(bounds[:-1], bounds[1:], rows)]
    if (path / "images.json").is_file():  # per block, its images (data/images.py image_record)
        try:
            per_block = json.loads((path / "images.json").read_text())
            for block, records in zip(blocks, per_block):
                block.images = tuple(image_from_record(r) for r in records)
        except (OSError, ValueError, KeyError):
            return None
    return blocks, report


def save(key: str, blocks: list[Block], report: DataReport) -> Path:
    """Written to a temporary folder and renamed into place: readers see all of it or nothing."""
    import numpy as np

    final = cache_dir() / key
    with staged_dir(final, is_stale=lambda _: True) as tmp:  # an existing entry failed to load: replace it
        offsets = np.cumsum([0] + [len(b.input_ids) for b in blocks])
        flat = lambda attr: np.fromiter((t for b in blocks for t in getattr(b, attr)), dtype=np.int64, count=int(offsets[-1]))  # noqa: E731
        np.savez(tmp / "blocks.npz", input_ids=flat("input_ids"), labels=flat("labels"),
                 position_ids=flat("position_ids"), offsets=offsets, rows=np.array([b.rows for b in blocks]))
        (tmp / "report.json").write_text(json.dumps(report.to_dict()))
        if any(b.images for b in blocks):
            (tmp / "images.json").write_text(json.dumps([[image_record(i) for i in b.images] for b in blocks]))
    return final

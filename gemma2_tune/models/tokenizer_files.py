"""The tokenizer's SentencePiece model travels with every folder we write.

Every published Gemma tokenizer is a SentencePiece model (`tokenizer.model`) with its fast conversion
(`tokenizer.json`). transformers 5 saves only `tokenizer.json`, while llama.cpp's Gemma 2 converter reads the
vocabulary from `tokenizer.model` alone (its Gemma 3 converter uses it when present), so a run, checkpoint, ema/
or merged folder without it cannot be exported. The file is found once, when the tokenizer loads, and recorded
where transformers itself records it (`tokenizer.vocab_file`); `save_tokenizer` writes it beside
`tokenizer.json`. Carried at write time rather than looked up at export: the folder then stands alone (a merged
or fully fine-tuned model exports, or converts with llama.cpp's own script, where its base is not reachable).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

SENTENCEPIECE_MODEL = "tokenizer.model"


def find_sentencepiece(location: str, revision: str | None = None) -> Path | None:
    """The SentencePiece model of the checkpoint at `location` (a local folder, or a Hub name whose file is
    downloaded or taken from the cache; ~4 MB for Gemma), or None when it has none or it cannot be reached."""
    folder = Path(location).expanduser()
    if folder.is_dir():
        return folder / SENTENCEPIECE_MODEL if (folder / SENTENCEPIECE_MODEL).is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(location, SENTENCEPIECE_MODEL, revision=revision,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - gated, offline, no such repository: the tokenizer itself loaded, that suffices
        return None
    return Path(found) if found else None


def attach_sentencepiece(tokenizer: Any, location: str, revision: str | None = None) -> None:
    """Record on `tokenizer` (as `vocab_file`) the SentencePiece model it was built from: the folder's own
    `tokenizer.model`, else the file transformers recorded (a folder saved by transformers 5 names its source's
    in tokenizer_config.json), else the Hub checkpoint's. Leaves it unset when there is none (a byte-level BPE
    tokenizer)."""
    own = find_sentencepiece(location, revision) if Path(location).expanduser().is_dir() else None
    recorded = sentencepiece_model(tokenizer)
    found = own or recorded or find_sentencepiece(location, revision)
    if found is not None:
        tokenizer.vocab_file = str(found)


def sentencepiece_model(tokenizer: Any) -> Path | None:
    """The SentencePiece model file `tokenizer` was built from, when it still exists; else None."""
    path = getattr(tokenizer, "vocab_file", None)
    if isinstance(path, (str, os.PathLike)) and str(path).endswith(".model") and Path(path).is_file():
        return Path(path)
    return None


def carry_sentencepiece(source: Path | None, folder: Path) -> Path | None:
    """Copy the SentencePiece model `source` (`sentencepiece_model(tokenizer)`) into `folder` as tokenizer.model,
    unless it is that file. Returns the written path, or None when `source` is None. Raises OSError."""
    if source is None:
        return None
    target = Path(folder) / SENTENCEPIECE_MODEL
    if not (target.exists() and target.resolve() == Path(source).resolve()):
        shutil.copyfile(source, target)
    return target


def save_tokenizer(tokenizer: Any, folder: Path | str) -> None:
    """`tokenizer.save_pretrained(folder)` and its SentencePiece model beside it (see the module's docstring)."""
    tokenizer.save_pretrained(str(folder))
    carry_sentencepiece(sentencepiece_model(tokenizer), Path(folder))

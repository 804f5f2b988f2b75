"""The tokenizer's SentencePiece model travels with every folder we write (models/tokenizer_files.py):
transformers 5 saves only tokenizer.json, and llama.cpp's Gemma 2 converter reads tokenizer.model.
The folders a run writes (run, checkpoint-N, ema/, merged) are checked in tests/e2e/test_export.py."""

from __future__ import annotations

import json
import shutil

from gemma2_tune.models.loading import load_tokenizer
from gemma2_tune.models.tokenizer_files import SENTENCEPIECE_MODEL, save_tokenizer, sentencepiece_model


def test_saving_writes_the_sentencepiece_model_beside_tokenizer_json(spm_gemma2_dir, tmp_path):
    tokenizer = load_tokenizer(str(spm_gemma2_dir))
    assert sentencepiece_model(tokenizer) == spm_gemma2_dir / SENTENCEPIECE_MODEL
    tokenizer.save_pretrained(str(tmp_path / "plain"))  # what transformers 5 writes alone
    assert not (tmp_path / "plain" / SENTENCEPIECE_MODEL).exists()
    save_tokenizer(tokenizer, tmp_path / "ours")
    assert (tmp_path / "ours" / SENTENCEPIECE_MODEL).read_bytes() == (spm_gemma2_dir / SENTENCEPIECE_MODEL).read_bytes()
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    again = load_tokenizer(str(tmp_path / "ours"))  # the folder's own copy, not its source's
    assert sentencepiece_model(again) == tmp_path / "ours" / SENTENCEPIECE_MODEL
    save_tokenizer(again, tmp_path / "ours")  # saving over itself keeps the file
    assert (tmp_path / "ours" / SENTENCEPIECE_MODEL).stat().st_size > 0


def test_a_folder_saved_without_it_finds_its_source_while_that_exists(spm_gemma2_dir, tmp_path):
    """A folder written before the model was carried: transformers recorded its source's file in
    tokenizer_config.json, which a save carries forward; once that source is gone there is none."""
    source = tmp_path / "base"
    shutil.copytree(spm_gemma2_dir, source)
    load_tokenizer(str(source)).save_pretrained(str(tmp_path / "old-run"))
    assert json.loads((tmp_path / "old-run" / "tokenizer_config.json").read_text())["vocab_file"].endswith(SENTENCEPIECE_MODEL)
    tokenizer = load_tokenizer(str(tmp_path / "old-run"))
    assert sentencepiece_model(tokenizer) == source / SENTENCEPIECE_MODEL
    save_tokenizer(tokenizer, tmp_path / "merged")
    assert (tmp_path / "merged" / SENTENCEPIECE_MODEL).read_bytes() == (source / SENTENCEPIECE_MODEL).read_bytes()
    (source / SENTENCEPIECE_MODEL).unlink()
    assert sentencepiece_model(load_tokenizer(str(tmp_path / "old-run"))) is None


def test_a_byte_level_bpe_tokenizer_has_none(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert sentencepiece_model(tokenizer) is None
    save_tokenizer(tokenizer, tmp_path / "out")
    assert not (tmp_path / "out" / SENTENCEPIECE_MODEL).exists() and (tmp_path / "out" / "tokenizer.json").is_file()

"""`builtin:tiny-gemma2`: a tiny random Gemma 2 built locally, for the CPU quickstart and tests.

It is a real Gemma 2 architecture (alternating sliding-window and global layers, attention soft-cap
50.0, final soft-cap 30.0) with a byte-level BPE tokenizer trained here on the shipped chats and
carrying Gemma's special tokens. It is saved as an ordinary checkpoint folder and then loaded through
the same code path as google/gemma-2-*: nothing downstream knows it is tiny. It has random weights
and learns only what the quickstart data teaches it in a few steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import ATTENTION_SOFTCAP, FINAL_SOFTCAP

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-gemma2"
TINY_VERSION = 1
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's order
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=32,  # short, so ordinary rows cross it and both layer kinds are exercised
    max_position_embeddings=4096,
    # Wider than the default 0.02 so logits can move: with hidden 64 the default caps them near +-1.3.
    initializer_range=0.15,
)


def home() -> Path:
    return Path(os.environ.get("GEMMA2_TUNE_HOME", Path.home() / ".cache" / "gemma2_tune")).expanduser()


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_path(name: str) -> Path:
    """Local folder of a builtin model, built on first use."""
    kind = name.removeprefix(BUILTIN_PREFIX)
    if kind != TINY_NAME:
        from .errors import UserError

        raise UserError(f"model.name_or_path: unknown builtin model {name!r} (available: {BUILTIN_PREFIX}{TINY_NAME})")
    path = home() / f"{TINY_NAME}-v{TINY_VERSION}"
    if not (path / "complete.json").is_file():
        build_tiny_gemma2(path)
    return path


def training_corpus() -> list[str]:
    """Text of the shipped chats, rendered the way training will see it."""
    from .chat import normalise, render
    from .config import DataSection
    from .data import load_rows, row_to_messages

    rows, _ = load_rows(DataSection(dataset="quickstart"))
    texts = []
    for row in rows:
        try:
            texts.append(render(normalise(row_to_messages(row.data), "fold")).text)
        except ValueError:
            continue
    return texts


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    from .chat import GEMMA_CHAT_TEMPLATE

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA_CHAT_TEMPLATE,
        padding_side="right",
    )


def build_tiny_gemma2(path: Path) -> Path:
    """Build tokenizer + random model into `path` atomically (a half-built folder is never used)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from .manifest import staged_dir

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        attn_logit_softcapping=ATTENTION_SOFTCAP,
        final_logit_softcapping=FINAL_SOFTCAP,
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        bos_token_id=ids["<bos>"],
        **TINY_SHAPE,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    # an earlier interrupted build (no complete.json) is replaced; another process's finished one is kept
    with staged_dir(path, is_stale=lambda p: not (p / "complete.json").is_file()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete.json").write_text(json.dumps({"builtin": TINY_NAME, "version": TINY_VERSION}))
    return path

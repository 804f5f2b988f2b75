"""What a saved full model needs to be served as it was trained: generation stops at the end of a turn (a base
checkpoint's generation config knows only <eos>, so vLLM, TGI and `pipeline` would run to the token limit) and
the KV cache is on (training turns `use_cache` off in config.json). `merge` sets the same on the model object;
this is for folders the trainer wrote (a full fine-tune's run folder, checkpoint-N/, ema/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.turns import END
from ..families.gemma4_format import STOP_TOKENS as GEMMA4_STOP_TOKENS
from ..families.gemma4_format import TURN_END as GEMMA4_TURN_END


def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends a model turn in this tokenizer's format: <turn|> when it has one (Gemma 4's vocabulary),
    else <end_of_turn> (Gemma 2/3)."""
    return GEMMA4_TURN_END if GEMMA4_TURN_END in tokenizer.get_vocab() else END


def stop_ids(tokenizer: Any) -> list[int]:
    """Where generation stops, as token ids: <eos> and <end_of_turn> for a Gemma 2/3 tokenizer; <eos>, <turn|> and
    <|tool_response>, as Gemma 4's published generation configs ([1, 106, 50]), for Gemma 4's (`end_of_turn_token`)."""
    end = end_of_turn_token(tokenizer)
    ends = GEMMA4_STOP_TOKENS[1:] if end == GEMMA4_TURN_END else (end,)
    ids = (tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in ends))
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def stop_token_ids(tokenizer: Any) -> tuple[list[int], int | None] | None:
    """(`stop_ids`, pad id) of a Gemma tokenizer; None without a tokenizer."""
    if tokenizer is None:
        return None
    return stop_ids(tokenizer), tokenizer.pad_token_id


def serving_config(folder: Path, eos_ids: list[int], pad_id: int | None) -> None:
    """Rewrite `folder`'s generation_config.json (eos_token_id = `eos_ids`, pad_token_id; created when missing)
    and config.json (use_cache true, also in its text_config). Nothing happens to a folder without config.json (an
    adapter)."""
    config_path, generation_path = folder / "config.json", folder / "generation_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    decoder = config.get("text_config") or config  # an image + text checkpoint's decoder has its own use_cache
    if config.get("use_cache") is not True or decoder.get("use_cache") is not True:
        config["use_cache"] = decoder["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    generation.update(eos_token_id=eos_ids, pad_token_id=pad_id)
    generation.setdefault("bos_token_id", config.get("bos_token_id"))
    generation_path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


def generated_text(tokenizer: Any, ids: Any) -> str:
    """The text of generated token ids as chat and serve both show it: special tokens (the stop tokens) left out,
    bytes that form no character (a multi-byte character cut by the token limit) as U+FFFD, as
    `tokenizer.decode` writes them. `ids`: a sequence or 1-D tensor of token ids."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

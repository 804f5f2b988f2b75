"""What a saved full model needs to be served as it was trained: generation stops at <end_of_turn> (a base
checkpoint's generation config knows only <eos>, so vLLM, TGI and `pipeline` would run to the token limit) and
the KV cache is on (training turns `use_cache` off in config.json). `merge` sets the same on the model object;
this is for folders the trainer wrote (a full fine-tune's run folder, checkpoint-N/, ema/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.turns import END


def stop_token_ids(tokenizer: Any) -> tuple[list[int], int | None] | None:
    """([<eos>, <end_of_turn>] ids, pad id) of a Gemma tokenizer; None without a tokenizer."""
    if tokenizer is None:
        return None
    end = tokenizer.convert_tokens_to_ids(END)
    ids = [i for i in (tokenizer.eos_token_id, end) if isinstance(i, int)]
    return list(dict.fromkeys(ids)), tokenizer.pad_token_id


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

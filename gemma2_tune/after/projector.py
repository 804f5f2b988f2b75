"""The image half of `export` for an image + text model: llama.cpp's projector file (mmproj: the image tower and
its multimodal projector as a `clip` GGUF) beside the decoder's GGUF, written by the same vendored converter
(`convert_hf_to_gguf.py --mmproj`) and read back.

llama.cpp runs the pair as `llama-mtmd-cli -m FILE.gguf --mmproj FILE.mmproj.gguf` or `llama-server ... --mmproj`.
What is checked: the file's metadata against the exported folder's config and image processor (tower shape,
resolution, normalisation, soft tokens per image), and the soft-token embeddings llama.cpp's multimodal library
(libmtmd, through llama-cpp-python) makes of a drawn test image against transformers' image tower and projector
(`check_image_embeddings`), then an image prompt generated through llama.cpp against transformers' answer
(after/image_prompt.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..families import Family

# llama.cpp's projector type (clip.projector_type) for each exported image + text family
PROJECTOR_TYPES = {"gemma3-vision": "gemma3"}
# Image + text families whose projector file is not written, and why (measured with llama-cpp-python 0.3.36 on the
# tiny Gemma 4 of the tests: 8-pixel patches, 2 x 2 pooling, at most 70 soft tokens per image)
NOT_WRITTEN = {
    "gemma4": "llama.cpp's projector file for Gemma 4 (gemma4v) computes transformers' image embeddings only for an "
              "image already at the size the image processor resizes it to: the file carries no soft-token budget "
              "(max_soft_tokens), and llama.cpp resizes each image its own way (sides rounded to a multiple of "
              "patch x pooling, kept between 70 and 1120 soft tokens, bicubic without antialiasing) where transformers "
              "scales every image to fill the budget. Measured with llama-cpp-python 0.3.36 on a tiny Gemma 4 with "
              "the published pooling (3 x 3) and a 140-token budget: a 264x264 image gave 121 soft tokens on both "
              "sides at cosine similarity 0.99998, but 144x144 gave 81 against transformers' 121, 192x288 96 against "
              "126, 600x400 425 against 126 (with --image-max-tokens 140: 126 each, at cosine similarity 0.877). So "
              "no projector file is written; the decoder's GGUF is, and runs text prompts",
}
# Gemma 3's projector pools the tower's patch grid by 4 per side (896 / 14 = 64 -> 16 per side, 256 tokens) unless
# the file says otherwise (llama.cpp's clip.cpp default; the converter writes the factor only when it differs)
DEFAULT_SCALE_FACTOR = 4
# What is not checked where no projector file is written
NOT_CHECKED = "image prompts through llama.cpp: no projector file"
# Each soft token's embedding from llama.cpp must point where transformers' does: cosine similarity at least this
# (f16 weights round at about 1e-3 relative; a wrong normalisation, patch order or projector drops it far lower)
EMBEDDING_COSINE_BOUND = 0.99


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


def processor_side(image_processor) -> tuple[int, int]:
    """(width, height) in pixels of an image the processor does not resize: Gemma 3's fixed size."""
    size = image_processor.size
    return int(size.width), int(size.height)


def drawn_image(width: int, height: int):
    """A fixed image at the processor's resolution (so neither side resizes it): a gradient with a red disc, a
    green square and a blue bar, the kind of detail a misplaced patch or channel would move."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    image.putdata([(255 * x // width, 255 * y // height, 128) for y in range(height) for x in range(width)])
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(220, 30, 30))
    draw.rectangle((width // 2, height // 2, 7 * width // 8, 7 * height // 8), fill=(30, 200, 60))
    draw.rectangle((0, 3 * height // 4, width // 3, height - 1), fill=(20, 40, 230))
    return image


@contextmanager
def mtmd_session(projector_file: Path, llm):
    """libmtmd's context for `projector_file` over `llm`'s text model (a llama_cpp.Llama; CPU, no warm-up, no timing
    lines) and an empty input-chunk list, both freed on leaving; (None, None) when the file does not load."""
    from llama_cpp import mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.warmup, params.n_threads = False, False, os.cpu_count() or 1
    params.print_timings = False
    ctx = mtmd.mtmd_init_from_file(str(projector_file).encode(), llm._model.model, params)
    if not ctx:
        yield None, None
        return
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        yield ctx, chunks
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_free(ctx)


def tokenize_with_image(ctx, chunks, text: bytes, pixels, add_special: bool) -> int:
    """libmtmd's tokenization of `text` (holding libmtmd's marker once) with `pixels` ((height, width, 3) uint8) as
    the image, into `chunks`. Returns libmtmd's code (0: tokenized)."""
    from llama_cpp import mtmd_cpp as mtmd

    height, width = pixels.shape[:2]
    buffer = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)
    prompt = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=add_special, parse_special=True)
    code = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    mtmd.mtmd_bitmap_free(bitmap)
    return code


def check_image_embeddings(gguf_file: Path, projector_file: Path, staged: Path, config: dict,
                           processor: dict) -> dict:
    """`drawn_image` through llama.cpp (libmtmd: the projector file, with the GGUF's vocabulary only) and through
    transformers (the staged tower and projector in float32, pixels normalised as the processor does: rescale and
    mean/std; the image is at the processor's size, so its resize is the identity). Returns the report: tokens per
    image on each side, per-token cosine similarity (bounded: EMBEDDING_COSINE_BOUND), max |difference|, `passed`,
    `failure`."""
    import numpy as np
    import torch
    import transformers
    from llama_cpp import Llama
    from llama_cpp import mtmd_cpp as mtmd
    from safetensors import safe_open
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    size = processor.get("size") or {}
    side = config["vision_config"]["image_size"]
    height, width = size.get("height", side), size.get("width", side)
    image = drawn_image(width, height)
    pixels = np.asarray(image, dtype=np.uint8)
    hidden = config["text_config"]["hidden_size"]

    llm = Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)  # libmtmd reads the text model's vocab
    try:
        with mtmd_session(projector_file, llm) as (ctx, chunks):
            if ctx is None:
                return {"passed": False, "failure": "llama.cpp's multimodal library could not load the projector file"}
            code = tokenize_with_image(ctx, chunks, mtmd.mtmd_default_marker(), pixels, add_special=False)
            image_chunks = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            image_chunks = [c for c in image_chunks
                            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if code != 0 or len(image_chunks) != 1 or mtmd.mtmd_encode_chunk(ctx, image_chunks[0]) != 0:
                return {"passed": False, "failure": f"llama.cpp's multimodal library could not encode the test image "
                                                    f"(tokenize code {code}, {len(image_chunks)} image chunks)"}
            n = mtmd.mtmd_input_chunk_get_n_tokens(image_chunks[0])
            ours = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * hidden,)).reshape(n, hidden).copy()
    finally:
        llm.close()

    full = transformers.AutoConfig.from_pretrained(staged)
    tower = transformers.AutoModel.from_config(full.vision_config).float().eval()
    projector = Gemma3MultiModalProjector(full).float().eval()
    weights = {"tower": {}, "projector": {}}
    with safe_open(str(staged / "model.safetensors"), "pt") as f:  # stage_tower's names
        for key in f.keys():
            if key.startswith("vision_tower.vision_model."):
                weights["tower"][key.removeprefix("vision_tower.vision_model.")] = f.get_tensor(key).float()
            else:
                weights["projector"][key.removeprefix("multi_modal_projector.")] = f.get_tensor(key).float()
    tower.load_state_dict(weights["tower"], strict=True)
    projector.load_state_dict(weights["projector"], strict=True)
    scale = processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0
    mean, std = (np.asarray(processor.get(k, [0.5] * 3), dtype=np.float32) for k in ("image_mean", "image_std"))
    values = (pixels.astype(np.float32) * scale - mean) / std
    with torch.no_grad():
        states = tower(pixel_values=torch.from_numpy(values).permute(2, 0, 1)[None]).last_hidden_state
        theirs = projector(states)[0].numpy()
    report = {"image": f"{width}x{height} drawn test image", "tokens_llama_cpp": int(n),
              "tokens_transformers": int(theirs.shape[0]), "bound": f"cosine similarity >= {EMBEDDING_COSINE_BOUND}"}
    if theirs.shape != ours.shape:
        return report | {"passed": False, "failure": f"llama.cpp makes {n} soft tokens of the image, transformers "
                                                     f"{theirs.shape[0]}"}
    cosine = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1) + 1e-12)
    report |= {"min_cosine": float(cosine.min()), "max_abs_diff": float(np.abs(ours - theirs).max()),
               "max_abs_value": float(np.abs(theirs).max())}
    passed = bool(cosine.min() >= EMBEDDING_COSINE_BOUND)
    return report | {"passed": passed, "failure": None if passed else
                     f"the image's soft-token embeddings differ: cosine similarity {cosine.min():.4f} "
                     f"(needs >= {EMBEDDING_COSINE_BOUND})"}

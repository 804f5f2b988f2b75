"""An image prompt generated through llama.cpp: the exported GGUF and its projector file (mmproj), run by llama.cpp's
multimodal library (libmtmd, through llama-cpp-python's bindings of its C API) as `llama-mtmd-cli` and
`llama-server --mmproj` run them, against transformers' greedy answer on the same rendered prompt and image.

The prompt (IMAGE_PROMPT) holds `projector.drawn_image` at the image processor's size (so neither side resizes it)
and is rendered by our renderer, as training and `chat --image` render it. Transformers: the exported folder in
float32, eager attention, the prompt expanded by the run's image processor (data/images.py: markers, soft tokens,
token types). llama.cpp: the same rendered text with libmtmd's marker where the processor's expansion puts the
image's markers and soft tokens (libmtmd writes the family's begin and end markers around the image's embeddings
itself), the text tokenized by the GGUF's vocabulary, the image encoded by the projector file and decoded as llama.cpp
decodes it (Gemma 3: attending both ways inside the image).

Bounds: the prompt's tokens equal (text ids, and the image's soft-token count); the first IMAGE_GREEDY_TOKENS
greedy tokens equal (see there for why that many); on the positions after the image, max |logit difference| at most
IMAGE_EFFECT_SHARE of the image's own effect on transformers' logits.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.turns import BOS, normalise, render
from ..families import Family

IMAGE_PROMPT = "Describe the picture."
# Greedy tokens that must equal transformers': those a user reads first. The image reaches the decoder through the
# projector file in f16 (soft-token embeddings at cosine similarity ~0.9999 of transformers', not as close as the text
# path's f16 weights keep the text prompts' logits), so the tokens of a random tiny model, whose next-token margins go
# down to 0.003 logits, may flip on a near-tie further on; the text prompts hold 32 (after/gguf_parity.py).
IMAGE_GREEDY_TOKENS = 8
# A random tiny model's greedy tokens may not depend on the image at all (measured: the tests' tiny Gemma 3 answers
# the same with a zeroed projector), so the logits are bounded too: on the positions after the image, llama.cpp's
# may differ from transformers' by at most this share of how far the image moves transformers' own logits (the same
# prompt with a flat grey image). f16 rounding stays far under it (0.003 of it on the tiny Gemma 3 of the tests); a
# projector file computing other embeddings does not (a zeroed projection: 1.3; a negated final norm: 1.7; patch
# embeddings scaled by 0.9: 0.093).
IMAGE_EFFECT_SHARE = 0.05


def image_messages(image_path: Path) -> list[dict[str, Any]]:
    """The prompt: one user turn holding the image, then the question (Hugging Face content parts)."""
    return [{"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                         {"type": "text", "text": IMAGE_PROMPT}]}]


def check_image_prompt(gguf_file: Path, projector_file: Path, folder: Path, family: Family, policy: str,
                       work: Path) -> dict[str, Any]:
    """Generate greedily from the image prompt through llama.cpp (`gguf_file` + `projector_file`) and through
    transformers (`folder`), `work` holding the drawn image's file. Returns the report: the prompt's tokens and soft
    tokens on each side, both greedy continuations and answers, the bound, `passed`, `failure`."""
    reference = _transformers(folder, family, policy, work)
    ours = _llama_cpp(gguf_file, projector_file, reference)
    k = IMAGE_GREEDY_TOKENS
    report = {"prompt": IMAGE_PROMPT, "image": reference["image"],
              "bound": f"prompt tokens equal, the first {k} greedy tokens equal, max |logit difference| after the image "
                       f"<= {IMAGE_EFFECT_SHARE:g} x the image's own effect",
              "prompt_tokens": len(reference["ids"]), "soft_tokens_transformers": reference["soft_tokens"],
              "soft_tokens_llama_cpp": ours["soft_tokens"], "prompt_ids_equal": ours["ids"] == reference["ids"],
              "greedy_tokens_compared": min(k, len(reference["continuation"])),
              "transformers_answer": reference["answer"], "llama_cpp_answer": ours["answer"],
              "transformers_continuation": reference["continuation"][:k], "llama_cpp_continuation": ours["continuation"][:k]}
    first, rows = ours["first_row"], ours["logits"]
    n = rows.shape[-1]
    theirs = reference["logits"][first: first + len(rows), :n]
    distance = float(np.abs(rows - theirs).max()) if len(rows) else float("nan")
    effect = float(np.abs(reference["flat_logits"][first: first + len(rows), :n] - theirs).max()) if len(rows) else 0.0
    report |= {"positions": len(rows), "max_abs_logit_diff": distance, "image_effect_max_abs_logit_diff": effect,
               "logit_bound": IMAGE_EFFECT_SHARE * effect}
    problems = []
    if not distance <= IMAGE_EFFECT_SHARE * effect:  # NaN fails too
        problems.append(f"llama.cpp's logits after the image differ from transformers' by up to {distance:.4g}, "
                        f"more than {IMAGE_EFFECT_SHARE:g} x the image's own effect ({effect:.4g}: the same prompt "
                        f"with a flat grey image, in transformers)")
    if ours["soft_tokens"] != reference["soft_tokens"]:
        problems.append(f"llama.cpp makes {ours['soft_tokens']} soft tokens of the image, transformers "
                        f"{reference['soft_tokens']}")
    elif not report["prompt_ids_equal"]:
        at = next((i for i, (a, b) in enumerate(zip(ours["ids"], reference["ids"])) if a != b),
                  min(len(ours["ids"]), len(reference["ids"])))
        problems.append(f"the image prompt's tokens differ from transformers' (first at position {at} of "
                        f"{len(reference['ids'])})")
    if ours["continuation"][:k] != reference["continuation"][:k]:
        at = next((i for i, (a, b) in enumerate(zip(ours["continuation"], reference["continuation"])) if a != b),
                  min(len(ours["continuation"]), len(reference["continuation"])))
        problems.append(f"the greedy answer to the image prompt differs from transformers' at token {at} "
                        f"(llama.cpp {ours['answer'][:80]!r}, transformers {reference['answer'][:80]!r})")
    return report | {"passed": not problems, "failure": "; ".join(problems) or None}


def _transformers(folder: Path, family: Family, policy: str, work: Path) -> dict[str, Any]:
    """The prompt rendered and expanded by the run's image processor, transformers' greedy continuation, and the
    text llama.cpp is given (the expansion's markers and soft tokens replaced by libmtmd's marker)."""
    import torch
    from llama_cpp import mtmd_cpp as mtmd

    from ..data.examples import TurnTokenizer
    from ..data.images import ImageReader, images_of
    from ..models.loading import LoadRequest, load_image_processing, load_model, load_tokenizer
    from ..models.serving import stop_ids
    from .projector import drawn_image, processor_side

    tokenizer = load_tokenizer(str(folder))
    processing = load_image_processing(str(folder), family, tokenizer)
    width, height = processor_side(processing.image_processor)
    image_path = work / "drawn-test-image.png"
    drawn_image(width, height).save(image_path)
    turns = normalise(image_messages(image_path), policy, allow_open_end=True, family=family,
                      images=ImageReader(work))
    rendered = render(turns, add_generation_prompt=True, family=family)
    inputs = TurnTokenizer(tokenizer, family, False, False, processing).model_inputs(rendered, turns)
    features = processing.features(images_of(turns))
    expansion = processing.expansion(features, 0)
    facts = family.images
    before, after = expansion.split(facts.begin, 1)[0], expansion.rsplit(facts.end, 1)[1]
    llama_text = rendered.text.replace(facts.placeholder, before + mtmd.mtmd_default_marker().decode() + after, 1)

    model, _ = load_model(LoadRequest(str(folder), dtype="float32", attn_implementation="eager"))
    model.eval()
    stop = stop_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=IMAGE_GREEDY_TOKENS, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
    ids = inputs["input_ids"][0].tolist()
    continuation = out[0, len(ids):].tolist()
    logits = _teacher_forced(model, inputs, continuation)
    flat_path = work / "flat-test-image.png"
    _flat_image(width, height).save(flat_path)
    flat = processing.features([ImageReader(work).read(str(flat_path), "the flat test image")])  # the image's effect
    flat_logits = _teacher_forced(model, inputs | {k: flat[k] for k in ("pixel_values", "image_position_ids")
                                                   if k in flat}, continuation)
    return {"ids": ids, "logits": logits, "flat_logits": flat_logits, "soft_tokens": features["soft_tokens"][0], "soft_id": processing.ids["soft"],
            "continuation": continuation, "answer": tokenizer.decode(continuation, skip_special_tokens=True),
            "llama_text": llama_text, "image": f"{width}x{height} drawn test image", "image_path": image_path,
            "pixels": np.asarray(drawn_image(width, height), dtype=np.uint8), "stop": stop}


def _teacher_forced(model, inputs: dict[str, Any], continuation: list[int]) -> np.ndarray:
    """The model's float32 logits over prompt + `continuation` ((positions, vocab)), the image in the prompt."""
    import torch

    extra = torch.tensor([continuation], dtype=inputs["input_ids"].dtype)
    forward = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1))
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            forward[key] = torch.cat([inputs[key], torch.zeros_like(extra)], 1)
    with torch.no_grad():
        return model(**forward, use_cache=False).logits[0].float().numpy()


def _flat_image(width: int, height: int):
    """A uniform mid-grey image: what the logits are without the drawn image's content."""
    from PIL import Image

    return Image.new("RGB", (width, height), (128, 128, 128))


def _llama_cpp(gguf_file: Path, projector_file: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """The prompt through libmtmd (tokenized into text and image chunks, each decoded into the context), then greedy
    tokens from llama.cpp's logits. Returns the prompt's ids (an image's soft tokens as the reference's soft-token id,
    to compare), the image's soft tokens, the continuation and its text."""
    import llama_cpp
    from llama_cpp import Llama, llama_vocab_is_eog
    from llama_cpp import mtmd_cpp as mtmd

    from .projector import mtmd_session, tokenize_with_image

    n_ctx = len(reference["ids"]) + IMAGE_GREEDY_TOKENS + 16
    llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                verbose=False, n_threads=os.cpu_count() or 1, seed=0)
    try:
        with mtmd_session(projector_file, llm) as (ctx, chunks):
            if ctx is None:
                raise RuntimeError("llama.cpp's multimodal library could not load the projector file")
            add_bos = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
            text = reference["llama_text"]
            text = text[len(BOS):] if add_bos and text.startswith(BOS) else text  # as llama.cpp's servers do
            code = tokenize_with_image(ctx, chunks, text.encode(), reference["pixels"], add_special=add_bos)
            if code != 0:
                raise RuntimeError(f"llama.cpp's multimodal library could not tokenize the image prompt (code {code})")
            ids, soft_tokens, last_image_end = [], 0, 0
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens = [pointer[j] for j in range(n.value)]
                    ids += tokens
                    llm.eval(tokens)
                else:
                    n_image = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    soft_tokens += n_image
                    ids += [reference["soft_id"]] * n_image
                    n_past = llama_cpp.llama_pos(0)
                    if mtmd.mtmd_helper_eval_chunk_single(ctx, llm._ctx.ctx, chunk, llm.n_tokens, 0, llm.n_batch,
                                                          False, ctypes.byref(n_past)) != 0:
                        raise RuntimeError("llama.cpp could not decode the image's embeddings")
                    llm.n_tokens = n_past.value
                    last_image_end = len(ids)
        # teacher-forced on transformers' continuation: llama.cpp's greedy token at each step is its argmax there,
        # equal to free generation up to the first difference (all that is compared)
        n_vocab = min(llm.n_vocab(), reference["logits"].shape[-1])
        continuation: list[int] = []
        for token in reference["continuation"] or [None]:
            continuation.append(int(np.argmax(llm.scores[llm.n_tokens - 1, :n_vocab])))
            if token is None or llama_vocab_is_eog(llm._model.vocab, token):
                break
            llm.eval([token])
        # logits on the positions after the image (llama.cpp keeps none inside it): the prompt's rest, the answer
        rows = np.array(llm.scores[last_image_end: llm.n_tokens, :n_vocab], dtype=np.float32, copy=True)
        answer = llm.detokenize(continuation, special=False).decode("utf-8", "replace")
    finally:
        llm.close()
    return {"ids": ids, "soft_tokens": soft_tokens, "continuation": continuation, "answer": answer,
            "logits": rows, "first_row": last_image_end}

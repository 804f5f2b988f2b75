"""Images on the tiny Gemma 3 image + text and Gemma 4 checkpoints (built locally, with their real processors at a
small image size): rows with images read and checked, rendered as the official templates and processors render
them, image tokens never learned, the image mask bidirectional inside an image and causal elsewhere (as the model
computes it, with token types always passed), batches mixing image and text rows, packing refused for image rows,
the cache keyed on image bytes, serve's and plan's image checks."""

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHAPE_QUESTION, draw_shape, shape_rows, write_jsonl
from gemma2_tune.config.schema import SftDataSection
from gemma2_tune.data.examples import TurnTokenizer, build_examples, mark_supervised
from gemma2_tune.data.images import ImageReader, images_of
from gemma2_tune.data.sources import Row, load_rows
from gemma2_tune.data.turns import IGNORE_INDEX, BadRow, normalise, render
from gemma2_tune.families import GEMMA2, GEMMA3, GEMMA4

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
OFFICIAL = {"gemma3-vision": "gemma3.jinja", "gemma4": "gemma4_v5.jinja"}
TINY = {"gemma3-vision": ("builtin:tiny-gemma3-vision", GEMMA3), "gemma4": ("builtin:tiny-gemma4", GEMMA4)}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tune_home):
    """(folder, family, tokenizer with the generated template, image processing) of a tiny image + text model."""
    from gemma2_tune.data.template import use_run_template
    from gemma2_tune.models.builtin import builtin_path
    from gemma2_tune.models.loading import load_image_processing, load_tokenizer

    name, family = TINY[request.param]
    path = builtin_path(name)
    tokenizer = load_tokenizer(str(path), family=family)
    use_run_template(tokenizer, family, "fold")
    return path, family, tokenizer, load_image_processing(str(path), family, tokenizer)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A folder with a few shapes (32 x 32), a wide one (96 x 32) and a file that is not an image."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = random.Random(0)
    for colour in ("red", "green", "blue"):
        draw_shape(folder / f"{colour}.png", colour, "circle", rng)
    draw_shape(folder / "wide.png", "red", "square", rng, size=32).unlink()
    from PIL import Image

    Image.new("RGB", (96, 32), (30, 60, 220)).save(folder / "wide.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_chat(*parts, answer="Red.", system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": answer}]


def img(path) -> dict:
    return {"type": "image", "image": str(path)}


def text(t) -> dict:
    return {"type": "text", "text": t}


# --- rendering: the saved template, the official one, the training renderer --------------------------------------

def conversations(folder: Path) -> list[list[dict]]:
    red, blue = folder / "red.png", folder / "blue.png"
    return [
        image_chat(img(red), text(f" {SHAPE_QUESTION} ")),
        image_chat(text("Look:"), img(red), text("  and "), img(blue), text("Same?"), answer="No.",
                   system="Answer briefly."),
        image_chat(img(red)),  # an image alone
        image_chat(img(red), text("Colour?")) + [{"role": "user", "content": [img(blue), text("And this?")]}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(red)}}, text("Colour?")]}],
    ]


def official_parts(messages):
    """The same conversation as the official templates take it: image parts without their source."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = m | {"content": [{"type": "image"} if p["type"] != "text" else p for p in m["content"]]}
        out.append(m)
    return out


def test_image_parts_render_as_the_official_templates_and_the_training_renderer(tiny, pictures):
    _, family, tokenizer, _ = tiny
    official = (TRL_TEMPLATES / OFFICIAL[family.key]).read_text()
    reader = ImageReader()
    for messages in conversations(pictures):
        for prompt in (False, True):
            if prompt and messages[-1]["role"] != "user":
                continue
            ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            theirs = tokenizer.apply_chat_template(official_parts(messages), chat_template=official, tokenize=False,
                                                   add_generation_prompt=prompt)
            trained = render(normalise(messages, "fold", family=family, allow_open_end=True, images=reader),
                             family=family, add_generation_prompt=prompt).text
            assert ours == theirs == trained
            assert ours.count(family.images.placeholder) == sum(
                p["type"] != "text" for m in messages if isinstance(m["content"], list) for p in m["content"])


@pytest.mark.parametrize("case", ["model image", "system image", "marker across parts", "unknown part", "audio",
                                  "no text string"])
def test_the_template_refuses_what_training_refuses_with_its_words(tiny, pictures, case):
    from jinja2.exceptions import TemplateError

    _, family, tokenizer, _ = tiny
    red = img(pictures / "red.png")
    messages = {
        "model image": [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": [red]}],
        "system image": [{"role": "system", "content": [red, text("x")]}, {"role": "user", "content": "Hi"}],
        "marker across parts": [{"role": "user", "content": [red, text("<start_of"), text("_turn>")]}],
        "unknown part": [{"role": "user", "content": [red, {"type": "video", "video": "v.mp4"}]}],
        "audio": [{"role": "user", "content": [red, {"type": "input_audio", "input_audio": {}}]}],
        "no text string": [{"role": "user", "content": [red, {"type": "text", "text": 3}]}],
    }[case]
    if case == "marker across parts" and family.key == "gemma4":
        messages = [{"role": "user", "content": [red, text("<|tu"), text("rn>")]}]
    with pytest.raises(BadRow) as trained:
        normalise(messages, "fold", family=family, allow_open_end=True, images=ImageReader())
    with pytest.raises(TemplateError) as served:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert str(served.value) == str(trained.value)


# --- the processor's expansion -----------------------------------------------------------------------------------

def test_gemma3_rows_tokenize_as_gemma3processor_does_with_token_types_and_pixels(tune_home, pictures):
    """Our expansion + one tokenization = transformers' Gemma3Processor on the rendered text: ids, token types
    (1 on soft tokens only) and pixel values; with pan-and-scan on, the wide image's crops too."""
    from transformers import AutoProcessor

    from gemma2_tune.models.builtin import builtin_path
    from gemma2_tune.models.loading import load_image_processing, load_tokenizer

    path = builtin_path("builtin:tiny-gemma3-vision")
    tokenizer = load_tokenizer(str(path), family=GEMMA3)
    processor = AutoProcessor.from_pretrained(path)
    for pan_and_scan, name in ((False, "red.png"), (True, "wide.png")):
        images = load_image_processing(str(path), GEMMA3, tokenizer, pan_and_scan=pan_and_scan)
        if pan_and_scan:  # crops of the tiny 32-pixel processor: the published 256-pixel minimum would allow none
            images.options |= {"pan_and_scan_min_crop_size": 8}
        turns = normalise(image_chat(text("Look"), img(pictures / name), text(SHAPE_QUESTION)), "fold",
                          family=GEMMA3, images=ImageReader())
        inputs = TurnTokenizer(tokenizer, GEMMA3, images=images).model_inputs(render(turns, family=GEMMA3), turns)
        from PIL import Image

        reference = processor(text=[render(turns, family=GEMMA3).text], images=[[Image.open(pictures / name)]],
                              return_tensors="pt", add_special_tokens=False, images_kwargs=images.options)
        assert inputs["input_ids"].tolist() == reference["input_ids"].tolist()
        assert inputs["token_type_ids"].tolist() == reference["token_type_ids"].tolist()
        assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
        crops = 3 if pan_and_scan else 0  # 96 x 32: three square crops (Gemma3ImageProcessor.pan_and_scan)
        assert inputs["pixel_values"].shape[0] == 1 + crops
        assert int(inputs["token_type_ids"].sum()) == 4 * (1 + crops)  # 4 soft tokens per image and crop


def test_gemma4_expansion_is_gemma4processors(tune_home, pictures):
    """Gemma4Processor cannot be built without torchvision; its expansion (replace_image_token) and its count of
    soft tokens (from the image size) are run on what our expansion reads, and equal it."""
    from types import SimpleNamespace

    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor, get_aspect_ratio_preserving_size

    from gemma2_tune.models.builtin import builtin_path
    from gemma2_tune.models.loading import load_image_processing, load_tokenizer

    path = builtin_path("builtin:tiny-gemma4")
    tokenizer = load_tokenizer(str(path), family=GEMMA4)
    images = load_image_processing(str(path), GEMMA4, tokenizer)
    found = [ImageReader().read(str(pictures / n), "x") for n in ("red.png", "wide.png")]
    features = images.features(found)
    ip = images.image_processor
    fake = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>")
    for k, (image, name) in enumerate(zip(found, ("red.png", "wide.png"))):
        assert images.expansion(features, k) == Gemma4Processor.replace_image_token(
            fake, {"num_soft_tokens_per_image": features["soft_tokens"]}, k)
        h, w = get_aspect_ratio_preserving_size(image.height, image.width, ip.patch_size,
                                                ip.max_soft_tokens * ip.pooling_kernel_size ** 2,
                                                ip.pooling_kernel_size)
        assert features["soft_tokens"][k] == (h // ip.patch_size) * (w // ip.patch_size) // ip.pooling_kernel_size ** 2
    assert features["soft_tokens"][0] != features["soft_tokens"][1]  # sizes differ, so do the counts


# --- rows: reading, bad rows, masks ------------------------------------------------------------------------------

def rows_file(folder: Path, rows: list) -> list[Row]:
    return load_rows(SftDataSection(dataset=str(write_jsonl(folder / "rows.jsonl", rows))))[0]


def test_image_rows_from_every_schema_are_read_and_bad_ones_counted_naming_file_and_line(tiny, pictures, tmp_path):
    _, family, tokenizer, images = tiny
    (tmp_path / "img").mkdir()
    for name in ("red.png", "broken.png"):
        (tmp_path / "img" / name).write_bytes((pictures / name).read_bytes())
    big = tmp_path / "img" / "big.png"
    from PIL import Image

    Image.effect_noise((600, 600), 80).convert("RGB").save(big)  # about 1 MiB of noise, over a 0.5 MiB limit
    rel, url = "img/red.png", (tmp_path / "img" / "red.png").as_uri()
    rows = [
        image_chat(img(rel), text("Colour?")),  # 1 relative to the data file
        image_chat({"type": "image_url", "image_url": {"url": url}}, text("Colour?")),  # 2 file://
        image_chat({"type": "image_url", "image_url": {"url": data_url(pictures / "red.png")}}),  # 3 data:
        {"images": [rel], "messages": [{"role": "user", "content": "<image>\nColour?"},
                                       {"role": "assistant", "content": "Red."}]},  # 4 LLaVA
        {"images": [rel], "messages": image_chat({"type": "image"}, text("Colour?"))},  # 5 TRL
        {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}],
         "images": [rel]},  # 6 ShareGPT
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},  # 7 text
        image_chat(img("img/missing.png")),  # 8
        image_chat(img("img/broken.png")),  # 9
        image_chat(img("img/big.png")),  # 10
        image_chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),  # 11
        image_chat({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}),  # 12
        {"images": [rel, rel], "messages": [{"role": "user", "content": "<image> only one"},
                                            {"role": "assistant", "content": "Red."}]},  # 13
        [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": [img(rel)]}],  # 14
    ]
    rows = [r if isinstance(r, dict) else {"messages": r} for r in rows]
    data = SftDataSection(dataset="x", max_image_mb=0.5, max_length=512)
    examples, report = build_examples(rows_file(tmp_path, rows), tokenizer, data, family, images=images)
    assert report.rows_kept == 7 and report.rows_bad == 7 and report.image_rows == 6 and report.images == 6
    missing, broken, oversized, remote, not_base64 = report.bad_rows
    assert missing == (f"rows.jsonl line 8: message 0 (user) content part 0: image {tmp_path / 'img' / 'missing.png'} "
                       "does not exist")
    assert broken.startswith(f"rows.jsonl line 9: message 0 (user) content part 0: image "
                             f"{tmp_path / 'img' / 'broken.png'} is not a readable image (UnidentifiedImageError")
    assert oversized == (f"rows.jsonl line 10: message 0 (user) content part 0: {big} is "
                         f"{big.stat().st_size / 2**20:.1f} MiB, over the 0.5 MiB limit (data.max_image_mb)")
    assert remote == ("rows.jsonl line 11: message 0 (user) content part 0 is a remote image "
                      "(https://example.com/cat.png); images are read from local files or data: URLs only (nothing "
                      "is fetched): download it and give its path")
    assert not_base64 == ("rows.jsonl line 12: message 0 (user) content part 0 is a data: URL that is not base64 "
                          "(expected data:image/png;base64,...)")
    assert report.rows_bad == 7  # lines 13 (placeholders) and 14 (an image in the answer) too, beyond the first five
    mismatch = build_examples(rows_file(tmp_path, rows[12:] + rows[:1]), tokenizer, data, family,
                              images=images)[1].bad_rows
    assert mismatch == ["rows.jsonl line 1: the row's images column has 2 images but its messages have 1 place for "
                        "one (<image> in the text, or image parts naming no image)",
                        "rows.jsonl line 2: message 1 (assistant) has an image; only user messages carry images"
                        + (" (the model writes text, and a system message is text)" if family.key != "gemma4" else
                           " here (the model writes text; images in system and tool messages are not trained)")]
    assert [len(e.images) for e in examples] == [1, 1, 1, 1, 1, 1, 0]
    assert len({e.images[0].digest for e in examples if e.images}) == 1  # one picture, read six ways


def test_image_tokens_are_never_learned_even_with_train_on_all(tiny, pictures, tmp_path):
    _, family, tokenizer, images = tiny
    rows = rows_file(tmp_path, [{"messages": image_chat(img(pictures / "red.png"), text(SHAPE_QUESTION))}])
    for train_on in ("model_turns", "all"):
        data = SftDataSection(dataset="x", train_on=train_on)
        (example,), _ = build_examples(rows, tokenizer, data, family, images=images)
        image_ids = set(images.ids.values())
        marked = [i for i, t in enumerate(example.input_ids) if t in image_ids]
        assert marked and all(example.labels[i] == IGNORE_INDEX for i in marked)
        supervised = [t for t in example.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(supervised).startswith("<bos>" if train_on == "all" else "Red.")


def test_preview_shows_each_image_as_one_placeholder_outside_the_supervised_marks(tiny, pictures, tmp_path):
    from gemma2_tune.data.preview import preview

    _, family, tokenizer, images = tiny
    write_jsonl(tmp_path / "rows.jsonl", [{"messages": image_chat(img(pictures / "red.png"), text("Colour?"))}])
    for train_on in ("model_turns", "all"):
        data = SftDataSection(dataset=str(tmp_path / "rows.jsonl"), train_on=train_on)
        (heading, shown), (_, summary) = list(preview(data, tokenizer, family, 1, images=images))
        # a 32 x 32 image: 4 tokens (Gemma 3); Gemma 4 resizes it to its patch budget, 128 x 128: 16 x 16 patches
        # pooled 2 x 2
        soft = 4 if family is GEMMA3 else 64
        tokens = soft + 2 + (4 if family is GEMMA3 else 0)  # markers; Gemma 3's blank lines around it (4 here)
        mark = f"⟨image 1: red.png, 32x32 px, {tokens} tokens⟩"
        assert shown.count("⟨image") == 1 and mark in shown, shown
        before, after = shown.split(mark)
        assert before.count("⟦") == before.count("⟧") and not after.startswith("⟧")  # never inside ⟦ ⟧
        assert family.images.soft_token not in shown
        assert "images: 1 in 1 rows" in summary and "images: " + images.describe() in summary


# --- the image mask, as the model computes it --------------------------------------------------------------------

def captured_masks(model, inputs) -> dict[str, torch.Tensor]:
    """The additive masks the eager attention of the first sliding and the first global layer received:
    (length, length) booleans, True where attention is allowed."""
    layers = model.model.language_model.layers
    kinds = model.config.get_text_config().layer_types
    wanted = {kind: next(i for i, k in enumerate(kinds) if k == kind) for kind in ("sliding_attention",
                                                                                   "full_attention")}
    found, hooks = {}, []
    for kind, index in wanted.items():
        def grab(module, args, kwargs, kind=kind):
            found[kind] = kwargs["attention_mask"][0, 0] == 0
        hooks.append(layers[index].self_attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return found


def test_the_image_mask_is_bidirectional_inside_an_image_and_causal_elsewhere(tiny, pictures):
    """Two images in a prompt: on sliding layers (and Gemma 3's global ones) each image's tokens see each other,
    and nothing else sees the future; Gemma 4's global layers stay causal (its model's choice). Without the token
    types, which transformers takes silently, the mask would be causal everywhere: the collator always sends them."""
    from transformers import AutoModelForImageTextToText

    path, family, tokenizer, images = tiny
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    turns = normalise([{"role": "user", "content": [img(pictures / "red.png"), text("and"),
                                                    img(pictures / "blue.png"), text("?")]}], "fold", family=family,
                      allow_open_end=True, images=ImageReader())
    inputs = TurnTokenizer(tokenizer, family, images=images).model_inputs(
        render(turns, family=family, add_generation_prompt=True), turns)
    soft = (inputs["input_ids"][0] == images.ids["soft"]).tolist()
    n = len(soft)
    block = [-1] * n  # which image a token belongs to (soft tokens only)
    k = -1
    for i, is_soft in enumerate(soft):
        if is_soft and (i == 0 or not soft[i - 1]):
            k += 1
        if is_soft:
            block[i] = k
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    within = torch.tensor([[block[q] == block[kv] >= 0 for kv in range(n)] for q in range(n)])
    assert k == 1 and within.sum() > causal.diagonal().sum() * 0  # two images, each more than one token
    masks = captured_masks(model, inputs)
    window = model.config.get_text_config().sliding_window
    in_window = torch.tensor([[q - kv < window for kv in range(n)] for q in range(n)])
    assert torch.equal(masks["sliding_attention"], (causal | within) & in_window)
    expected_global = causal if family is GEMMA4 else causal | within
    assert torch.equal(masks["full_attention"], expected_global)
    assert not torch.equal(masks["sliding_attention"], causal & in_window)  # the bidirectional part is there
    without = {k: v for k, v in inputs.items() if k != images.token_type_key}
    assert torch.equal(captured_masks(model, without)["sliding_attention"], causal & in_window)  # the silent trap


# --- batches: mixed rows, token types, padding; packing refused ---------------------------------------------------

def test_batches_mix_image_and_text_rows_and_each_row_computes_as_alone(tiny, pictures, tmp_path):
    from transformers import AutoModelForImageTextToText

    from gemma2_tune.data.collator import IMAGES_COLUMN, ImageBlockCollator, images_column
    from gemma2_tune.data.packing import unpacked

    path, family, tokenizer, images = tiny
    rows = [{"messages": image_chat(img(pictures / "red.png"), text("Colour?"))},
            {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": image_chat(text("Two:"), img(pictures / "blue.png"), img(pictures / "green.png"),
                                    answer="Blue and green.")}]
    examples, _ = build_examples(rows_file(tmp_path, rows), tokenizer, SftDataSection(dataset="x"), family,
                                 images=images)
    blocks = unpacked(examples)
    records = images_column(blocks)
    items = [{"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids, IMAGES_COLUMN: r}
             for b, r in zip(blocks, records)]
    collate = ImageBlockCollator(tokenizer.pad_token_id, images=images)
    batch = collate(items)
    types = batch[images.token_type_key]
    assert types.shape == batch["input_ids"].shape and types.sum() == (batch["input_ids"] == images.ids["soft"]).sum()
    assert types[1].sum() == 0 and types[0, len(blocks[0].input_ids):].sum() == 0  # text row; padding
    assert batch["pixel_values"].shape[0] == 3  # red, then blue and green: the order of their soft tokens
    text_only = collate([items[1]])
    assert images.token_type_key in text_only and "pixel_values" not in text_only
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for i, item in enumerate(items):
            alone = collate([item])
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits
            n = len(item["input_ids"])
            assert torch.allclose(together[i, :n], logits[0], atol=1e-5), i


def test_image_rows_are_never_packed_because_the_sliding_image_mask_would_misplace_them(tiny, pictures, tmp_path):
    """Packed, the second row's image mask on sliding layers is read at the wrong places (transformers remaps
    positions per row, then looks image blocks up by position): its logits differ from the row alone. So pack()
    leaves image rows as blocks of their own; text rows still pack."""
    from transformers import AutoModelForImageTextToText

    from gemma2_tune.data.collator import IMAGES_COLUMN, ImageBlockCollator, images_column
    from gemma2_tune.data.packing import Block, pack, unpacked

    path, family, tokenizer, images = tiny
    # the two image rows laid out differently (a row alone would be masked right by chance if they were alike)
    rows = [{"messages": image_chat(text("Look at this one, please:"), img(pictures / "red.png"), text("Colour?"))},
            {"messages": image_chat(img(pictures / "blue.png"), text("Colour?"))}]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
             for q in ("Hi", "Yo")]
    examples, _ = build_examples(rows_file(tmp_path, rows), tokenizer, SftDataSection(dataset="x"), family,
                                 images=images)
    blocks = pack(examples, 1024)
    assert [b.rows for b in blocks] == [2, 1, 1] and [len(b.images) for b in blocks] == [0, 1, 1]
    first, second = unpacked(examples[:2])
    packed = Block(first.input_ids + second.input_ids, first.labels + second.labels,
                   first.position_ids + second.position_ids, 2, first.images + second.images)
    collate = ImageBlockCollator(tokenizer.pad_token_id, images=images)

    def logits(block):
        item = {"input_ids": block.input_ids, "labels": block.labels, "position_ids": block.position_ids,
                IMAGES_COLUMN: images_column([block])[0]}
        inputs = {k: v for k, v in collate([item]).items() if k != "labels"}
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0]

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    alone = logits(second)
    together = logits(packed)[len(first.input_ids):]
    assert not torch.allclose(together, alone, atol=1e-4)


def test_the_cache_key_follows_the_image_bytes(tiny, tmp_path):
    from gemma2_tune.data.cache import cache_key
    from gemma2_tune.data.images import images_fingerprint

    _, family, tokenizer, images = tiny
    rows = shape_rows(tmp_path, 3, seed=1)
    loaded = rows_file(tmp_path, rows)
    data = SftDataSection(dataset="x")

    def key():
        return cache_key(data, "source", tokenizer, family=family.key, images=images_fingerprint(loaded)
                         + images.fingerprint())

    before = key()
    assert key() == before
    draw_shape(tmp_path / "img" / "1-0.png", "blue", "circle", random.Random(5))  # same path, other pixels
    assert key() != before
    assert cache_key(data, "source", tokenizer) == cache_key(data, "source", tokenizer, images=None)


def test_train_projector_leaves_only_the_projector_trainable_beside_the_decoder(tiny):
    from transformers import AutoModelForImageTextToText

    from gemma2_tune.config.layering import resolve
    from gemma2_tune.models.checks import freeze_towers, tower_parameters
    from gemma2_tune.models.lora import lora_config

    path, family, _, _ = tiny
    model = AutoModelForImageTextToText.from_pretrained(path)
    freeze_towers(model, family)
    assert not any(p.requires_grad for _, p in tower_parameters(model, family))
    freeze_towers(model, family, train_projector=True)
    trainable = {n for n, p in tower_parameters(model, family) if p.requires_grad}
    assert trainable and all(n.startswith(family.images.projector + ".") for n in trainable)
    assert not any(p.requires_grad for n, p in tower_parameters(model, family) if n not in trainable)
    cfg = resolve(None, [f"model.name_or_path={path}", "model.train_projector=true"]).config
    assert lora_config(cfg, model).modules_to_save == [family.images.projector.rsplit(".", 1)[-1]]


def test_image_keys_are_refused_where_the_model_cannot_honour_them():
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.errors import ConfigError

    with pytest.raises(ConfigError, match="data.pan_and_scan: Gemma 4's processor has no pan-and-scan"):
        resolve(None, ["model.name_or_path=google/gemma-4-E4B-it", "data.pan_and_scan=true"])
    with pytest.raises(ConfigError, match="model.train_projector: Gemma 2 has no image projector"):
        resolve(None, ["model.name_or_path=google/gemma-2-2b", "model.train_projector=true"])
    assert resolve(None, ["model.name_or_path=google/gemma-3-4b-it", "data.pan_and_scan=true",
                          "model.train_projector=true"]).config.data.pan_and_scan


def test_text_models_and_text_commands_refuse_images_saying_why(pictures):
    part = [{"role": "user", "content": [img(pictures / "red.png"), text("?")]}]
    with pytest.raises(BadRow, match="content part 0 is of type 'image'; a text model takes only text parts"):
        normalise(part, "fold", family=GEMMA2, allow_open_end=True, images=ImageReader())
    with pytest.raises(BadRow, match="is an image; this command reads text only"):
        normalise(part, "fold", family=GEMMA3, allow_open_end=True)


# --- serve and plan ------------------------------------------------------------------------------------------------

def test_serve_takes_data_urls_and_refuses_paths_remote_urls_big_images_and_batching(tiny, pictures):
    from gemma2_tune.after.serve.schema import Checked, Served, check_request

    path, family, tokenizer, images = tiny
    served = Served(path, "tiny", "fold", family, str(path), tokenizer=tokenizer, context=4096, vocab_size=2000,
                    images=images)

    def body(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          text("Colour?")]}]}

    checked = check_request(body(data_url(pictures / "red.png")), served)
    assert isinstance(checked, Checked) and checked.inputs["pixel_values"].shape[0] == 1
    assert checked.inputs[images.token_type_key].sum() == checked.ids.count(images.ids["soft"]) > 0
    for url, words in ((str(pictures / "red.png"), "is a file path; this server takes images as data: URLs only"),
                       ("https://example.com/a.png", "is a remote image (https://example.com/a.png); this server "
                        "takes images as data: URLs only (base64) and fetches nothing")):
        status, message, param, _ = check_request(body(url), served)
        assert status == 400 and words in message and param == "messages"
    status, message, _, _ = check_request(body(data_url(pictures / "red.png")), served, batching=True)
    assert status == 400 and "not taken with continuous batching" in message
    text_only = check_request({"messages": [{"role": "user", "content": "Hi"}]}, served)
    assert isinstance(text_only, Checked) and images.token_type_key in text_only.inputs


def test_plan_names_the_processor_resolution_and_image_tokens_per_row():
    from gemma2_tune.training.imageplan import image_lines

    g3 = image_lines("google/gemma-3-27b-it", None, 1024)
    assert g3[0] == ("images (the published processor): 896x896 pixels, 256 soft tokens per image (258 with its "
                     "markers; pan-and-scan off); a row of data.max_length 1,024 holds at most 3 images, image tokens "
                     "are never learned")
    assert "16 heads x 4,096^2 attention scores" in g3[1] and "2.00 GiB" in g3[1]
    g4 = image_lines("google/gemma-4-E4B-it", None, 4096)
    assert "up to 280 soft tokens per image" in g4[0] and "holds at most 14 images" in g4[0]
    assert image_lines("google/gemma-2-9b", None, 1024) == []


@pytest.mark.parametrize("first, second", [("builtin:tiny-gemma4", "projector"),
                                           ("builtin:tiny-gemma3-vision", "projector"),
                                           ("builtin:tiny-gemma2", "builtin:tiny-gemma3-vision")])
def test_merge_models_refuses_image_text_inputs_with_other_towers_or_families(tune_home, tmp_path, first, second):
    """merge-models merges the language model of image + text checkpoints and carries the towers of the first: an
    input whose projector differs (as a run with model.train_projector leaves it) is refused, named, with the
    reason; a text model is not merged with an image + text one. Nothing is written."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from gemma2_tune.cli import app
    from gemma2_tune.models.builtin import builtin_path

    if second == "projector":
        second = str(tmp_path / "trained-projector")
        shutil.copytree(builtin_path(first), second)
        weights = load_file(f"{second}/model.safetensors")
        name = next(k for k in weights if "multi_modal_projector" in k or "embed_vision" in k)
        weights[name] = weights[name] + 0.01
        save_file(weights, f"{second}/model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["merge-models", first, second, "-o", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    flat = " ".join(r.output.split())
    if second.endswith("trained-projector"):
        assert "every input must have the same towers" in flat and "model.train_projector" in flat, flat
        differ = f"tower tensors differ from --models[1] {first}'s (e.g. {name})"
        assert f"--models[2] {second}: 1 of its " in flat and differ in flat, flat
    else:
        assert f"--models[2] {second} is Gemma 3 (image + text), --models[1] {first} is Gemma 2" in flat, flat
    assert not out.exists() and not list(tmp_path.glob(".out*"))

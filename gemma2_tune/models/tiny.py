"""Tiny random models of each family (`builtin:tiny-gemma2`, `builtin:tiny-gemma3`, `builtin:tiny-gemma3-vision`,
`builtin:tiny-gemma4`): the CPU quickstart and the tests.

Each is the family's real architecture at toy size (its `Family.tiny_config`: Gemma 2's alternating
sliding/global layers and soft-caps 50/30; Gemma 3's local:global pattern and QK-norm; Gemma 3's and Gemma 4's
image + text classes with toy towers, Gemma 4's wider global layers, KV-shared layers, per-layer embeddings and
final soft-cap 30) with a byte-level BPE tokenizer trained here on the shipped chats and carrying Gemma's special
tokens. It is saved as an ordinary checkpoint folder and then loaded through the same code path as google/gemma-*:
nothing downstream knows it is tiny. It has random weights and learns only what a few steps teach it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..families import GEMMA2, Family

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's order
# The placeholder tokens of a multimodal family's images (and audio), by the config key that holds their id, as
# the published tokenizers spell them (Gemma3Config, Gemma4Config). The tiny tokenizers carry them after
# SPECIAL_TOKENS: their published ids (255,999 and up) lie far beyond a tiny vocabulary.
TOWER_TOKENS = {
    "gemma3-vision": {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                      "image_token_index": "<image_soft_token>"},
    "gemma4": {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
               "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>", "audio_token_id": "<|audio|>",
               "video_token_id": "<|video|>"},
}


def gemma4_special_tokens() -> list[str]:
    """Gemma 4's special tokens at their published ids (families/gemma4_format.py): index = id, for every id
    below the turn markers' (106); the ids between are reserved placeholders (<unused...>). The media tokens (ids
    255999-258884) do not fit a tiny vocabulary and are left out."""
    from ..families.gemma4_format import SPECIAL_TOKEN_IDS

    by_id = {i: t for t, i in SPECIAL_TOKEN_IDS.items()}
    last = max(i for i in by_id if i < 1000)
    return [by_id.get(i, f"<unused{i}>") for i in range(last + 1)]


def special_tokens(family: Family) -> list[str]:
    """The tiny tokenizer's special tokens, in id order: Gemma 2/3's six, or Gemma 4's at their published ids."""
    return gemma4_special_tokens() if family.turn_format == "gemma4" else SPECIAL_TOKENS


def training_corpus(family: Family = GEMMA2) -> list[str]:
    """Text of the shipped chats, rendered the way training will see it (in `family`'s turn format)."""
    from ..config.schema import DataSection
    from ..data.sources import load_rows, row_to_messages
    from ..data.turns import normalise, render

    rows, _ = load_rows(DataSection(dataset="quickstart"))
    texts = []
    for row in rows:
        try:
            texts.append(render(normalise(row_to_messages(row.data, family=family), "fold", family=family),
                                family=family).text)
        except ValueError:
            continue
    return texts


def build_tokenizer(vocab_size: int = 1024, family: Family = GEMMA2):
    """A fast byte-level BPE tokenizer with the family's special tokens (`special_tokens`: each one token, Gemma 4's
    at their published ids) and its chat template, adding <bos> to what it encodes (add_special_tokens=True, the
    default) as Gemma's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(family)
    specials += [t for t in TOWER_TOKENS.get(family.key, {}).values() if t not in specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(family), trainer=trainer)
    # Every real Gemma tokenizer adds <bos> itself (tokenizer.json's post-processor), and code that forgets
    # add_special_tokens=False gets two; the tiny ones do the same, so tests see what real runs would.
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", bos)])
    from ..data.template import chat_template

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in specials if t not in ("<pad>", "<eos>", "<bos>", "<unk>")],
        chat_template=chat_template(family),
        padding_side="right",
        **named_image_tokens(family),
    )


def named_image_tokens(family: Family) -> dict[str, str]:
    """The image markers a multimodal family's published tokenizer names (tokenizer_config.json: boi_token,
    eoi_token, image_token), which its processor reads; {} for a text family."""
    if family.images is None:
        return {}
    return {"boi_token": family.images.begin, "eoi_token": family.images.end, "image_token": family.images.soft_token}


# The tiny processors: the published image processors' settings (google/gemma-3-4b-it preprocessor_config.json:
# 896 x 896, bilinear, mean = std = 0.5; google/gemma-4-E2B-it processor_config.json: 16-pixel patches pooled
# 3 x 3, up to 280 soft tokens, pixels in [0, 1]) at the tiny towers' size.
TINY_IMAGE_PROCESSORS = {
    "Gemma3Processor": dict(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                            resample=2),
    "Gemma4Processor": dict(patch_size=8, pooling_kernel_size=2, max_soft_tokens=70),  # 70: the smallest allowed
}


def save_tiny_processor(family: Family, tokenizer, config, folder: Path) -> None:
    """Write the image processor of a tiny image + text model as the published checkpoints ship it
    (processor_config.json: the image processor's settings, soft tokens per image, the processor class)."""
    from transformers import AutoImageProcessor  # noqa: F401 - the Pillow processors register through it

    name = family.images.processor_class
    if name == "Gemma3Processor":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        image_processor = Gemma3ImageProcessorPil(**TINY_IMAGE_PROCESSORS[name])
        Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                        image_seq_length=config.mm_tokens_per_image).save_pretrained(folder)
        return
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    # Gemma4Processor itself cannot be built without torchvision (its video processor); its file is written as it
    # writes it: the image processor's settings under "image_processor"
    image_processor = Gemma4ImageProcessorPil(**TINY_IMAGE_PROCESSORS[name])
    settings = json.loads(image_processor.to_json_string())
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": settings, "image_seq_length": image_processor.max_soft_tokens,
         "processor_class": name}, indent=2) + "\n")


def _random_projector(model, family: Family, std: float) -> None:
    """transformers starts Gemma 3's projection at zero (a checkpoint brings its trained one): the tiny decoder would
    see every image as zeros. Random (normal, `std`), as a trained projector is not zero; a text family: nothing."""
    import torch

    if family.images is None:
        return
    with torch.no_grad():
        for param in model.get_submodule(family.images.projector).parameters():
            if param.dim() > 1 and not param.detach().abs().sum():
                torch.nn.init.normal_(param, std=std)


def build_tiny(family: Family, path: Path) -> Path:
    """Build tokenizer + random `family` model into `path` atomically (a half-built folder is never used). A
    multimodal family's model is its image + text class (Gemma3ForConditionalGeneration, ...), towers included."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..files import COMPLETE, staged_dir

    tokenizer = build_tokenizer(family=family)
    from .serving import stop_ids

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>", *TOWER_TOKENS.get(family.key, {}).values())}
    decoder = dict(vocab_size=len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=stop_ids(tokenizer),
                   bos_token_id=ids["<bos>"])
    tiny = dict(family.tiny_config)
    composite = "text_config" in tiny
    if composite:  # the vocabulary and token ids are the decoder's; the towers' placeholders the composite's
        tiny["text_config"] = tiny["text_config"] | decoder
        if tiny["text_config"].get("hidden_size_per_layer_input"):
            # Gemma 4's per-layer embeddings cover the vocabulary, as in the published configs (262,144 both);
            # Gemma4TextConfig's default would give the tiny model a 262,144-row table
            tiny["text_config"]["vocab_size_per_layer_input"] = decoder["vocab_size"]
        tiny |= {key: ids[token] for key, token in TOWER_TOKENS.get(family.key, {}).items()}
        config = getattr(transformers, family.config_class)(**tiny)
    else:
        config = getattr(transformers, family.config_class)(**decoder, **tiny)
    torch.manual_seed(0)
    model = (AutoModelForImageTextToText if composite else AutoModelForCausalLM).from_config(config)
    _random_projector(model, family, tiny.get("initializer_range", 0.02))
    model.generation_config.eos_token_id = decoder["eos_token_id"]
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = ids["<pad>"], ids["<bos>"]
    # an earlier interrupted build (no marker) is replaced; another process's finished one is kept
    with staged_dir(path, is_stale=lambda p: not (p / COMPLETE).is_file()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if family.images is not None:
            save_tiny_processor(family, tokenizer, config, tmp)
        (tmp / COMPLETE).write_text(json.dumps({"builtin": family.tiny_name, "family": family.key}))
    return path


def build_tiny_sentencepiece(family: Family, path: Path, **config) -> Path:
    """A tiny random `family` model whose tokenizer is SentencePiece BPE like Gemma's (byte fallback, no dummy
    prefix, digits split, turn markers as user-defined symbols, <pad> <eos> <bos> <unk> = 0 1 2 3, <bos> added to
    what it encodes), trained here on the shipped chats and saved as Gemma's are: tokenizer.model with its fast
    conversion (tokenizer.json: BPE with byte fallback, as llama.cpp's Gemma 4 converter requires). What llama.cpp's
    converters need (its Gemma 2 reads tokenizer.model only; its Gemma 4 reads tokenizer.json as a Llama-style BPE
    and refuses a byte-level one such as `build_tokenizer`'s), so exports are tested on it. Gemma 4's special
    tokens sit at their published ids (`special_tokens`), its tower placeholders after them, and its model is the
    image + text class with the tiny towers, as `build_tiny` builds it. Queries are scaled by head_dim as in Gemma 2
    2B/9B and Gemma 3 (llama.cpp assumes it). `config`: settings over the family's tiny shape (its decoder's, for
    an image + text family). Needs `sentencepiece`; writes `path` (must not exist) with a build marker saying it is
    a random tiny model (no Gemma weights, so no Gemma terms)."""
    import io

    import sentencepiece as spm
    import torch
    import transformers

    from ..data.template import chat_template
    from ..files import COMPLETE
    from .serving import stop_ids

    path.mkdir(parents=True)
    model_proto = io.BytesIO()
    gemma4 = family.turn_format == "gemma4"
    # <pad> <eos> <bos> <unk> are SentencePiece's own pieces (ids 0-3); the user-defined symbols follow in order,
    # so Gemma 4's list from id 4 puts each of its markers at its published id
    symbols = special_tokens(family)[4:] if gemma4 else ["<start_of_turn>", "<end_of_turn>"]
    symbols += [t for t in TOWER_TOKENS.get(family.key, {}).values() if t not in symbols]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("<bos>", "") for t in training_corpus(family)]), model_writer=model_proto,
        vocab_size=640 if gemma4 else 400, model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=symbols, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
    (path / "tokenizer.model").write_bytes(model_proto.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
        | ({"additional_special_tokens": symbols} if gemma4 else {}) | named_image_tokens(family)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)  # converted from tokenizer.model
    tokenizer.chat_template = chat_template(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>")}
    eos = stop_ids(tokenizer)  # <eos> <end_of_turn>, or Gemma 4's three
    shape = {"query_pre_attn_scalar": family.tiny_config.get("head_dim")} | family.tiny_config
    decoder = dict(vocab_size=len(tokenizer), pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=eos)
    if "text_config" in shape:  # an image + text family: the decoder's shape and vocabulary, the towers' tokens
        text = {k: v for k, v in shape["text_config"].items()} | decoder | config
        if text.get("hidden_size_per_layer_input"):
            text["vocab_size_per_layer_input"] = decoder["vocab_size"]  # as build_tiny: the table covers the vocabulary
        shape = {k: v for k, v in shape.items() if k != "query_pre_attn_scalar"} | {"text_config": text}
        shape |= {key: tokenizer.convert_tokens_to_ids(token) for key, token in TOWER_TOKENS.get(family.key, {}).items()}
        model_config = getattr(transformers, family.config_class)(**shape)
        model_class = transformers.AutoModelForImageTextToText
    else:
        model_config = getattr(transformers, family.config_class)(**decoder, **(shape | config))
        model_class = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = model_class.from_config(model_config)
    _random_projector(model, family, family.tiny_config.get("initializer_range", 0.02))
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if family.images is not None:
        save_tiny_processor(family, tokenizer, model_config, path)
    (path / COMPLETE).write_text(json.dumps({"builtin": f"builtin:tiny-{family.key}-spm", "family": family.key}))
    return path

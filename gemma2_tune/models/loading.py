"""The one way a model is loaded, for training, chat, merge and eval: family, kernel, quantization,
then the after-load checks.

    request = LoadRequest.for_run(cfg)                 # training: the config's kernel, dtype, 4-bit
    request = LoadRequest(name, quantization="4bit")   # chat / eval / merge's self-check
    model, report = load_model(request)                # checked; report goes into manifests

Before any weights load, the checkpoint's config.json says its family (unsupported ones are refused
with a message) and the kernel is checked against it. After loading, the kernel actually in use, the
soft-caps, the towers and the dtype are checked (models/checks.py).

An image + text checkpoint (Gemma 3 4B/12B/27B, Gemma 4) loads with its own class (AutoModelForCausalLM maps
model_type gemma3 to Gemma3ForConditionalGeneration, gemma4 to Gemma4ForConditionalGeneration, ...), so runs,
checkpoints and merged folders keep its towers and still take images. 4-bit loading leaves the towers
unquantized (they are frozen and small next to the decoder: 0.2-0.6B parameters; quantizing an image encoder
changes what the decoder sees, for no memory that matters); training freezes them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.turns import BOS, END, START
from ..errors import UserError
from ..families import Family, family_of_checkpoint, family_of_model_type, unsupported_message
from ..families.gemma4_format import TURN_END as GEMMA4_TURN_END
from ..families.gemma4_format import TURN_START as GEMMA4_TURN_START
from .builtin import builtin_path, is_builtin
from .checks import (
    ModelReport,
    check_kernel_request,
    check_loaded,
    freeze_towers,
    keep_4bit_layout_trainable,
    softcaps,
    text_config,
)
from .quantization import Bits, bnb_config, torch_dtype
from .tokenizer_files import attach_sentencepiece

if TYPE_CHECKING:
    from ..config.schema import RunConfig


def model_location(name_or_path: str) -> str:
    """Where transformers loads from: a builtin's local folder (built on first use), else as given."""
    return str(builtin_path(name_or_path)) if is_builtin(name_or_path) else name_or_path


def _loading_hint(what: str, name: str, exc: Exception) -> str:
    local = is_builtin(name) or Path(name).expanduser().exists()
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = "local folder" if local else "Hugging Face Hub"
    return (
        f"model.name_or_path: could not load the {what} of '{name}' from the {where}: {first}\n"
        + ("" if local else "If you are offline or the model is gated, log in (`hf auth login`) and download it "
           "once, or pass a local checkpoint folder instead.")
    )


def checkpoint_family(name: str, revision: str | None = None, trust_remote_code: bool = False) -> tuple[Family, Any]:
    """The family of a checkpoint from its config (no weights), and that config.

    Raises UserError when the config can't be read (missing, offline, gated) or the model is not of a
    supported family.
    """
    from transformers import AutoConfig

    from ..config.rules import local_path_problem

    problem = local_path_problem(name)
    if problem:
        raise UserError(problem)
    try:
        config = AutoConfig.from_pretrained(model_location(name), revision=revision, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing, offline, gated: one clear message
        raise UserError(_loading_hint("config", name, exc)) from None
    family = family_of_model_type(config.model_type)
    if family is None:
        raise UserError(unsupported_message(name, config.model_type))
    return family, config


# The turn formats the renderer (data/turns.py, data/gemma4.py) and the templates generated from it write, and the
# markers a tokenizer of each must hold as single tokens.
TURN_MARKERS = {"gemma": (START, END), "gemma4": (GEMMA4_TURN_START, GEMMA4_TURN_END)}


def turn_format_problem(family: Family) -> str | None:
    """Why text can't be rendered for `family` (None: it can): a family whose turn format the renderer does not
    write is refused wherever text is tokenized, before any weights load."""
    if family.turn_format in TURN_MARKERS:
        return None
    return (f"{family.display} has its own turn format ({family.turn_format}), which this version's renderer does "
            "not write: training, chatting or exporting in another format would teach and expect the wrong one")


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   family: Family | None = None):
    """A fast Gemma tokenizer, checked (turn markers are single tokens), with the chat template it carries
    (callers give it the run's: data/template.py `use_run_template`) and its SentencePiece model recorded, when
    it has one (save it with tokenizer_files.save_tokenizer). `family`: the model's, when the caller knows it (else
    what the folder's config.json or the name says). Raises UserError, also for a family whose turn format the
    renderer does not write (`turn_format_problem`)."""
    from transformers import AutoTokenizer

    family = family or family_of_checkpoint(name_or_path)
    problem = turn_format_problem(family) if family is not None else None
    if problem:
        raise UserError(f"model.name_or_path: '{name_or_path}': {problem}")
    location = model_location(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing, offline, gated: one clear message
        raise UserError(_loading_hint("tokenizer", name_or_path, exc)) from None
    check_tokenizer(tokenizer, name_or_path, family)
    attach_sentencepiece(tokenizer, location, revision)  # saved with every folder we write (tokenizer_files.py)
    return tokenizer


def check_tokenizer(tokenizer: Any, name: str, family: Family | None = None) -> None:
    """A fast tokenizer in which the family's turn markers (Gemma 2/3's without a family) and <bos> are single
    tokens. Raises UserError."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{name}: a fast tokenizer (tokenizer.json) is needed to map supervised spans to tokens")
    markers = TURN_MARKERS.get(family.turn_format if family is not None else "gemma", TURN_MARKERS["gemma"])
    for marker in (*markers, tokenizer.bos_token or BOS):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(
                f"{name}: the tokenizer splits {marker} into {len(ids)} tokens; this is not a Gemma tokenizer"
            )


def load_image_processing(name_or_path: str, family: Family, tokenizer, *, pan_and_scan: bool = False,
                          revision: str | None = None, config_from: str | None = None):
    """The checkpoint's image processor and its image tokens (data/images.py ImageProcessing), or None when the
    family takes no images or the checkpoint ships no image processor (processor_config.json or
    preprocessor_config.json). Its image processor is transformers' Pillow one (no torchvision); Gemma 3's soft
    tokens per image come from processor_config.json (else config.json's mm_tokens_per_image).

    Raises UserError when the tokenizer lacks an image marker as a single token, or its soft token's id is not the
    one config.json's image token id says (the model would put image features elsewhere), or pan-and-scan is asked
    of a processor that has none. `config_from`: where config.json is when `name_or_path` has none (a LoRA run
    folder: its base)."""
    from ..data.images import PAN_AND_SCAN_DEFAULTS, ImageProcessing

    if family.images is None:
        return None
    facts = family.images
    location = model_location(name_or_path)
    from transformers import AutoConfig, AutoImageProcessor

    try:
        image_processor = AutoImageProcessor.from_pretrained(location, revision=revision)
    except OSError:  # no processor files: a checkpoint that can only be trained on text
        return None
    config = AutoConfig.from_pretrained(model_location(config_from) if config_from else location, revision=revision)
    ids = {}
    for role, token in (("begin", facts.begin), ("soft", facts.soft_token), ("end", facts.end)):
        found = tokenizer.encode(token, add_special_tokens=False)
        if len(found) != 1:
            raise UserError(f"model.name_or_path: '{name_or_path}': the tokenizer splits the image marker {token} into "
                            f"{len(found)} tokens; it is not this {family.display} checkpoint's tokenizer")
        ids[role] = found[0]
    expected = getattr(config, "image_token_id", None)
    if expected is not None and expected != ids["soft"]:
        raise UserError(f"model.name_or_path: '{name_or_path}': the tokenizer's {facts.soft_token} is id {ids['soft']} "
                        f"but config.json's {facts.soft_token_config_key} is {expected}: image features would be put "
                        "in the wrong places")
    options: dict[str, Any] = {}
    seq_length = 0
    if facts.processor_class == "Gemma3Processor":
        try:
            import json

            saved = json.loads((Path(location) / "processor_config.json").read_text())
        except (OSError, ValueError):
            saved = {}
        seq_length = saved.get("image_seq_length") or getattr(config, "mm_tokens_per_image", None) or 256
        options["do_pan_and_scan"] = pan_and_scan
        if pan_and_scan:
            options |= {k: getattr(image_processor, k, None) or v for k, v in PAN_AND_SCAN_DEFAULTS.items()}
    elif pan_and_scan:
        raise UserError(f"data.pan_and_scan: {family.display}'s processor has no pan-and-scan (it resizes each image "
                        "keeping its aspect ratio instead); it is Gemma 3's")
    return ImageProcessing(family, image_processor, ids, seq_length, pan_and_scan, options)


@dataclass(frozen=True)
class LoadRequest:
    """What to load and how. `training` keeps the model as training needs it (no KV cache, 4-bit layout
    trainable); otherwise the model is put in eval mode."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "bfloat16"
    attn_implementation: str = "eager"
    quantization: Bits | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    quant_storage: str | None = None
    device_map: Any = "auto"  # "auto": an inference load goes to GPU 0 when there is one; None: no placement
    training: bool = False
    # "causal-lm": next-token logits; "sequence-classification": one score per sequence (reward models), read at
    # the last non-padding token by a `score` linear layer (new and random when the checkpoint has none)
    head: str = "causal-lm"
    train_projector: bool = False  # training: the image projector stays trainable (model.train_projector)

    @classmethod
    def for_run(cls, cfg: RunConfig, device_map: Any = None) -> LoadRequest:
        """The model a training run's config describes: its base (cfg.base_model: the base of a run it continues,
        whose adapter the runner puts on it)."""
        q = cfg.quantization
        return cls(cfg.base_model, cfg.model.revision, cfg.model.trust_remote_code, cfg.model.dtype,
                   cfg.model.attn_implementation, "4bit" if q.load_in_4bit else None, q.quant_type,
                   q.double_quant, cfg.compute_dtype, cfg.quant_storage, device_map, training=True, head=cfg.head,
                   train_projector=cfg.model.train_projector)

    def bnb(self, family: Family | None = None):
        """The BitsAndBytesConfig this request asks for (None: unquantized). A score head stays unquantized: it is
        trained whole (PEFT's modules_to_save) and is one row of weights. `family`'s towers stay unquantized too
        (with lm_head, which transformers skips by default and a skip list would otherwise replace)."""
        config = bnb_config(self.quantization, self.dtype, self.quant_type, self.double_quant, self.compute_dtype,
                            self.quant_storage)
        if config is not None and self.head == "sequence-classification":
            config.llm_int8_skip_modules = ["score"]
        elif config is not None and family is not None and family.towers:
            config.llm_int8_skip_modules = ["lm_head", *family.towers]
        return config


@contextlib.contextmanager
def quiet_transformers(enabled: bool = True):
    """transformers' warnings (its load report of missing weights) silenced inside the block when `enabled`."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if enabled:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_model(request: LoadRequest):
    """Load and check; -> (model, ModelReport). LoRA is applied later (by the trainer, or PEFT for a run).

    Raises UserError: unsupported family, kernel not allowed or not installed, weights that can't be
    loaded, or a loaded model contradicting what was asked (see models/checks.py).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..config.rules import reward_base_problem, reward_model_refusal, sequence_classifier

    family, config = checkpoint_family(request.name_or_path, request.revision, request.trust_remote_code)
    architectures = getattr(config, "architectures", None)
    if request.head == "causal-lm" and sequence_classifier(architectures):  # a reward model: its head is not an LM's
        raise UserError(reward_model_refusal("model.name_or_path", request.name_or_path,
                                             f"a sequence classifier ({architectures[0]})"))
    headless = reward_base_problem(request.name_or_path, family) if request.head == "sequence-classification" else None
    if headless:
        raise UserError(f"model.name_or_path: {headless}")
    check_kernel_request(family, request.attn_implementation, request.training)
    location = model_location(request.name_or_path)
    quant = request.bnb(family)
    device_map = request.device_map
    if device_map == "auto":
        device_map = {"": 0} if torch.cuda.is_available() and not request.training else None
    auto, head_kwargs = AutoModelForCausalLM, {}
    if request.head == "sequence-classification":
        auto, head_kwargs = AutoModelForSequenceClassification, {"num_labels": 1}
    # a reward run's base loaded to take its adapter, which brings the score head: "newly initialized" is noise
    brings_head = request.head == "sequence-classification" and not request.training and not sequence_classifier(
        architectures)
    try:
        with quiet_transformers(brings_head):
            model = auto.from_pretrained(
                location,
                **head_kwargs,
                revision=request.revision,
                trust_remote_code=request.trust_remote_code,
                attn_implementation=request.attn_implementation,
                dtype=torch_dtype(request.dtype),
                quantization_config=quant,
                device_map=device_map,
            )
    except Exception as exc:  # noqa: BLE001
        raise UserError(_loading_hint("weights", request.name_or_path, exc)) from None
    decoder = text_config(model.config)
    if request.training:
        # training; the cache also breaks per-row masking of packed rows
        model.config.use_cache = decoder.use_cache = False
        keep_4bit_layout_trainable(model)
        freeze_towers(model, family, request.train_projector)  # the decoder trains; for full fine-tuning too
    else:
        model.eval()
    found = check_loaded(model, family, request.attn_implementation, request.dtype)
    attn_cap, final_cap = softcaps(model.config)
    report = ModelReport(
        name_or_path=request.name_or_path,
        location=location,
        family=family.key,
        attn_implementation=model.config._attn_implementation,
        attention_softcap=attn_cap,
        final_softcap=final_cap,
        layer_types=list(getattr(decoder, "layer_types", []) or []),
        hidden_size=decoder.hidden_size,
        num_layers=decoder.num_hidden_layers,
        load_dtype=request.dtype,
        quantization=quant.to_dict() if quant is not None else None,
        warnings=found,
    )
    return model, report

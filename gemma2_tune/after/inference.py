"""Using a trained run: find its base model, load base + adapter, and talk to it in Gemma's format.

Shared by `chat`, `merge` and `eval`. The run's own resolved config (config.yaml) says which base
model, attention kernel and system-message policy it was trained with; `--model` overrides the base.
Models load through the one loading path (gemma2_tune.models.loading), with its checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from ..config.schema import RunConfig
from ..config.methods import saved_schema
from ..data.gemma4 import split_answer, writes_empty_thought
from ..data.template import use_run_template
from ..data.turns import normalise, render
from ..errors import UserError
from ..families import Family

LoadIn = Literal["auto", "bf16", "fp32", "8bit", "4bit", "as-trained"]
LOAD_IN = ("auto", "bf16", "fp32", "8bit", "4bit")  # what users choose; "as-trained" is merge's


@dataclass
class TrainedRun:
    """What --adapter/--model point at: a run folder (adapter or full fine-tune) or a plain checkpoint."""

    path: Path
    base_model: str
    system_policy: str
    is_adapter: bool  # False: a full fine-tune (the folder is the model)
    config: RunConfig | None

    @property
    def attn_implementation(self) -> str:
        """The kernel the run trained with (eager for a plain checkpoint)."""
        return self.config.model.attn_implementation if self.config else "eager"

    @property
    def head(self) -> str:
        """"sequence-classification" for a reward model (a reward run, its merge or any one-score classifier), else
        "causal-lm"."""
        from ..config.rules import reward_model_kind

        if self.config is not None:
            return self.config.head
        return "sequence-classification" if reward_model_kind(str(self.path)) else "causal-lm"

    def require_generating(self, key: str) -> None:
        """Raises UserError naming `key` when this is a reward model: it scores answers and generates nothing."""
        from ..config.rules import reward_model_kind, reward_model_refusal

        if self.head != "causal-lm":
            kind = reward_model_kind(str(self.path)) or "a `gemma2-tune reward` run"
            raise UserError(reward_model_refusal(key, str(self.path), kind))

    @property
    def enable_thinking(self) -> bool:
        """Gemma 4: the run rendered its rows with thinking on (data.enable_thinking); chat and eval's default."""
        return bool(self.config and self.config.data.enable_thinking)

    @property
    def dtype(self) -> str:
        """The precision the run trained in; for a model folder (a merge, a full fine-tune), its config.json's;
        else bfloat16."""
        if self.config:
            return self.config.model.dtype
        try:
            saved = json.loads((Path(self.base_model) / "config.json").read_text())
        except (OSError, ValueError):
            return "bfloat16"
        value = saved.get("dtype") or saved.get("torch_dtype")
        return value if value in ("bfloat16", "float16", "float32") else "bfloat16"


@dataclass
class Loaded:
    """A model ready to generate or score, its tokenizer and family, and the load report."""

    model: Any
    tokenizer: Any
    family: Family
    report: Any
    empty_thought: bool = False  # Gemma 4 12B/26B-A4B/31B: the generation prompt writes an empty thought block
    thinking: bool = False  # Gemma 4: conversations rendered with thinking on (enable_thinking)
    images: Any = None  # the image processor the run trained with (data/images.py ImageProcessing); None: text only


def read_run(adapter: str | None, model: str | None, key: str = "--adapter") -> TrainedRun:
    """What --adapter/--model point at (`key`: the option named in messages). Raises UserError when the folder
    is not a run, an adapter or a model folder."""
    if adapter is None:
        if model is None:
            raise UserError("give --model (a Gemma 2 or Gemma 3 text checkpoint) and/or --adapter (a gemma2-tune "
                            "run folder)")
        path = Path(model).expanduser()
        if path.is_dir() and (path / "config.json").is_file():  # a full fine-tune's run folder, a merge: its config
            cfg = saved_config(path)
            return TrainedRun(path, model, saved_policy(path, cfg) or "fold", False, cfg)
        return TrainedRun(Path(model), model, "fold", False, None)
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise UserError(f"{key} {adapter}: no such folder")
    from ..config.runs import adapter_run, saved_weights, unfinished_run

    cfg = saved_config(path)
    policy = saved_policy(path, cfg) or "fold"
    weights = saved_weights(path)
    if weights == "adapter":
        try:  # the one reader of a run's base (through the runs it continued: a dpo run's sft run)
            start = adapter_run(str(path))
        except ValueError as exc:
            if not model:
                raise UserError(f"{key} {exc}; pass --model") from None
            start = None
        trained = start.base if start else None
        base = model or trained
        if model and trained:
            from ..families import family_of_checkpoint

            given, own = family_of_checkpoint(model), family_of_checkpoint(trained)
            if given and own and given.key != own.key:
                raise UserError(f"--model {model}: a {given.display} model, but {key} {adapter} was trained on "
                                f"{trained} ({own.display}): an adapter fits its own family's base only")
        return TrainedRun(path, base, policy, True, cfg)
    if weights == "model":  # full fine-tune or merged output
        return TrainedRun(path, str(path), policy, False, cfg)
    unfinished = unfinished_run(str(path))
    if unfinished:
        raise UserError(f"{key} {adapter}: {unfinished}")
    raise UserError(f"{key} {adapter}: not an adapter folder (no adapter_config.json + adapter_model.safetensors) "
                    "and not a model folder (no config.json + *.safetensors)")


def saved_config(path: Path) -> RunConfig | None:
    """The resolved config a run folder (or its ema/) saved as config.yaml, in its method's schema (runs saved
    before `method:` included); a checkpoint-N/ folder's is its run's (a resume keeps the config); None when there is
    none or it is from another version."""
    source = path / "config.yaml"
    if not source.is_file() and path.name.startswith("checkpoint-"):
        source = path.parent / "config.yaml"
    if not source.is_file():
        return None
    try:
        saved = yaml.safe_load(source.read_text())
        schema = saved_schema(saved)
        return schema.model_validate(saved) if schema else None
    except Exception:  # noqa: BLE001 - a config from another version: the folder's other files still say enough
        return None


def saved_policy(path: Path, cfg: RunConfig | None) -> str | None:
    """The system policy a folder's template was generated for: its run config's, else its merge.json's (a
    merged folder); None when neither says."""
    if cfg is not None:
        return cfg.data.system_policy
    try:
        return json.loads((path / "merge.json").read_text()).get("system_policy")
    except (OSError, ValueError):
        return None


def load(run: TrainedRun, load_in: LoadIn = "auto", dtype: str | None = None) -> Loaded:
    """Base (+ adapter) through the one loading path, in eval mode.

    load_in: "auto" unquantized in the run's precision (model.dtype; bfloat16 without a run config),
    "bf16"/"fp32" unquantized in that precision, "8bit"/"4bit" quantized (computing in the run's precision),
    "as-trained" exactly as the run trained it (its 4-bit settings, its dtype). `dtype` overrides the
    precision. Raises UserError: a base that doesn't fit the adapter, an unsupported model, anything
    load_model refuses."""
    import dataclasses

    from ..models.loading import LoadRequest, checkpoint_family, load_model, load_tokenizer

    family, _ = checkpoint_family(run.base_model)
    tokenizer = load_tokenizer(str(run.path) if (run.path / "tokenizer.json").is_file() else run.base_model,
                               family=family)
    unsupported = run.config.data.unsupported_fields if run.config else "bad_row"
    empty_thought = writes_empty_thought(family, run.base_model)
    # what generation renders, whatever was saved
    use_run_template(tokenizer, family, run.system_policy, unsupported, empty_thought=empty_thought)
    trained_dtype = run.dtype
    if load_in == "as-trained" and run.config is not None:
        request = dataclasses.replace(LoadRequest.for_run(run.config), name_or_path=run.base_model, training=False,
                                      device_map="auto")
    else:
        dtype = dtype or {"bf16": "bfloat16", "fp32": "float32"}.get(load_in, trained_dtype)
        bits = load_in if load_in in ("8bit", "4bit") else None
        request = LoadRequest(run.base_model, dtype=dtype, attn_implementation=run.attn_implementation,
                              quantization=bits, head=run.head)
    model, report = load_model(request)
    if run.is_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(run.path))
        except (RuntimeError, ValueError, KeyError) as exc:
            trained_on = run.config.model.name_or_path if run.config else "another model"
            raise UserError(f"--adapter {run.path}: does not fit base model '{run.base_model}' (trained on "
                            f"'{trained_on}'): {str(exc).splitlines()[0][:300]}") from None
    model.eval()
    return Loaded(model, tokenizer, family, report, empty_thought, run.enable_thinking, run_images(run, family,
                                                                                                 tokenizer))


def run_images(run: TrainedRun, family: Family, tokenizer):
    """The image processor a run trained with: the one saved beside its weights (processor_config.json), else its
    base checkpoint's; with the run's data.pan_and_scan. None for a text family or a checkpoint without one."""
    from ..models.loading import load_image_processing

    if family.images is None:
        return None
    pan_and_scan = bool(run.config and getattr(run.config.data, "pan_and_scan", False))
    for source in (str(run.path), run.base_model):
        folder = Path(source)
        if source == run.base_model or (folder / "processor_config.json").is_file() or (
                folder / "preprocessor_config.json").is_file():
            found = load_image_processing(source, family, tokenizer, pan_and_scan=pan_and_scan,
                                          config_from=None if (folder / "config.json").is_file() else run.base_model)
            if found is not None:
                return found
    return None


@dataclass
class Sampling:
    """Generation settings: greedy when temperature is 0; generation stops at the end of a turn or <eos>
    (models.serving.stop_ids)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        """Keyword arguments for model.generate: limits, stop tokens, sampling or greedy."""
        from ..models.serving import stop_ids

        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "eos_token_id": stop_ids(tokenizer),
                                  "pad_token_id": tokenizer.pad_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs


def prompt_inputs(messages: list[dict[str, Any]], loaded: Loaded, system_policy: str,
                  read_image: Callable | None = None) -> dict[str, Any]:
    """The conversation so far + the model's turn header, exactly as in training, as the model's inputs:
    input_ids (1, length); for an image + text model its token types (1, length) always, and with images their
    pixel values (and Gemma 4's image_position_ids), made by the run's image processor. `read_image` reads image
    parts (data/images.py ImageReader; None: they are refused). Raises BadRow when the conversation can't be
    rendered or an image can't be read."""
    from ..data.examples import TurnTokenizer

    family = loaded.family
    turns = normalise(messages, system_policy, allow_open_end=True, family=family, thinking=loaded.thinking,
                      images=read_image if loaded.images is not None else None)
    encoder = TurnTokenizer(loaded.tokenizer, family, loaded.thinking, loaded.empty_thought, loaded.images)
    rendered = render(turns, add_generation_prompt=True, family=family, thinking=loaded.thinking,
                      empty_thought=loaded.empty_thought)
    return encoder.model_inputs(rendered, turns)


def prompt_ids(messages: list[dict[str, str]], tokenizer, system_policy: str, family: Family, *,
               thinking: bool = False, empty_thought: bool = False, tools: Any = None):
    """The conversation so far + the model's turn header, exactly as in training: (1, length) ids. `thinking`,
    `empty_thought`, `tools` (OpenAI-style declarations): Gemma 4's (turns.render). Raises BadRow when the
    conversation can't be rendered."""
    options = {"family": family, "thinking": thinking}
    turns = normalise(messages, system_policy, allow_open_end=True, **options, **({"tools": tools} if tools else {}))
    text = render(turns, add_generation_prompt=True, empty_thought=empty_thought, **options).text
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def reply(loaded: Loaded, messages: list[dict[str, Any]], system_policy: str, sampling: Sampling,
          on_text: Callable[[str], None] | None = None, on_thought: Callable[[str], None] | None = None,
          read_image: Callable | None = None) -> str:
    """Generate the model's next turn; streams pieces to `on_text` when given. Stops at the end of its turn.
    A Gemma 4 model thinking (`loaded.thinking`) writes its thought first: it goes to `on_thought` (when given),
    and the answer is returned (not streamed). `read_image` reads the messages' image parts (prompt_inputs)."""
    import threading

    from transformers import TextIteratorStreamer

    from ..models.serving import generated_text

    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = prompt_inputs(messages, loaded, system_policy, read_image)
    inputs = {k: v.to(model.device) if k != "pixel_values" else v.to(model.device, model.dtype)
              for k, v in inputs.items()}
    ids = inputs["input_ids"]
    kwargs = sampling.generate_kwargs(tokenizer) | inputs | {"use_cache": True}
    if loaded.thinking:  # the thought is cut out of the text with its markers, so the text keeps them
        out = model.generate(**kwargs)
        thought, answer = split_answer(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
        if thought is not None and on_thought is not None:
            on_thought(thought)
        return answer.strip()
    if on_text is None:
        out = model.generate(**kwargs)
        return generated_text(tokenizer, out[0, ids.shape[1]:]).strip()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs=kwargs | {"streamer": streamer})
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        on_text(piece)
    worker.join()
    return "".join(pieces).strip()


def thinking_for(given: bool | None, run: TrainedRun, family) -> bool:
    """--enable-thinking, else the run's data.enable_thinking. Raises UserError for a family without thinking."""
    if given and family.turn_format != "gemma4":
        raise UserError(f"--enable-thinking: {family.display} has no thinking mode (Gemma 4 has)")
    return run.enable_thinking if given is None else given

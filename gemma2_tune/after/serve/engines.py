"""The two ways `serve` runs generation, behind one interface: a request's prompt ids and settings in, a queue of
text pieces out, and a cancel that stops the work the request still holds.

- `SequentialEngine`: `model.generate` on one inference thread, one request at a time. Every OpenAI parameter the
  server accepts is honoured (stop strings, logit bias, frequency penalty, a per-request seed).
- `BatchingEngine`: transformers' continuous batching (`model.init_continuous_batching`, paged KV cache):
  concurrent requests share the forward passes. Per request: the prompt, `max_tokens`, the stop tokens and
  temperature / top_p / greedy; stop strings, logit bias, penalties and seeds are not available (the server
  refuses them in this mode). Gemma 2's attention soft-cap is kept by `softcapped_paged_attention`.

Both stop at the folder's stop tokens (`<end_of_turn>`; Gemma 4: <turn|>, <|tool_response>); a request cannot
change them. Images (an image + text model's pixel values, token types) go through `generate` only: continuous
batching schedules token ids. The text a request gets is `generated_text` of its tokens, the same as `chat` shows for
the same tokens (`TextPieces`); a Gemma 4 engine (`raw`) sends the text with its special tokens, which replies.py
splits into the thought, the text and the tool calls.

This is the one module that uses transformers below its documented `generate`/`from_pretrained` surface
(continuous batching's manager and config, the paged attention registry): `internals_problem` checks every such
name and signature at start, so a release that moved them is named instead of failing mid-request.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import queue as queue_module
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Settings:
    """What one request asks of generation, already validated (the server's schema): lengths in tokens."""

    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    frequency_penalty: float | None = None


class Failed:
    """A queue item: generation raised; `message` says what (the client gets it in OpenAI's error shape)."""

    def __init__(self, message: str):
        self.message = message


@dataclass
class Generation:
    """One request's generation. `queue` yields text pieces (str), then `None` when done or a `Failed`.
    `tokens` counts generated tokens; `last_token` is the last one (finish_reason: a stop token or the limit)."""

    queue: asyncio.Queue
    cancel: Any  # () -> None: stop generating for this request (safe to call twice, or after the end)
    counter: Any  # the streamer: .total_tokens, .last_token

    @property
    def tokens(self) -> int:
        return self.counter.total_tokens

    @property
    def last_token(self) -> int | None:
        return self.counter.last_token


def generation_stop_ids(generation_config) -> list[int]:
    """The folder's stop tokens as a list of ids (generation_config.eos_token_id is an int or a list)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class SequentialEngine:
    """`model.generate` for one request at a time, on one thread (torch state stays on one thread)."""

    name = "sequential"

    def __init__(self, model, tokenizer, raw: bool = False):
        self.model, self.tokenizer, self.raw = model, tokenizer, raw
        self.jobs: queue_module.Queue = queue_module.Queue()
        # One thread runs every generate call: torch.compile's CUDA graphs keep thread-local state.
        threading.Thread(target=self._work, name="gemma2-tune-generate", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            job()
            del job  # the closure holds the request's tensors: drop them before waiting for the next one

    def generation_config(self, settings: Settings):
        """The folder's generation config with the request's settings: stop tokens are the folder's, always."""
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = settings.max_new_tokens
        config.do_sample = settings.do_sample
        if settings.do_sample:
            config.temperature, config.top_p = settings.temperature, settings.top_p
        if settings.frequency_penalty:
            # transformers' multiplicative repetition penalty (CTRL), as transformers' own server maps it
            config.repetition_penalty = 1.0 + settings.frequency_penalty
        if settings.logit_bias:
            config.sequence_bias = {(token,): bias for token, bias in settings.logit_bias.items()}
        if settings.stop:
            config.stop_strings = settings.stop
        return config

    def start(self, ids: list[int], settings: Settings, inputs: dict | None = None) -> Generation:
        """Queue `ids` (the rendered prompt) for generation; must be called on the event loop. `inputs`: an image
        + text model's other inputs (token types; with images, pixel values), passed to `generate` as they are."""
        import torch

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = GenerateStreamer(TextPieces(self.tokenizer, self.raw), loop, queue)
        config = self.generation_config(settings)
        model, tokenizer = self.model, self.tokenizer

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)  # on the inference thread, just before this request samples
                extra = {k: v.to(model.device, model.dtype) if k == "pixel_values" else v.to(model.device)
                         for k, v in (inputs or {}).items()}
                model.generate(input_ids=torch.tensor([ids], device=model.device), generation_config=config,
                               streamer=streamer, tokenizer=tokenizer, **extra)
            except Cancelled:
                streamer.end()
            except Exception as exc:  # noqa: BLE001 - reported to this request's client; the thread serves on
                loop.call_soon_threadsafe(queue.put_nowait, Failed(f"{type(exc).__name__}: {str(exc)[:300]}"))

        self.jobs.put(run)
        return Generation(queue, streamer.cancel, streamer)

    def stop(self) -> None:
        pass  # the inference thread is a daemon


class Cancelled(Exception):
    """Raised inside `GenerateStreamer.put` to stop `model.generate` for a cancelled request."""


class TextPieces:
    """Generated token ids in, text pieces out; the pieces of one generation join to exactly
    `generated_text(tokenizer, ids)`. Each piece is emitted as soon as its characters are complete (tokenizers'
    DecodeStream, O(1) per token); bytes a token left incomplete (a multi-byte character cut by the token limit)
    come out at `finish` as U+FFFD, as `tokenizer.decode` writes them. `raw`: special tokens written out (each
    whole within one piece), for a format whose replies carry structure in them (Gemma 4)."""

    def __init__(self, tokenizer, raw: bool = False):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.raw = tokenizer, raw
        self.stream = DecodeStream(skip_special_tokens=not raw)
        self.ids: list[int] = []
        self.sent = ""
        self.total_tokens = 0
        self.last_token: int | None = None

    def step(self, token: int) -> str | None:
        """The text `token` completes (None: nothing yet)."""
        self.ids.append(token)
        self.total_tokens += 1
        self.last_token = token
        piece = self.stream.step(self.tokenizer._tokenizer, token)
        if piece:
            self.sent += piece
        return piece or None

    def finish(self) -> str | None:
        """What the decoded whole still has beyond the pieces sent (None: nothing)."""
        from ...models.serving import generated_text

        whole = (self.tokenizer.decode(self.ids, skip_special_tokens=False) if self.raw
                 else generated_text(self.tokenizer, self.ids))
        rest = whole[len(self.sent):] if whole.startswith(self.sent) else ""
        self.sent += rest
        return rest or None


class GenerateStreamer:
    """`model.generate`'s streamer protocol (`put` after each step, `end` once) feeding one request's queue from
    the inference thread. The first `put` is the prompt (skipped). `cancel` makes the next `put` raise."""

    def __init__(self, text: TextPieces, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.text, self.loop, self.queue = text, loop, queue
        self.prompt_seen = False
        self.cancelled = threading.Event()
        self.ended = False

    @property
    def total_tokens(self) -> int:
        return self.text.total_tokens

    @property
    def last_token(self) -> int | None:
        return self.text.last_token

    def _send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def put(self, value) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            piece = self.text.step(int(token))
            if piece:
                self._send(piece)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        rest = self.text.finish()
        if rest:
            self._send(rest)
        self._send(None)

    def cancel(self) -> None:
        self.cancelled.set()


class BatchingEngine:
    """transformers' continuous batching: one background loop schedules every request's tokens into shared
    forward passes over a paged KV cache. Sampling is per request through transformers' per-request logits
    processors: greedy is top_k=1 (the argmax; exact ties, which `generate` breaks by the lowest id, are
    sampled), sampled is the request's temperature and top_p over the whole vocabulary."""

    name = "continuous batching"

    CPU_CONTEXTS = 4  # on a CPU the cache holds this many full contexts (more requests when they are shorter)
    CPU_BATCH_TOKENS = 512  # and a forward pass takes at most this many tokens

    def __init__(self, model, tokenizer, context: int | None = None, raw: bool = False):
        from transformers import ContinuousBatchingConfig

        register_softcapped_paged_attention()
        self.model, self.tokenizer, self.raw = model, tokenizer, raw
        self.vocab = model.config.get_text_config().vocab_size
        self.eos = generation_stop_ids(model.generation_config)
        config = copy.deepcopy(model.generation_config)
        # Each of these values only makes transformers create the processor; every request passes its own.
        config.do_sample, config.temperature, config.top_k, config.top_p = True, 0.5, 1, 0.5
        config.max_new_tokens = 1
        cb = ContinuousBatchingConfig(per_request_processors=True, auto_switch_to_flash=False)
        if model.device.type == "cpu" and context:
            # transformers sizes the cache from 60% of the machine's RAM on a CPU: 11.7 GB (and minutes to
            # allocate) for the tiny test model; a few contexts' worth serves as well.
            cb.num_blocks = -(-self.CPU_CONTEXTS * context // cb.page_size)
            cb.max_batch_tokens = self.CPU_BATCH_TOKENS
        self.cb = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        self.cb.start()

    def start(self, ids: list[int], settings: Settings, inputs: dict | None = None) -> Generation:
        """Add `ids` to the running batch; must be called on the event loop. `inputs` may hold only token types
        (all zero without images: the causal mask batching builds anyway); pixel values are refused (the server's
        check answers 400 before)."""
        if any(k.startswith(("pixel", "image")) for k in inputs or {}):
            raise ValueError("continuous batching takes token ids only, not images")
        if self.cb.background_thread_status.fatal_error is not None:
            raise RuntimeError(f"the batching loop stopped: {self.cb.background_thread_status.fatal_error}")
        queue: asyncio.Queue = asyncio.Queue()
        request_id = f"req-{uuid.uuid4().hex}"
        streamer = BatchStreamer(TextPieces(self.tokenizer, self.raw), queue, lambda: self.cb.cancel_request(request_id))

        def on_output(output) -> None:  # called on the event loop
            try:
                streamer.put(output)
                if output.error is not None:
                    queue.put_nowait(Failed(str(output.error)[:300]))
                elif output.is_finished():
                    streamer.end()
            except Exception as exc:  # noqa: BLE001 - reported to this request's client
                queue.put_nowait(Failed(f"{type(exc).__name__}: {str(exc)[:300]}"))

        if settings.do_sample:
            kwargs = {"temperature": float(settings.temperature), "top_p": float(settings.top_p), "top_k": self.vocab}
        else:
            kwargs = {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        # registered before the request is added, so no output can arrive unhandled
        self.cb.register_result_handler(request_id, on_output)
        self.cb.add_request(list(ids), request_id=request_id, max_new_tokens=settings.max_new_tokens, streaming=True,
                            eos_token_id=self.eos, **kwargs)
        return Generation(queue, streamer.cancel, streamer)

    def stop(self) -> None:
        self.cb.stop(block=True, timeout=5)


class BatchStreamer:
    """One continuous-batching request's outputs (each carries every token generated so far) into its queue."""

    def __init__(self, text: TextPieces, queue: asyncio.Queue, cancel):
        self.text, self.queue, self.cancel = text, queue, cancel
        self.seen = 0

    @property
    def total_tokens(self) -> int:
        return self.text.total_tokens

    @property
    def last_token(self) -> int | None:
        return self.text.last_token

    def put(self, output) -> None:
        new = output.generated_tokens[self.seen:]
        self.seen = len(output.generated_tokens)
        for token in new:
            piece = self.text.step(int(token))
            if piece:
                self.queue.put_nowait(piece)

    def end(self) -> None:
        rest = self.text.finish()
        if rest:
            self.queue.put_nowait(rest)
        self.queue.put_nowait(None)


def softcapped_paged_attention(module, query, key, value, attention_mask, scaling: float, softcap=None,
                               **kwargs):
    """transformers' `paged|eager` attention (integrations/eager_paged.py) with Gemma 2's attention soft-cap
    applied as its eager attention applies it: scores * scaling -> softcap * tanh(scores / softcap) -> + mask.
    transformers' own paged functions drop `softcap`. query (B, H, Q, D), key/value (B, H_kv, K, D),
    attention_mask (Q, K) additive or None. Returns ((B, Q, H, D) output, (B, H, Q, K) weights). Without a
    soft-cap (Gemma 3, other models) it computes exactly what transformers' function computes."""
    import torch
    from transformers.integrations.eager_paged import eager_paged_attention_forward, repeat_kv

    if softcap is None or hasattr(module, "sinks"):
        return eager_paged_attention_forward(module, query, key, value, attention_mask, scaling, **kwargs)
    if hasattr(module, "num_key_value_groups"):
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register_softcapped_paged_attention() -> None:
    """Make `paged|eager` (the implementation continuous batching switches eager models to) the soft-capped one,
    through transformers' attention registry. Models without a soft-cap compute the same as before."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["paged|eager"] = softcapped_paged_attention


def load_for_serving(folder, *, dtype: str = "auto", device: str = "auto"):
    """The served folder's model, with its own class (config.json's `architectures`: a Gemma2ForCausalLM, or a
    multimodal checkpoint's conditional-generation class with its towers), eager attention (the soft-caps),
    `dtype` ('auto': the weights' own), placed by `device` (a device_map: 'auto', 'cpu', 'cuda:0'), in eval mode.
    Raises UserError naming the folder when transformers cannot load it."""
    import transformers

    from ...errors import UserError
    from ...models.quantization import torch_dtype

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        model_class = model_class or transformers.AutoModelForCausalLM
        model = model_class.from_pretrained(str(folder), dtype=dtype if dtype == "auto" else torch_dtype(dtype),
                                            attn_implementation="eager", device_map=device)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"serve: could not load {folder}: {str(exc).splitlines()[0][:300]}") from None
    return model.eval()


def batching_problem(model) -> str | None:
    """Why transformers' continuous batching cannot run `model` (None: it can). Its paged cache sizes every layer
    from the text config's one `head_dim`; Gemma 4's differ per layer (sliding and full attention), and the
    config refuses the global read: every request would fail inside the batching loop."""
    try:
        _ = model.config.get_text_config().head_dim  # the read that transformers refuses for Gemma 4
    except Exception as exc:  # noqa: BLE001 - transformers' per-layer attribute guard (an AttributeError subclass?)
        return f"its config has no single head_dim ({str(exc).split('.')[0][:120]})"
    return None


def internals_problem(continuous_batching: bool = True) -> str | None:
    """What `serve` needs of transformers below its documented surface and the installed release lacks (None:
    everything is there). Checked at start, so a release that moved these names is reported by name and version
    instead of failing mid-request. Sequential serving needs only `generate`'s streamer protocol (documented);
    continuous batching needs its config's fields, the manager's request API, and the paged attention registry."""
    import transformers

    if not continuous_batching:
        return None
    missing: list[str] = []
    try:
        from transformers import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import ContinuousBatchingManager
        from transformers.integrations.eager_paged import eager_paged_attention_forward, repeat_kv  # noqa: F401
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: F401
    except ImportError as exc:
        missing.append(f"import: {exc}")
    else:
        fields = set(inspect.signature(ContinuousBatchingConfig).parameters)
        missing += [f"ContinuousBatchingConfig.{name}" for name in
                    ("per_request_processors", "auto_switch_to_flash", "num_blocks", "page_size", "max_batch_tokens")
                    if name not in fields]
        # the sampling settings go through add_request's **logit_processor_kwargs
        for method, needs in {"add_request": ("input_ids", "request_id", "max_new_tokens", "streaming",
                                              "eos_token_id", "**"),
                              "register_result_handler": ("request_id", "callback"),
                              "cancel_request": ("request_id",), "start": (), "stop": ("block", "timeout")}.items():
            function = getattr(ContinuousBatchingManager, method, None)
            if function is None:
                missing.append(f"ContinuousBatchingManager.{method}")
                continue
            parameters = inspect.signature(function).parameters
            names = set(parameters) | {"**" for p in parameters.values() if p.kind == p.VAR_KEYWORD}
            missing += [f"ContinuousBatchingManager.{method}({name})" for name in needs if name not in names]
        if not hasattr(transformers.GenerationMixin, "init_continuous_batching"):
            missing.append("GenerationMixin.init_continuous_batching")
    if not missing:
        return None
    return (f"transformers {transformers.__version__} moved what continuous batching uses ({', '.join(missing)}); "
            "serve with --no-continuous-batching, or install the tested transformers (see the lock)")

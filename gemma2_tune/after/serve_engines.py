"""The two ways `serve` runs generation, behind one interface: a request's prompt ids and settings in, a queue of
text pieces out, and a cancel that stops the work the request still holds.

- `SequentialEngine`: transformers' `model.generate` on one inference thread (transformers' serving
  `InferenceThread` and `DirectStreamer`), one request at a time. Every OpenAI parameter the server accepts
  is honoured (stop strings, logit bias, frequency penalty, a per-request seed).
- `BatchingEngine`: transformers' continuous batching (`model.init_continuous_batching`, paged KV cache):
  concurrent requests share the forward passes. Per request: the prompt, `max_tokens`, the stop tokens and
  temperature / top_p / greedy; stop strings, logit bias, penalties and seeds are not available (the server
  refuses them in this mode). Gemma 2's attention soft-cap is kept by `softcapped_paged_attention`.

Both stop at the folder's stop tokens (`<end_of_turn>`); a request cannot change them.
"""

from __future__ import annotations

import asyncio
import copy
import functools
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

    def __init__(self, model, tokenizer):
        from transformers.cli.serving.utils import InferenceThread

        self.model, self.tokenizer = model, tokenizer
        self.thread = InferenceThread()

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

    def start(self, ids: list[int], settings: Settings) -> Generation:
        """Queue `ids` (the rendered prompt) for generation; must be called on the event loop."""
        import torch
        from transformers.cli.serving.utils import _GenerationCancelled

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = _counting_direct_streamer()(self.tokenizer._tokenizer, loop, queue)
        config = self.generation_config(settings)
        model, tokenizer = self.model, self.tokenizer

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)  # on the inference thread, just before this request samples
                model.generate(input_ids=torch.tensor([ids], device=model.device), generation_config=config,
                               streamer=streamer, tokenizer=tokenizer)
            except _GenerationCancelled:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as exc:  # noqa: BLE001 - reported to this request's client; the thread serves on
                loop.call_soon_threadsafe(queue.put_nowait, Failed(f"{type(exc).__name__}: {str(exc)[:300]}"))

        self.thread.submit(run)
        return Generation(queue, streamer.cancel, streamer)

    def stop(self) -> None:
        pass  # the inference thread is a daemon


@functools.cache  # transformers' serving classes are imported only when serve runs (extras)
def _counting_direct_streamer():
    from transformers.cli.serving.utils import DirectStreamer

    class Counting(DirectStreamer):
        """transformers' streamer, also remembering the last generated token (stop token or not)."""

        last_token: int | None = None

        def put(self, value) -> None:
            first = self._first
            super().put(value)
            if not first and value.numel():
                self.last_token = int(value.reshape(-1)[-1])

    return Counting


class BatchingEngine:
    """transformers' continuous batching: one background loop schedules every request's tokens into shared
    forward passes over a paged KV cache. Sampling is per request through transformers' per-request logits
    processors: greedy is top_k=1 (the argmax; exact ties, which `generate` breaks by the lowest id, are
    sampled), sampled is the request's temperature and top_p over the whole vocabulary."""

    name = "continuous batching"

    CPU_CONTEXTS = 4  # on a CPU the cache holds this many full contexts (more requests when they are shorter)
    CPU_BATCH_TOKENS = 512  # and a forward pass takes at most this many tokens

    def __init__(self, model, tokenizer, context: int | None = None):
        from transformers import ContinuousBatchingConfig

        register_softcapped_paged_attention()
        self.model, self.tokenizer = model, tokenizer
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

    def start(self, ids: list[int], settings: Settings) -> Generation:
        """Add `ids` to the running batch; must be called on the event loop."""
        if self.cb.background_thread_status.fatal_error is not None:
            raise RuntimeError(f"the batching loop stopped: {self.cb.background_thread_status.fatal_error}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = f"req-{uuid.uuid4().hex}"
        streamer = _counting_cb_streamer()(self.cb, request_id, self.tokenizer._tokenizer, loop, queue)

        def on_output(output) -> None:
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


@functools.cache
def _counting_cb_streamer():
    from transformers.cli.serving.utils import CBStreamer

    class Counting(CBStreamer):
        """transformers' streamer, also remembering the last generated token."""

        last_token: int | None = None

        def put(self, output) -> None:
            super().put(output)
            if output.generated_tokens:
                self.last_token = int(output.generated_tokens[-1])

    return Counting


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

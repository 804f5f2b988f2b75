"""What a /v1/chat/completions request may ask, and every check it passes before generation: the strict body
schema (unknown or out-of-range fields are a 400 naming the field), the fields refused because they would change
what was trained, a conversation the training renderer can render, and a prompt + completion within the context.

(no `from __future__ import annotations`: pydantic reads annotations at runtime)
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...data.images import ImageReader
from .engines import Settings


@dataclass
class Served:
    """The folder transformers loads, the name clients use, and how conversations are checked."""

    folder: Path
    name: str
    system_policy: str
    family: Any
    source: str  # what the user pointed at
    tokenizer: Any = None  # renders prompt ids (set once the model is loaded)
    context: int | None = None  # the model's context in tokens (max_position_embeddings)
    vocab_size: int | None = None  # logit_bias ids must be below it
    max_token_chars: int = 64  # the longest token's text: a prompt longer than context * this can't fit
    sampling: tuple = (False, 1.0, 1.0)  # the folder's generation config: (do_sample, temperature, top_p)
    thinking: bool = False  # Gemma 4: a request's default enable_thinking (the run's data.enable_thinking)
    empty_thought: bool = False  # Gemma 4 12B/26B-A4B/31B: the generation prompt writes the empty thought block
    images: Any = None  # the folder's image processor (data/images.py ImageProcessing); None: text only

    @property
    def gemma4(self) -> bool:
        """Gemma 4's turn format: tools, tool calls and thinking are part of it."""
        return getattr(self.family, "turn_format", None) == "gemma4"


# Images in requests: data: URLs only (never a path on the server's disk, never a URL the server would fetch), each
# at most this many MiB decoded; bodies of an image + text model may be this much larger than a text model's.
MAX_IMAGE_MB = 10.0
IMAGE_BODY_BYTES = 16 << 20  # base64 makes 3 bytes 4: about 12 MiB of images per request


TEXT_PARTS = ("text", "input_text", "output_text")


def joined_text_parts(message: Any) -> Any:
    """A message whose content is a list of text parts gets them joined by a space, as transformers' server joins
    them for a text model, so the check renders what generation will; other content is left to the check."""
    from ...data.turns import content_text

    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if parts and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
                         for p in parts):
            return message | {"content": content_text(parts, "message")}
    return message


# ---- the request schema ----------------------------------------------------------------------------------------

# Fields a request may not send, and why. Each would let a client change what was trained or what is served.
# Gemma 4's format has tools and thinking: `refused` takes those out of this list for it (GEMMA4_ACCEPTS).
REFUSED = {
    "chat_template_kwargs": "the conversation is rendered by the training renderer; a request cannot change or "
                            "parameterise the chat template",
    "chat_template": "the conversation is rendered by the training renderer; a request cannot replace the chat "
                     "template",
    "generation_config": "generation settings (stop tokens, lengths) are the served folder's; a request sets only "
                         "max_tokens, temperature, top_p, stop, seed, frequency_penalty and logit_bias",
    "tools": "Gemma's turn format has no tool definitions or tool calls",
    "functions": "Gemma's turn format has no tool definitions or tool calls",
    "tool_choice": "Gemma's turn format has no tool definitions or tool calls",
    "parallel_tool_calls": "Gemma's turn format has no tool definitions or tool calls",
    "function_call": "Gemma's turn format has no tool definitions or tool calls",
    "top_logprobs": "log-probabilities are not returned by this server",
    "audio": "this server serves a text model",
    "modalities": "this server serves a text model",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no reasoning settings",
    "web_search_options": "this server has no web search",
}
GEMMA4_ACCEPTS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs")
GEMMA4_REFUSES = {
    "functions": "deprecated by OpenAI: declare them in 'tools'",
    "function_call": "deprecated by OpenAI: use 'tool_choice'",
    "reasoning_effort": "Gemma 4 thinks or does not: chat_template_kwargs {\"enable_thinking\": true|false}",
}


def refused(served: "Served") -> dict[str, str]:
    """The fields `served` refuses, with why (REFUSED; for Gemma 4 less what its format carries)."""
    if not served.gemma4:
        return REFUSED
    return {k: v for k, v in REFUSED.items() if k not in GEMMA4_ACCEPTS} | GEMMA4_REFUSES


MAX_STOP_CHARS = 200  # transformers' stop-string matcher builds tables per string; longer stops are not useful
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class TemplateKwargs(_Strict):
    """Gemma 4's one template switch a request may set (the official template's `enable_thinking`)."""

    enable_thinking: Optional[bool] = None


class ChatRequest(_Strict):
    """The accepted /v1/chat/completions body: OpenAI's fields this server honours, typed and bounded.
    `messages` are checked by the training renderer afterwards."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a 64-bit integer
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[Literal[1]] = None
    stop: Optional[Union[str, list[str]]] = None
    frequency_penalty: Optional[float] = Field(None, ge=0, le=2)
    presence_penalty: Optional[Literal[0]] = None  # transformers has no additive presence penalty
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=MAX_LOGIT_BIAS)
    logprobs: Optional[Literal[False]] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = Field(None, max_length=256)  # OpenAI's abuse-tracking id: accepted, not used
    metadata: Optional[dict[str, str]] = None  # accepted, not used
    store: Optional[Literal[False]] = None
    # Gemma 4 only (refused before the schema for Gemma 2/3): checked by the training renderer
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Literal["auto", "none"]] = None  # the format cannot force a call
    parallel_tool_calls: Optional[Literal[True]] = None  # nor keep the model to one
    chat_template_kwargs: Optional[TemplateKwargs] = None


@dataclass
class Checked:
    """A request that passed every check: the prompt ids to generate from and the generation settings."""

    ids: list[int]
    settings: Settings
    stream: bool
    prompt_tokens: int
    thinking: bool = False  # Gemma 4: rendered with enable_thinking
    tools: Optional[list[dict[str, Any]]] = None  # Gemma 4: the tools declared in the prompt
    inputs: dict = field(default_factory=dict)  # with images: pixel_values, token types (and image_position_ids)


Problem = tuple[int, str, Optional[str], Optional[str]]  # (status, message, param, code)


def schema_problem(exc: ValidationError) -> Problem:
    """The first schema error as a 400 naming the field."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    param = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        return 400, f"'{where}' is not a field this server accepts", param, None
    value = repr(error.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return 400, f"'{where}': {error['msg']}, got {value}", param, None


def message_problem(messages: list[dict[str, Any]], gemma4: bool = False) -> Problem | None:
    """What a conversation contains that the turn format can't carry, checked before rendering (Gemma 4 carries
    tool calls: its renderer checks them)."""
    for i, m in enumerate(messages):
        if "role" not in m:
            return 400, f"messages[{i}]: each message needs a 'role' and 'content'", "messages", None
        for key in ("function_call",) if gemma4 else ("tool_calls", "function_call", "tool_call_id"):
            if m.get(key):
                return (400, f"messages[{i}].{key}: " + ("deprecated by OpenAI: use 'tool_calls'" if gemma4 else
                        "Gemma 2 and 3's turn format has no tool calls"), "messages", None)
        if not all(_utf8(value) for value in _strings(m)):
            return 400, f"messages[{i}]: the text is not valid Unicode (a lone surrogate?)", "messages", None
    return None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


DEFAULT_MAX_TOKENS = 1024  # a request without a limit gets at most this many tokens (as transformers' server)
BATCHING_REFUSES = ("stop", "logit_bias", "frequency_penalty", "seed")  # not per-request in continuous batching


def check_request(body: Any, served: Served, batching: bool = False) -> Checked | Problem:
    """Every check a chat-completions body passes before generation, in order: a JSON object; no refused field
    (REFUSED); the schema (ChatRequest); the model name; messages the training renderer can render with the
    run's system policy, ending with a user turn (Gemma 4: or tool responses) with the request's tools and
    thinking; with continuous batching, no field it can't honour per request; then (once the tokenizer is loaded)
    prompt + max_tokens within the context. Returns Checked, or the Problem (status, message, param, code)."""
    from ...data.parts import ToolResponse
    from ...data.turns import BadRow, normalise
    from .replies import openai_tool_messages

    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object", None, None
    not_accepted = refused(served)
    for key, why in not_accepted.items():
        if key in body and body[key] not in (None, [], {}) and not (key == "tool_choice" and body[key] == "none"):
            return 400, f"'{key}' is not accepted: {why}", key, None
    for key in not_accepted:
        body.pop(key, None)  # what is left is empty or "none": nothing to honour
    if isinstance(body.get("messages"), list):
        body["messages"] = [joined_text_parts(m) for m in body["messages"]]
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        return schema_problem(exc)
    if request.model is not None and request.model not in (served.name, str(served.folder), served.source):
        return (404, f"model '{request.model}' is not served here; this server serves '{served.name}'", "model",
                "model_not_found")
    problem = message_problem(request.messages, served.gemma4)
    if problem is not None:
        return problem
    messages = request.messages
    if served.gemma4:
        messages = openai_tool_messages(messages)
        if isinstance(messages, str):
            return 400, messages, "messages", None
    kwargs = request.chat_template_kwargs
    thinking = served.thinking if kwargs is None or kwargs.enable_thinking is None else kwargs.enable_thinking
    tools = None if request.tool_choice == "none" else request.tools  # "none": the model is not shown them
    stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops) or not all(map(_utf8, stops)):
        return (400, f"'stop' must be a non-empty string or a list of at most 4, each 1-{MAX_STOP_CHARS} characters",
                "stop", None)
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        token = int(key) if key.strip().isdigit() else None
        if token is None or (served.vocab_size is not None and token >= served.vocab_size) or not -100 <= value <= 100:
            return (400, f"'logit_bias': keys are token ids (0-{(served.vocab_size or 1) - 1}) and values in "
                    f"[-100, 100], got {key!r}: {value!r}", "logit_bias", None)
        bias[token] = value
    if batching:
        for key in BATCHING_REFUSES:
            if getattr(request, key) not in (None, 0, "", [], {}):
                return (400, f"'{key}' is not available with continuous batching, which takes per request only "
                        "max_tokens, temperature and top_p (serve --no-continuous-batching accepts it)", key, None)
    has_images = any(_image_parts(m) for m in request.messages)
    if has_images and batching:
        return (400, "images are not taken with continuous batching (transformers' batching schedules token ids, "
                "not pixels); serve --no-continuous-batching takes them", "messages", None)
    chars = sum(len(s) for m in request.messages for s in _strings(_text_of(m.get("content"))))
    if served.context is not None and chars > served.context * served.max_token_chars:
        return (400, f"the prompt is {chars} characters, more than this model's context of {served.context} tokens "
                "can hold", "messages", "context_length_exceeded")
    options = {"tools": tools, "thinking": thinking} if served.gemma4 else {}
    read_image = ImageReader(max_mb=MAX_IMAGE_MB, allow_paths=False) if served.images is not None else None
    try:
        turns = normalise(messages, served.system_policy, allow_open_end=True, family=served.family,
                          images=read_image, **options)
    except BadRow as exc:
        return 400, f"the conversation can't be rendered in Gemma's format: {exc}", "messages", None
    ends_with_responses = served.gemma4 and turns[-1].role == "model" and isinstance(turns[-1].parts[-1], ToolResponse)
    if turns[-1].role != "user" and not ends_with_responses:
        return 400, ("the conversation must end with a user message (the model answers it)"
                     + (" or tool messages answering its calls" if served.gemma4 else "")), "messages", None

    ids: list[int] = []
    inputs: dict = {}
    wanted = request.max_completion_tokens or request.max_tokens
    key = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    limit = wanted or DEFAULT_MAX_TOKENS
    if served.tokenizer is not None:
        from ..inference import prompt_ids

        if served.images is not None:  # the image processor's pixels and token types, as training made them
            from ...data.examples import TurnTokenizer
            from ...data.turns import render

            rendered = render(turns, add_generation_prompt=True, family=served.family,
                              **({"thinking": thinking, "empty_thought": served.empty_thought} if served.gemma4 else {}))
            try:
                inputs = TurnTokenizer(served.tokenizer, served.family, images=served.images).model_inputs(
                    rendered, turns)
            except BadRow as exc:
                return 400, f"the conversation's images can't be read: {exc}", "messages", None
            ids = inputs.pop("input_ids")[0].tolist()
        else:
            ids = prompt_ids(messages, served.tokenizer, served.system_policy, served.family, thinking=thinking,
                             empty_thought=served.empty_thought, tools=tools)[0].tolist()
    if ids and served.context is not None:
        left = served.context - len(ids)
        if left < 1:
            return (400, f"the prompt is {len(ids)} tokens; this model's context is {served.context} tokens",
                    "messages", "context_length_exceeded")
        if wanted is not None and wanted > left:
            return (400, f"this model's context is {served.context} tokens; the prompt is {len(ids)} and '{key}' "
                    f"asks for {wanted} more (at most {left})", key, "context_length_exceeded")
        limit = min(limit, left)
    do_sample, temperature, top_p = served.sampling  # a request that says nothing gets the folder's settings
    if request.temperature is not None:
        do_sample, temperature = request.temperature > 0, request.temperature
    settings = Settings(max_new_tokens=limit, do_sample=do_sample, temperature=temperature,
                        top_p=top_p if request.top_p is None else request.top_p, seed=request.seed, stop=stops,
                        logit_bias=bias, frequency_penalty=request.frequency_penalty)
    return Checked(ids, settings, bool(request.stream), len(ids), thinking, tools, inputs)


def request_problem(body: Any, served: Served, batching: bool = False) -> Problem | None:
    """(status, message, param, code) of what is wrong with a chat-completions request body, or None."""
    checked = check_request(body, served, batching)
    return None if isinstance(checked, Checked) else checked


def default_max_request_bytes(context: int | None, images: bool = False) -> int:
    """The default body limit in bytes: 32 bytes per context token (a token's text as JSON, with room for
    \\uXXXX escapes of non-Latin text) + 64 KiB for the JSON around the text; 1 MiB without a known context;
    IMAGE_BODY_BYTES more for a model that takes images (data: URLs)."""
    return (1 << 20 if context is None else 32 * context + (64 << 10)) + (IMAGE_BODY_BYTES if images else 0)


def _image_parts(message: Any) -> list:
    """The image content parts of a message."""
    from ...data.turns import IMAGE_PART_TYPES

    content = message.get("content") if isinstance(message, dict) else None
    return [p for p in content if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES] \
        if isinstance(content, list) else []


def _text_of(content: Any) -> Any:
    """A message's content without its image parts (whose data: URLs are not text the model reads)."""
    from ...data.turns import IMAGE_PART_TYPES

    if isinstance(content, list):
        return [p for p in content if not (isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)]
    return content



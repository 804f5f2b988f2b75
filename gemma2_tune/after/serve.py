"""`gemma2-tune serve`: a trained run or a merged folder behind an OpenAI-compatible API.

The web layer is FastAPI + uvicorn; generation is transformers' (`serve_engines`: continuous batching by default,
or `model.generate` one request at a time with `--no-continuous-batching`). What this module adds is what makes
it right for a tuned Gemma, and safe under hostile input:

- the model: a merged folder is served as it is; a run with a LoRA adapter (or its `ema/`) is first merged
  into its base by `merge` (self-checked) into a temporary folder, removed at exit (and at the next start if
  the server was killed); both load with eager attention, and the loaded model is checked (kernel in use,
  soft-caps) as training checks it;
- the conversation: rendered by the training renderer with the run's system policy and tokenized by the
  folder's tokenizer (what the folder's chat template renders, by construction); a request can change neither
  the template nor the stop tokens nor any other generation setting outside the documented, bounded fields;
- every request is checked before the model sees it: body size (413 before parsing), Content-Type (415),
  a strict schema (unknown or out-of-range fields are a 400 naming the field), a conversation training could
  render, a prompt + completion within the context (a prompt too long to fit is refused before all of it is
  tokenized); bad input is a 4xx in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), never a
  500 and never a traceback;
- a client that goes away (streamed or not) stops its generation;
- the edges: 127.0.0.1 by default, an optional API key compared in constant time, only /v1/chat/completions,
  /v1/models and /health exposed; SIGTERM or Ctrl-C stop it cleanly (uvicorn).
"""

# (no `from __future__ import annotations`: FastAPI and pydantic read annotations at runtime)

import asyncio
import hmac
import json
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from .materialize import model_folder
from .serve_engines import Settings, generation_stop_ids

DEFAULT_HOST = "127.0.0.1"


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


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
    """A JSON response in OpenAI's error shape."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


TEXT_PARTS = ("text", "input_text", "output_text")


def joined_text_parts(message: Any) -> Any:
    """A message whose content is a list of text parts gets them joined by a space, as transformers' server joins
    them for a text model, so the check renders what generation will; other content is left to the check."""
    from ..data.turns import content_text

    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if parts and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
                         for p in parts):
            return message | {"content": content_text(parts, "message")}
    return message


# ---- the request schema ----------------------------------------------------------------------------------------

# Fields a request may not send, and why. Each would let a client change what was trained or what is served.
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
MAX_STOP_CHARS = 200  # transformers' stop-string matcher builds tables per string; longer stops are not useful
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text"]


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


@dataclass
class Checked:
    """A request that passed every check: the prompt ids to generate from and the generation settings."""

    ids: list[int]
    settings: Settings
    stream: bool
    prompt_tokens: int


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


def message_problem(messages: list[dict[str, Any]]) -> Problem | None:
    """What a conversation contains that the turn format can't carry, checked before rendering."""
    for i, m in enumerate(messages):
        if "role" not in m:
            return 400, f"messages[{i}]: each message needs a 'role' and 'content'", "messages", None
        for key in ("tool_calls", "function_call", "tool_call_id"):
            if m.get(key):
                return (400, f"messages[{i}].{key}: Gemma's turn format has no tool calls", "messages", None)
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
    run's system policy, ending with a user turn; with continuous batching, no field it can't honour per
    request; then (once the tokenizer is loaded) prompt + max_tokens within the context. Returns Checked, or
    the Problem (status, message, param, code)."""
    from ..data.turns import BadRow, normalise

    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object", None, None
    for key, why in REFUSED.items():
        if key in body and body[key] not in (None, [], {}) and not (key == "tool_choice" and body[key] == "none"):
            return 400, f"'{key}' is not accepted: {why}", key, None
    for key in REFUSED:
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
    problem = message_problem(request.messages)
    if problem is not None:
        return problem
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
    chars = sum(len(s) for m in request.messages for s in _strings(m.get("content")))
    if served.context is not None and chars > served.context * served.max_token_chars:
        return (400, f"the prompt is {chars} characters, more than this model's context of {served.context} tokens "
                "can hold", "messages", "context_length_exceeded")
    try:
        turns = normalise(request.messages, served.system_policy, allow_open_end=True, family=served.family)
    except BadRow as exc:
        return 400, f"the conversation can't be rendered in Gemma's format: {exc}", "messages", None
    if turns[-1].role != "user":
        return 400, "the conversation must end with a user message (the model answers it)", "messages", None

    ids: list[int] = []
    wanted = request.max_completion_tokens or request.max_tokens
    key = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    limit = wanted or DEFAULT_MAX_TOKENS
    if served.tokenizer is not None and served.context is not None:
        from .inference import prompt_ids

        ids = prompt_ids(request.messages, served.tokenizer, served.system_policy, served.family)[0].tolist()
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
    return Checked(ids, settings, bool(request.stream), len(ids))


def request_problem(body: Any, served: Served, batching: bool = False) -> Problem | None:
    """(status, message, param, code) of what is wrong with a chat-completions request body, or None."""
    checked = check_request(body, served, batching)
    return None if isinstance(checked, Checked) else checked


def default_max_request_bytes(context: int | None) -> int:
    """The default body limit in bytes: 32 bytes per context token (a token's text as JSON, with room for
    \\uXXXX escapes of non-Latin text) + 64 KiB for the JSON around the text; 1 MiB without a known context."""
    return 1 << 20 if context is None else 32 * context + (64 << 10)


async def read_body(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes (nothing more is read or kept)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class KeyCheck:
    """ASGI middleware: /v1/ requires `Authorization: Bearer <key>`, compared in constant time. A plain ASGI
    middleware, not @app.middleware("http"): that one (Starlette's BaseHTTPMiddleware) wraps `receive`, and a
    handler behind it can't see its client leave."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = openai_error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                        code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(served: Served, engine, api_key: str | None, max_request_bytes: int | None = None):
    """The FastAPI app: the checks in front of `engine` (serve_engines). `max_request_bytes` defaults to
    default_max_request_bytes(served.context)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limit = max_request_bytes or default_max_request_bytes(served.context)
    expected = f"Bearer {api_key}".encode() if api_key is not None else None
    batching = getattr(engine, "name", "") == "continuous batching"
    eos = set(generation_stop_ids(engine.model.generation_config))
    app = FastAPI(title="gemma2-tune serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return openai_error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # the client gets a message, the server keeps serving
        return openai_error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}", "server_error")

    if expected is not None:
        app.add_middleware(KeyCheck, expected=expected)

    def finish_reason(generation, settings: Settings) -> str:
        hit_limit = generation.tokens >= settings.max_new_tokens and generation.last_token not in eos
        return "length" if hit_limit else "stop"

    def usage(checked: Checked, generation) -> dict:
        return {"prompt_tokens": checked.prompt_tokens, "completion_tokens": generation.tokens,
                "total_tokens": checked.prompt_tokens + generation.tokens}

    def chunk(cid: str, delta: dict, reason: str | None = None, extra: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": served.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        return f"data: {json.dumps(body | (extra or {}))}\n\n"

    def failure_event(message: str) -> str:
        return f"data: {json.dumps(error_body(f'generation failed: {message}', 'server_error'))}\n\ndata: [DONE]\n\n"

    async def streamed(checked: Checked, cid: str):
        generation, ended = None, False
        try:
            # Generation starts with the response: a client gone before this point has cost nothing.
            try:
                generation = engine.start(checked.ids, checked.settings)
            except Exception as exc:  # noqa: BLE001 - e.g. the batching loop died: said in the stream
                ended = True
                yield failure_event(f"{type(exc).__name__}: {str(exc)[:300]}")
                return
            yield chunk(cid, {"role": "assistant", "content": ""})
            while True:
                item = await generation.queue.get()
                pieces = [item]
                while not generation.queue.empty() and isinstance(pieces[-1], str):
                    pieces.append(generation.queue.get_nowait())
                text = "".join(p for p in pieces if isinstance(p, str))
                if text:
                    yield chunk(cid, {"content": text})
                end = pieces[-1]
                if end is None:
                    ended = True
                    break
                if not isinstance(end, str):  # Failed: the error in OpenAI's shape, then the end of the stream
                    ended = True
                    yield failure_event(end.message)
                    return
            yield chunk(cid, {}, finish_reason(generation, checked.settings),
                        {"usage": usage(checked, generation)})
            yield "data: [DONE]\n\n"
        finally:
            if generation is not None and not ended:
                generation.cancel()  # the client left: stop generating for it

    async def whole(request: Request, checked: Checked, cid: str):
        generation = engine.start(checked.ids, checked.settings)
        # The body is read, so the next ASGI message is the client's disconnect.
        gone = asyncio.ensure_future(request.receive())
        pieces: list[str] = []
        ended = False
        try:
            while True:
                item = asyncio.ensure_future(generation.queue.get())
                await asyncio.wait((item, gone), return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    if gone.result().get("type") == "http.disconnect":
                        return Response(status_code=499)  # nobody reads it; generation is cancelled below
                    gone = asyncio.ensure_future(request.receive())
                    continue
                item = item.result()
                ended = not isinstance(item, str)
                if item is None:
                    break
                if ended:
                    return openai_error(500, f"generation failed: {item.message}", "server_error")
                pieces.append(item)
        finally:
            if not ended:
                generation.cancel()  # the client left: stop generating for it
            gone.cancel()
        message = {"role": "assistant", "content": "".join(pieces)}
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": served.name,
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": finish_reason(generation, checked.settings)}],
                             "usage": usage(checked, generation)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return openai_error(415, f"the body must be JSON with 'Content-Type: application/json', got "
                                f"{media or 'no Content-Type'!r}")
        raw = await read_body(request, limit)
        if raw is None:
            return openai_error(413, f"the request body is larger than this server's limit of {limit} bytes "
                                "(--max-request-bytes)", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return openai_error(400, "the request body is not valid JSON")
        except RecursionError:
            return openai_error(400, "the request body is nested too deeply")
        # rendering and tokenizing run off the event loop: /health and other requests keep being answered
        try:
            checked = await run_in_threadpool(check_request, body, served, batching)
        except RecursionError:  # parsed, but too deep for the checks that walk it
            return openai_error(400, "the request body is nested too deeply")
        if not isinstance(checked, Checked):
            status, message, param, code = checked
            return openai_error(status, message, param=param, code=code)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if checked.stream:
            return StreamingResponse(streamed(checked, cid), media_type="text/event-stream")
        return await whole(request, checked, cid)

    card = {"id": served.name, "object": "model", "created": created, "owned_by": "gemma2-tune"}

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != served.name:
            return openai_error(404, f"model '{model_id}' is not served here; this server serves '{served.name}'",
                                param="model", code="model_not_found")
        return JSONResponse(card)

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok", "model": served.name})

    return app


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` can't be listened on now (in use, no such address), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return str(exc)
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def longest_token_chars(tokenizer) -> int:
    """The most characters one token's text can have (its vocabulary entry; '▁' is one space): a prompt of
    more than context * this characters can't fit, whatever it says."""
    return max((len(token) for token in tokenizer.get_vocab()), default=64)


def serve(target: str, host: str = DEFAULT_HOST, port: int = 8000, api_key: str | None = None,
          name: str | None = None, dtype: str | None = None, device: str = "auto",
          echo: Callable[[str], None] = print, *, max_request_bytes: int | None = None,
          continuous_batching: bool = True) -> None:
    """Serve `target` until SIGTERM/SIGINT. Raises UserError: a missing folder, a model that fails its checks,
    transformers' serving extras missing, a port in use, an empty API key, a body limit under 1 KiB."""
    try:
        import fastapi  # noqa: F401 - the web layer (transformers' serving extras)
        import uvicorn
    except ImportError:
        raise UserError("serve needs transformers' serving extras: pip install 'gemma2-tune[serve]'") from None
    from ..models.checks import check_loaded
    from ..models.loading import load_tokenizer
    from .serve_engines import BatchingEngine, SequentialEngine, internals_problem, load_for_serving

    moved = internals_problem(continuous_batching)
    if moved:
        raise UserError(f"serve: {moved} (nothing was loaded)")

    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty (or GEMMA2_TUNE_API_KEY is set to nothing): every request would be "
                        "refused; give a key or leave it out")
    if max_request_bytes is not None and max_request_bytes < 1024:
        raise UserError(f"--max-request-bytes {max_request_bytes}: give at least 1024")
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be 1-65535")
    port_problem = bind_problem(host, port)
    if port_problem:
        raise UserError(f"serve: cannot listen on {host}:{port}: {port_problem} (nothing was loaded)")
    with model_folder(target, command="serve", name=name, dtype=dtype, echo=echo) as found:
        served = Served(found.folder, found.name, found.system_policy, found.family, found.source)
        model = load_for_serving(served.folder, dtype=dtype or "auto", device=device)
        for warning in check_loaded(model, served.family, "eager", str(model.dtype).replace("torch.", "")):
            echo(f"warning: {warning}")
        served.tokenizer = load_tokenizer(str(served.folder))
        served.context = getattr(model.config, "max_position_embeddings", None)
        served.vocab_size = model.config.get_text_config().vocab_size
        served.max_token_chars = longest_token_chars(served.tokenizer)
        folder = model.generation_config
        served.sampling = (bool(folder.do_sample), folder.temperature or 1.0, folder.top_p or 1.0)
        engine = (BatchingEngine(model, served.tokenizer, served.context) if continuous_batching
                  else SequentialEngine(model, served.tokenizer))
        app = build_app(served, engine, api_key, max_request_bytes)
        limit = max_request_bytes or default_max_request_bytes(served.context)
        where = f"http://{host}:{port}/v1"
        echo(f"serving '{served.name}' ({served.source}) at {where}: eager attention, soft-caps "
             f"{getattr(model.config, 'attn_logit_softcapping', None)}/"
             f"{getattr(model.config, 'final_logit_softcapping', None)}, system policy '{served.system_policy}', "
             f"stops at <end_of_turn>, {engine.name}, bodies up to {limit} bytes"
             + ("; API key required" if api_key else ""))
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model")
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        stopped_by: list[int] = []
        # uvicorn stops gracefully on SIGTERM/SIGINT (no new connections, running requests finish), then
        # re-raises the signal to the handler it found: ours records it, so the temporary folder is removed and
        # the command ends normally.
        previous = {sig: signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise UserError(f"serve: could not listen on {host}:{port} (in use?)") from exc
        finally:
            engine.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            raise UserError(f"serve: could not listen on {host}:{port} (in use?)")
    echo("server stopped" + (f" ({signal.Signals(stopped_by[0]).name})" if stopped_by else ""))

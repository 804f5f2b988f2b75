"""The HTTP surface: OpenAI's /v1/chat/completions (streamed or whole), /v1/models and /health, errors in
OpenAI's shape (never a traceback), a body limit enforced while reading (413 before parsing), an optional API key
compared in constant time, and a client that leaves stops its generation. A Gemma 4 reply comes as OpenAI's
message: `reasoning_content` (its thought), `content`, `tool_calls` (finish_reason "tool_calls"): replies.py.

(no `from __future__ import annotations`: FastAPI reads annotations at runtime)
"""

import asyncio
import hmac
import json
import time
import uuid

from .engines import Settings, generation_stop_ids
from .replies import ReplySplitter, read_calls, special_strings
from .schema import Checked, Served, check_request, default_max_request_bytes


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
    """A JSON response in OpenAI's error shape."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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


class Completions:
    """/v1/chat/completions in front of `engine`: parse and check a body, then answer it whole or streamed."""

    def __init__(self, served: Served, engine, limit: int):
        self.served, self.engine, self.limit = served, engine, limit
        self.batching = getattr(engine, "name", "") == "continuous batching"
        self.eos = set(generation_stop_ids(engine.model.generation_config))
        self.special = special_strings(served.tokenizer) if served.gemma4 else []

    def splitter(self) -> ReplySplitter | None:
        """A Gemma 4 reply's splitter (None: Gemma 2/3 replies are text)."""
        return ReplySplitter(self.special) if self.served.gemma4 else None

    def calls(self, splitter: ReplySplitter | None, checked: Checked) -> tuple[list[dict], str]:
        """The reply's tool calls as OpenAI's, and the text of those that could not be read."""
        if splitter is None or not splitter.calls:
            return [], ""
        calls, unread = read_calls(self.served.tokenizer, splitter.calls, checked.tools)
        return calls, splitter.plain(unread)

    def finish_reason(self, generation, settings: Settings) -> str:
        hit_limit = generation.tokens >= settings.max_new_tokens and generation.last_token not in self.eos
        return "length" if hit_limit else "stop"

    @staticmethod
    def usage(checked: Checked, generation) -> dict:
        return {"prompt_tokens": checked.prompt_tokens, "completion_tokens": generation.tokens,
                "total_tokens": checked.prompt_tokens + generation.tokens}

    def chunk(self, cid: str, delta: dict, reason: str | None = None, extra: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.served.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        return f"data: {json.dumps(body | (extra or {}))}\n\n"

    @staticmethod
    def failure_event(message: str) -> str:
        return f"data: {json.dumps(error_body(f'generation failed: {message}', 'server_error'))}\n\ndata: [DONE]\n\n"

    async def checked_body(self, request):
        """The request's Checked, or the error response to send instead (415, 413, 400, 404)."""
        from starlette.concurrency import run_in_threadpool

        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return openai_error(415, f"the body must be JSON with 'Content-Type: application/json', got "
                                f"{media or 'no Content-Type'!r}")
        raw = await read_body(request, self.limit)
        if raw is None:
            return openai_error(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                                "(--max-request-bytes)", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return openai_error(400, "the request body is not valid JSON")
        except RecursionError:
            return openai_error(400, "the request body is nested too deeply")
        # rendering and tokenizing run off the event loop: /health and other requests keep being answered
        try:
            checked = await run_in_threadpool(check_request, body, self.served, self.batching)
        except RecursionError:  # parsed, but too deep for the checks that walk it
            return openai_error(400, "the request body is nested too deeply")
        if not isinstance(checked, Checked):
            status, message, param, code = checked
            return openai_error(status, message, param=param, code=code)
        return checked

    async def streamed(self, checked: Checked, cid: str):
        """Server-sent events: a role chunk, content chunks, a final chunk with the finish reason and usage."""
        generation, ended = None, False
        try:
            # Generation starts with the response: a client gone before this point has cost nothing.
            try:
                generation = self.engine.start(checked.ids, checked.settings, **_inputs(checked))
            except Exception as exc:  # noqa: BLE001 - e.g. the batching loop died: said in the stream
                ended = True
                yield self.failure_event(f"{type(exc).__name__}: {str(exc)[:300]}")
                return
            yield self.chunk(cid, {"role": "assistant", "content": ""})
            splitter = self.splitter()
            while True:
                item = await generation.queue.get()
                pieces = [item]
                while not generation.queue.empty() and isinstance(pieces[-1], str):
                    pieces.append(generation.queue.get_nowait())
                text = "".join(p for p in pieces if isinstance(p, str))
                for delta in (splitter.feed(text) if splitter else [{"content": text}] if text else []):
                    yield self.chunk(cid, delta)
                end = pieces[-1]
                if end is None:
                    ended = True
                    break
                if not isinstance(end, str):  # Failed: the error in OpenAI's shape, then the end of the stream
                    ended = True
                    yield self.failure_event(end.message)
                    return
            reason = self.finish_reason(generation, checked.settings)
            if splitter is not None:
                for delta in splitter.finish():
                    yield self.chunk(cid, delta)
                calls, unread = self.calls(splitter, checked)
                if unread:
                    yield self.chunk(cid, {"content": unread})
                if calls:
                    reason = "tool_calls"
                    yield self.chunk(cid, {"tool_calls": [{"index": k} | c for k, c in enumerate(calls)]})
            yield self.chunk(cid, {}, reason, {"usage": self.usage(checked, generation)})
            yield "data: [DONE]\n\n"
        finally:
            if generation is not None and not ended:
                generation.cancel()  # the client left: stop generating for it

    async def whole(self, request, checked: Checked, cid: str):
        """One JSON answer; a client that disconnects while waiting stops its generation (499, unread)."""
        from fastapi.responses import JSONResponse, Response

        generation = self.engine.start(checked.ids, checked.settings, **_inputs(checked))
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
        reason = self.finish_reason(generation, checked.settings)
        splitter = self.splitter()
        if splitter is not None:  # the same splitting as a stream's, so both say the same
            splitter.feed(message["content"])
            splitter.finish()
            calls, unread = self.calls(splitter, checked)
            message = {"role": "assistant", "content": splitter.content + unread}
            if splitter.reasoning:
                message["reasoning_content"] = splitter.reasoning
            if calls:
                message["tool_calls"], reason = calls, "tool_calls"
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()),
                             "model": self.served.name,
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": reason}],
                             "usage": self.usage(checked, generation)})

    async def __call__(self, request):
        from fastapi.responses import StreamingResponse

        checked = await self.checked_body(request)
        if not isinstance(checked, Checked):
            return checked
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if checked.stream:
            return StreamingResponse(self.streamed(checked, cid), media_type="text/event-stream")
        return await self.whole(request, checked, cid)


def _inputs(checked: Checked) -> dict:
    """The engine's keyword for an image + text model's other inputs (none for a text model)."""
    return {"inputs": checked.inputs} if checked.inputs else {}


def build_app(served: Served, engine, api_key: str | None, max_request_bytes: int | None = None):
    """The FastAPI app: the checks in front of `engine` (engines.py). `max_request_bytes` defaults to
    default_max_request_bytes(served.context)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="gemma2-tune serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return openai_error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # the client gets a message, the server keeps serving
        return openai_error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}", "server_error")

    if api_key is not None:
        app.add_middleware(KeyCheck, expected=f"Bearer {api_key}".encode())

    completions = Completions(served, engine, max_request_bytes or default_max_request_bytes(
        served.context, served.images is not None))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completions(request)

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

"""`gemma2-tune serve`: a trained run or a merged folder behind an OpenAI-compatible API.

Generation, streaming (server-sent events) and the OpenAI response objects are transformers' own server
(`transformers serve`: its ModelManager and ChatCompletionHandler, on FastAPI + uvicorn). What this module
adds is what makes it right for a tuned Gemma:

- the model: a merged folder is served as it is; a run with a LoRA adapter (or its `ema/`) is first merged
  into its base by `merge` (self-checked) into a temporary folder, removed at exit; both load with eager
  attention, and the loaded model is checked (kernel in use, soft-caps) as training checks it;
- the conversation: rendered by the folder's chat template, which gemma2-tune generated from the training
  renderer and the run's system policy; every request is first validated by that renderer, so a
  conversation training could not render is a 400 with the reason, not a 500;
- generation stops at <end_of_turn> (the folder's generation config);
- the edges: 127.0.0.1 by default, an optional API key (`Authorization: Bearer <key>`), errors in OpenAI's
  shape ({"error": {"message", "type", "param", "code"}}) and never a traceback to the client, only
  /v1/chat/completions, /v1/models and /health exposed; SIGTERM or Ctrl-C stop it cleanly (uvicorn).
"""

# (no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime)

import json
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError

DEFAULT_HOST = "127.0.0.1"


@dataclass
class Served:
    """The folder transformers loads, the name clients use, and how conversations are checked."""

    folder: Path
    name: str
    system_policy: str
    family: Any
    source: str  # what the user pointed at
    tokenizer: Any = None  # counts prompt tokens (set once the model is loaded)
    context: int | None = None  # the model's context in tokens (max_position_embeddings)


@contextmanager
def served_folder(target: str, name: str | None, dtype: str | None, echo: Callable[[str], None],
                  command: str = "serve") -> Iterator[Served]:
    """The model folder to serve for `target` (a merged folder, a full fine-tune, or a run/adapter folder merged
    into a temporary folder for the server's lifetime). `command` names the caller in messages (export uses it
    too). Raises UserError when `target` is none of these."""
    from ..models.loading import checkpoint_family
    from .inference import read_run
    from .merge import merge

    path = Path(target).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise UserError(f"{command} {target}: {what} (give a run folder, its ema/ folder, or a merged folder)")
    run = read_run(str(path), None, key=command)
    label = name or (path.parent.name + "-ema" if path.name == "ema" else path.name)
    if not run.is_adapter:
        family, _ = checkpoint_family(str(path))
        yield Served(path, label, run.system_policy, family, str(path))
        return
    work = Path(tempfile.mkdtemp(prefix=f"gemma2-tune-{command}-"))
    try:
        echo(f"{path} holds a LoRA adapter: merging it into its base for {command} (a temporary folder, removed at "
             "exit)")
        merge(str(path), str(work / "merged"), dtype=dtype, echo=lambda line: echo(f"  {line}"))
        family, _ = checkpoint_family(str(work / "merged"))
        yield Served(work / "merged", label, run.system_policy, family, str(path))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
    """A JSON response in OpenAI's error shape."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


TEXT_PARTS = ("text", "input_text", "output_text")


def joined_text_parts(message: Any) -> Any:
    """A message whose content is a list of text parts gets them joined by a space, as transformers' server joins
    them for a text model, so the check renders what generation will; other content is left to the check."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if parts and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
                         for p in parts):
            return message | {"content": " ".join(p["text"] for p in parts)}
    return message


def request_problem(body: Any, served: Served) -> tuple[int, str, str | None, str | None] | None:
    """(status, message, param, code) of what is wrong with a chat-completions request body, or None.
    The conversation is checked by the training renderer with the run's system policy."""
    from ..data.turns import BadRow, normalise

    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object", None, None
    model = body.get("model")
    if model is not None and model not in (served.name, str(served.folder), served.source):
        return 404, f"model '{model}' is not served here; this server serves '{served.name}'", "model", "model_not_found"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return 400, "'messages' must be a non-empty list of {role, content} objects", "messages", None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            return 400, f"messages[{i}]: each message needs a 'role' and 'content'", "messages", None
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return 400, f"'{key}' must be a positive integer, got {value!r}", key, None
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high):
            return 400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", key, None
    if body.get("seed") is not None and (isinstance(body["seed"], bool) or not isinstance(body["seed"], int)):
        return 400, f"'seed' must be an integer, got {body['seed']!r}", "seed", None
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return 400, f"'stream' must be true or false, got {body['stream']!r}", "stream", None
    if body.get("n") not in (None, 1):
        return 400, "'n' other than 1 is not supported", "n", None
    for key in ("tools", "functions", "tool_choice"):
        if body.get(key):
            return 400, f"'{key}': Gemma's turn format has no tool definitions or tool calls", key, None
    try:
        turns = normalise(messages, served.system_policy, allow_open_end=True, family=served.family)
    except BadRow as exc:
        return 400, f"the conversation can't be rendered in Gemma's format: {exc}", "messages", None
    if turns[-1].role != "user":
        return 400, "the conversation must end with a user message (the model answers it)", "messages", None
    return context_problem(body, served)


DEFAULT_MAX_TOKENS = 1024  # transformers' server generates at most this many tokens when a request sets no limit


def context_problem(body: dict, served: Served) -> tuple[int, str, str | None, str | None] | None:
    """The prompt and the requested completion must fit the model's context; a request without a limit gets
    min(1024, what is left) as its limit (set in `body`)."""
    if served.tokenizer is None or served.context is None:
        return None
    from .inference import prompt_ids

    prompt = prompt_ids(body["messages"], served.tokenizer, served.system_policy, served.family).shape[1]
    left = served.context - prompt
    if left < 1:
        return (400, f"the prompt is {prompt} tokens; this model's context is {served.context} tokens",
                "messages", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    wanted = body.get(key)
    if wanted is None:
        body["max_tokens"] = min(DEFAULT_MAX_TOKENS, left)
        return None
    if wanted > left:
        return (400, f"this model's context is {served.context} tokens; the prompt is {prompt} and '{key}' asks for "
                f"{wanted} more (at most {left})", key, "context_length_exceeded")
    return None


def named_response(response, folder: str, name: str):
    """transformers names the model by the folder it loaded; clients see the served name instead. A stream ends
    with OpenAI's `data: [DONE]` line."""
    from fastapi.responses import JSONResponse, StreamingResponse

    pairs = [(f'"model":{json.dumps(folder)}', f'"model":{json.dumps(name)}'),
             (f'"model": {json.dumps(folder)}', f'"model": {json.dumps(name)}')]

    def renamed(text: str) -> str:
        for old, new in pairs:
            text = text.replace(old, new)
        return text

    if isinstance(response, StreamingResponse):
        source = response.body_iterator

        async def chunks():
            done = False
            async for chunk in source:
                text = renamed(chunk.decode() if isinstance(chunk, bytes) else chunk)
                done = done or "data: [DONE]" in text
                yield text
            if not done:  # OpenAI's streams end with this line; raw SSE readers wait for it
                yield "data: [DONE]\n\n"

        response.body_iterator = chunks()
        return response
    if isinstance(response, JSONResponse):
        return JSONResponse(json.loads(renamed(response.body.decode())), status_code=response.status_code)
    return response


def build_app(served: Served, chat_handler, api_key: str | None):
    """The FastAPI app: our checks in front of transformers' chat-completions handler."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="gemma2-tune serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return openai_error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return openai_error(400, f"invalid request: {str(exc)[:300]}")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return openai_error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                    code="invalid_api_key")
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the client gets a message, the server keeps serving
            return openai_error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}", "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return openai_error(400, "the request body is not valid JSON")
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            body["messages"] = [joined_text_parts(m) for m in body["messages"]]
        problem = request_problem(body, served)
        if problem is not None:
            status, message, param, code = problem
            return openai_error(status, message, param=param, code=code)
        body["model"] = str(served.folder)  # the one model this server holds
        try:
            response = await chat_handler.handle_request(body, request.headers.get("x-request-id")
                                                         or str(time.time_ns()))
        except HTTPException as exc:
            return openai_error(exc.status_code, str(exc.detail))
        return named_response(response, str(served.folder), served.name)

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


def serve(target: str, host: str = DEFAULT_HOST, port: int = 8000, api_key: str | None = None,
          name: str | None = None, dtype: str | None = None, device: str = "auto",
          echo: Callable[[str], None] = print) -> None:
    """Serve `target` until SIGTERM/SIGINT. Raises UserError: a missing folder, a model that fails its checks,
    transformers' serving extras missing, a port in use."""
    try:
        import uvicorn
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.utils import GenerationState
    except ImportError:
        raise UserError("serve needs transformers' serving extras: pip install 'gemma2-tune[serve]'") from None
    from ..models.checks import check_loaded
    from ..models.loading import load_tokenizer

    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be 1-65535")
    port_problem = bind_problem(host, port)
    if port_problem:
        raise UserError(f"serve: cannot listen on {host}:{port}: {port_problem} (nothing was loaded)")
    with served_folder(target, name, dtype, echo) as served:
        manager = ModelManager(device=device, dtype=dtype or "auto", attn_implementation="eager",
                               force_model=str(served.folder))
        model, _ = manager.load_model_and_processor(manager.process_model_name(str(served.folder)))
        for warning in check_loaded(model, served.family, "eager", str(model.dtype).replace("torch.", "")):
            echo(f"warning: {warning}")
        served.tokenizer = load_tokenizer(str(served.folder))
        served.context = getattr(model.config, "max_position_embeddings", None)
        handler = ChatCompletionHandler(model_manager=manager, generation_state=GenerationState())
        app = build_app(served, handler, api_key)
        where = f"http://{host}:{port}/v1"
        echo(f"serving '{served.name}' ({served.source}) at {where}: eager attention, soft-caps "
             f"{model.config.attn_logit_softcapping if hasattr(model.config, 'attn_logit_softcapping') else None}/"
             f"{getattr(model.config, 'final_logit_softcapping', None)}, system policy '{served.system_policy}', "
             f"stops at <end_of_turn>" + ("; API key required" if api_key else ""))
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
            manager.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            raise UserError(f"serve: could not listen on {host}:{port} (in use?)")
    echo("server stopped" + (f" ({signal.Signals(stopped_by[0]).name})" if stopped_by else ""))

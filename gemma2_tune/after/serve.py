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


@contextmanager
def served_folder(target: str, name: str | None, dtype: str | None, echo: Callable[[str], None]) -> Iterator[Served]:
    """The model folder to serve for `target` (a merged folder, a full fine-tune, or a run/adapter folder merged
    into a temporary folder for the server's lifetime). Raises UserError when `target` is none of these."""
    from ..models.loading import checkpoint_family
    from .inference import read_run
    from .merge import merge

    path = Path(target).expanduser()
    if not path.is_dir():
        raise UserError(f"serve {target}: no such folder (give a run folder, its ema/ folder, or a merged folder)")
    run = read_run(str(path), None)
    label = name or (path.parent.name + "-ema" if path.name == "ema" else path.name)
    if not run.is_adapter:
        family, _ = checkpoint_family(str(path))
        yield Served(path, label, run.system_policy, family, str(path))
        return
    work = Path(tempfile.mkdtemp(prefix="gemma2-tune-serve-"))
    try:
        echo(f"{path} holds a LoRA adapter: merging it into its base for serving (a temporary folder, removed at exit)")
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
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        return 400, f"'temperature' must be a number in [0, 2], got {temperature!r}", "temperature", None
    if body.get("n") not in (None, 1):
        return 400, "'n' other than 1 is not supported", "n", None
    try:
        turns = normalise(messages, served.system_policy, allow_open_end=True, family=served.family)
    except BadRow as exc:
        return 400, f"the conversation can't be rendered in Gemma's format: {exc}", "messages", None
    if turns[-1].role != "user":
        return 400, "the conversation must end with a user message (the model answers it)", "messages", None
    return None


def named_response(response, folder: str, name: str):
    """transformers names the model by the folder it loaded; clients see the served name instead."""
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
            async for chunk in source:
                yield renamed(chunk.decode() if isinstance(chunk, bytes) else chunk)

        response.body_iterator = chunks()
        return response
    if isinstance(response, JSONResponse):
        return JSONResponse(json.loads(renamed(response.body.decode())), status_code=response.status_code)
    return response


def build_app(served: Served, chat_handler, api_key: str | None):
    """The FastAPI app: our checks in front of transformers' chat-completions handler."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="gemma2-tune serve")
    created = int(time.time())

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

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                                         "owned_by": "gemma2-tune"}]})

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok", "model": served.name})

    return app


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

    with served_folder(target, name, dtype, echo) as served:
        manager = ModelManager(device=device, dtype=dtype or "auto", attn_implementation="eager",
                               force_model=str(served.folder))
        model, _ = manager.load_model_and_processor(manager.process_model_name(str(served.folder)))
        for warning in check_loaded(model, served.family, "eager", str(model.dtype).replace("torch.", "")):
            echo(f"warning: {warning}")
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

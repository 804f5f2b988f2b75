"""`gemma2-tune serve`: load the folder (a merged folder as it is; a LoRA run merged into a temporary folder by
`merge`, self-checked), check the loaded model as training checks it, then listen until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
from typing import Callable

from ...errors import UserError
from ..materialize import model_folder
from .schema import MAX_IMAGE_MB, Served, default_max_request_bytes

DEFAULT_HOST = "127.0.0.1"


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
    from ...models.checks import check_loaded
    from ...data.gemma4 import writes_empty_thought
    from ...models.loading import load_image_processing, load_tokenizer
    from .engines import (BatchingEngine, SequentialEngine, batching_problem, generation_stop_ids, internals_problem,
                          load_for_serving)
    from .routes import build_app

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
        served = Served(found.folder, found.name, found.system_policy, found.family, found.source,
                        thinking=found.enable_thinking,
                        empty_thought=writes_empty_thought(found.family, str(found.folder)))
        model = load_for_serving(served.folder, dtype=dtype or "auto", device=device)
        for warning in check_loaded(model, served.family, "eager", str(model.dtype).replace("torch.", "")):
            echo(f"warning: {warning}")
        served.tokenizer = load_tokenizer(str(served.folder))
        served.images = load_image_processing(str(served.folder), served.family, served.tokenizer)
        served.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)  # the decoder's
        served.vocab_size = model.config.get_text_config().vocab_size
        served.max_token_chars = longest_token_chars(served.tokenizer)
        folder = model.generation_config
        served.sampling = (bool(folder.do_sample), folder.temperature or 1.0, folder.top_p or 1.0)
        unbatchable = batching_problem(model) if continuous_batching else None
        if unbatchable:
            echo(f"continuous batching: transformers' cannot run this model ({unbatchable}); serving one request "
                 "at a time")
        engine = (BatchingEngine(model, served.tokenizer, served.context, raw=served.gemma4)
                  if continuous_batching and not unbatchable else SequentialEngine(model, served.tokenizer, raw=served.gemma4))
        app = build_app(served, engine, api_key, max_request_bytes)
        limit = max_request_bytes or default_max_request_bytes(served.context, served.images is not None)
        stops = generation_stop_ids(model.generation_config)
        where = f"http://{host}:{port}/v1"
        echo(f"serving '{served.name}' ({served.source}) at {where}: eager attention, soft-caps "
             f"{getattr(model.config, 'attn_logit_softcapping', None)}/"
             f"{getattr(model.config, 'final_logit_softcapping', None)}, system policy '{served.system_policy}', "
             f"stops at {', '.join(served.tokenizer.convert_ids_to_tokens(stops))}, "
             + (f"thinking {'on' if served.thinking else 'off'} unless a request sets chat_template_kwargs."
                "enable_thinking, tools and tool calls in Gemma 4's syntax, " if served.gemma4 else "")
             + f"{engine.name}, bodies up to {limit} bytes"
             + ("; API key required" if api_key else ""))
        if served.images is not None:
            echo(f"images: image_url parts as data: URLs (base64, up to {MAX_IMAGE_MB:g} MiB each; no paths, no "
                 f"remote URLs), {served.images.describe()}"
                 + ("; not with continuous batching (serve --no-continuous-batching takes them)"
                    if continuous_batching else ""))
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

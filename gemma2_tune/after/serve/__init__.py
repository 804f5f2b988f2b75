"""`gemma2-tune serve`: a trained run or a merged folder behind an OpenAI-compatible API.

The web layer is FastAPI + uvicorn; generation is transformers' (`engines`: continuous batching by default,
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

The package, by what each module decides:
- `schema.py`: what a request may ask (the strict body schema, refused fields, every check before generation);
- `engines.py`: how generation runs (sequential or continuous batching), and the one place serve reaches below
  transformers' documented API;
- `routes.py`: the HTTP surface (OpenAI's endpoints and error shape, body limits, the API key, streaming);
- `run.py`: `serve` itself: load, check, listen, stop.
"""

from .routes import build_app
from .run import DEFAULT_HOST, serve
from .schema import Checked, Served, check_request, default_max_request_bytes, request_problem

__all__ = ["Checked", "DEFAULT_HOST", "Served", "build_app", "check_request", "default_max_request_bytes",
           "request_problem", "serve"]

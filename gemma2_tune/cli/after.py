"""The commands that use a trained model: chat, eval, merge, merge-models, serve. They parse their options and
delegate to gemma2_tune/after/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config.requests import (EvalRequest, ExportRequest, MergeModelsRequest, MergeRequest,
                               ServeRequest, check)
from ..errors import UserError
from .app import AdapterOpt, LoadInOpt, ModelOpt, command, echo, load_in_value, warn

ThinkingOpt = Annotated[Optional[bool], typer.Option(
    "--enable-thinking/--no-enable-thinking", help="Gemma 4: render with thinking on (<|think|> in the system turn; "
    "the model writes its thought first). Default: as the run trained (data.enable_thinking), else off.")]


@command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One-shot: print only the answer and exit.")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system message (handled by the run's system policy).")] = None,
    load_in: LoadInOpt = "auto",
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    enable_thinking: ThinkingOpt = None,
    image: Annotated[Optional[list[str]], typer.Option(
        "--image", help="An image shown with the (first) message: a local path; repeatable, in order. Image + text "
        "checkpoints (Gemma 3 4B/12B/27B, Gemma 4) only.")] = None,
) -> None:
    """Talk to a fine-tuned model (base from the run unless --model). Interactive with history, or one-shot."""
    from ..after.chat import describe, interactive, one_shot
    from ..after.inference import Sampling, load, read_run, thinking_for

    run = read_run(adapter, model)
    run.require_generating("--adapter" if adapter else "--model")
    loaded = load(run, load_in_value(load_in))
    loaded.thinking = thinking_for(enable_thinking, run, loaded.family)
    sampling = Sampling(max_new_tokens, temperature, top_p)
    note = describe(run, loaded, load_in, sampling)
    if system and system.strip() and run.system_policy == "drop":
        warn("--system: the run was trained with data.system_policy 'drop', so the system message is not sent")
    show_thought = lambda thought: typer.secho(f"(thought) {thought}", err=True, dim=True)  # noqa: E731
    if prompt is not None:
        typer.secho(note, err=True, dim=True)
        echo(one_shot(run, loaded, system, prompt, sampling, on_thought=show_thought, images=image or ()))
        return
    echo(note + "\n/reset clears the history, /exit (or Ctrl-D) leaves"
         + (f"\n{len(image)} image(s) go with your first message" if image else ""))
    interactive(run, loaded, system, sampling, echo, write=lambda piece: typer.echo(piece, nl=False),
                on_thought=show_thought, images=image or ())


@command()
def merge(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="A gemma2-tune run folder (adapter).")],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder for the merged model.")],
    model: ModelOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: the run's "
                                                 "model.dtype).")] = None,
) -> None:
    """Fold the LoRA adapter into the base (safetensors shards) for TGI, vLLM or transformers, self-checked."""
    from ..after.merge import merge as run_merge

    request = check(MergeRequest, {"--adapter": ("adapter", adapter), "--output": ("output", output),
                                   "--model": ("model", model), "--dtype": ("dtype", dtype)}, "merge")
    run_merge(request.adapter, request.output, request.model, request.dtype, echo=echo)


@command("merge-models")
def merge_models_command(
    models: Annotated[list[str], typer.Argument(help="The models to merge: run folders (an adapter is merged into its "
                                                "base first), a run's ema/ folder, merged folders or hub ids.")],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder for the merged model.")],
    method: Annotated[str, typer.Option(help="linear, slerp, ties, dare_ties or task_arithmetic (mergekit).")] = "linear",
    models_flag: Annotated[bool, typer.Option("--models", hidden=True)] = False,  # `--models a b` reads as `a b`
    base: Annotated[Optional[str], typer.Option(help="The initialisation: for ties/dare_ties/task_arithmetic and "
                                                "--liti.")] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="SLERP factor: 0 the first model, 1 the second "
                                               "(default 0.5).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Per-model weights, comma-separated (linear: normalised; "
                                                   "ties/dare/task arithmetic: task-vector scales).")] = None,
    density: Annotated[Optional[float], typer.Option(help="ties/dare_ties: fraction of each task vector kept "
                                                     "(default 0.5).")] = None,
    liti: Annotated[Optional[float], typer.Option(help="Then interpolate towards --base: eta * merged + (1 - eta) * "
                                                  "base (WARP's LITI).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: the inputs' "
                                                 "precision).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random drops.")] = 42,
) -> None:
    """Merge fine-tuned models with mergekit (linear, SLERP, TIES, DARE, task arithmetic), optionally then LITI
    towards the base; the result keeps eager attention, soft-caps and the run's chat template, self-checked."""
    from ..after.merge_models import merge_models

    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {weights}: comma-separated numbers, one per model") from None
    request = check(MergeModelsRequest, {
        "--method": ("method", method), "--models": ("models", models), "--output": ("output", output),
        "--base": ("base", base), "--t": ("t", t), "--weights": ("weights", parsed), "--density": ("density", density),
        "--liti": ("liti", liti), "--dtype": ("dtype", dtype), "--seed": ("seed", seed)}, "merge-models")
    merge_models(request, echo=echo)


@command()
def serve(
    target: Annotated[str, typer.Argument(help="A merged folder, a run folder (its adapter is merged for serving) or "
                                          "a run's ema/ folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="GEMMA2_TUNE_API_KEY",
                                                   help="Require 'Authorization: Bearer <key>' (or set "
                                                   "GEMMA2_TUNE_API_KEY).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model id clients use (default: the folder's name).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    max_request_bytes: Annotated[Optional[int], typer.Option(help="Refuse larger request bodies (413) before "
                                                             "reading them (default: 32 bytes per context token "
                                                             "+ 64 KiB).")] = None,
    continuous_batching: Annotated[bool, typer.Option(help="transformers' continuous batching: concurrent requests "
                                                      "share forward passes (soft-caps kept); per request "
                                                      "max_tokens, temperature and top_p. --no-continuous-batching: "
                                                      "one request at a time, also stop, seed, logit_bias and "
                                                      "frequency_penalty.")] = True,
) -> None:
    """Serve a tuned model behind an OpenAI-compatible API (/v1/chat/completions, streamed or not; /v1/models),
    with the run's chat template and stop tokens; stops cleanly on SIGTERM."""
    from ..after.serve import serve as run_server

    r = check(ServeRequest, {"TARGET": ("target", target), "--host": ("host", host), "--port": ("port", port),
                             "--api-key": ("api_key", api_key), "--name": ("name", name), "--dtype": ("dtype", dtype),
                             "--device": ("device", device), "--max-request-bytes": ("max_request_bytes",
                                                                                     max_request_bytes),
                             "--continuous-batching": ("continuous_batching", continuous_batching)}, "serve")
    run_server(r.target, r.host, r.port, r.api_key, r.name, r.dtype, r.device, echo=echo,
               max_request_bytes=r.max_request_bytes, continuous_batching=r.continuous_batching)


@command()
def export(
    target: Annotated[str, typer.Argument(help="A run folder (its adapter is merged first), a run's ema/ folder, a "
                                          "merged folder or a merge-models output.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The GGUF file to write (FILE.gguf; FILE.export.json "
                                        "and, with --ollama, FILE.Modelfile go beside it).")],
    to: Annotated[str, typer.Option(help="Format: gguf (llama.cpp, Ollama).")] = "gguf",
    quant: Annotated[str, typer.Option(help="llama.cpp type: f16, bf16, f32, q8_0, q4_k_m, q5_k_m, q6_k, ...")] = "f16",
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    ollama: Annotated[bool, typer.Option(help="Also write an Ollama Modelfile (our template, stop at "
                                         "<end_of_turn>).")] = False,
) -> None:
    """Export a tuned model to one GGUF file for llama.cpp and Ollama (pip install 'gemma2-tune[export]'), checked
    (template, stop token, <bos>, soft-caps) and compared with transformers before anything is written."""
    from ..after.export import export as run_export

    r = check(ExportRequest, {"TARGET": ("target", target), "--output": ("output", output), "--to": ("to", to),
                              "--quant": ("quant", quant), "--overwrite": ("overwrite", overwrite),
                              "--ollama": ("ollama", ollama)}, "export")
    run_export(r.target, to=r.to, quant=r.quant, output=r.output, overwrite=r.overwrite, ollama=r.ollama, echo=echo)


@command("eval")
def evaluate_command(
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Held-out chats (any supported source); for a reward model, held-out preference pairs.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks, comma-separated (needs lm-eval).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="data.max_length for the held-out rows (default: the "
                                                       "run's data.max_length, else 1024).")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="Score at most this many rows.")] = None,
    load_in: LoadInOpt = "auto",
    include_path: Annotated[Optional[str], typer.Option(help="Folder of extra lm-eval task YAMLs.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval: examples per task.")] = None,
    compare: Annotated[Optional[list[str]], typer.Option(help="Also score this model on the same rows, in the same "
                                                         "table: a run folder, its ema/, a merged folder or a hub id "
                                                         "(repeatable).")] = None,
    suite: Annotated[Optional[str], typer.Option(help="gemma2-report: the launch post's benchmarks (MMLU, GSM8K, "
                                                 "ARC-c, HellaSwag, Winogrande) with the report's few-shot "
                                                 "settings, beside the published base scores (needs lm-eval).")] = None,
    reward_function: Annotated[Optional[list[str]], typer.Option(
        "--reward-function", help="Score the models' answers to the --dataset prompts with this function, PATH.py:NAME "
        "(TRL's signature, as `rl` takes it; repeatable): its mean per model, instead of the held-out loss.")] = None,
    reward_model: Annotated[Optional[str], typer.Option(
        "--reward-model", help="Score the answers with this reward model too: a `gemma2-tune reward` run or a "
        "one-output sequence-classification folder or hub id.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Rewarded answers: at most this many tokens each.")] = 256,
    temperature: Annotated[float, typer.Option(help="Rewarded answers: 0 = greedy, else sampled at this "
                                               "temperature.")] = 0.0,
    samples: Annotated[int, typer.Option(help="Rewarded answers: answers per prompt (sampled; the same seed "
                                         "for every model).")] = 1,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the loss or reward table to this "
                                                     "JSON file.")] = None,
    enable_thinking: ThinkingOpt = None,
) -> None:
    """Loss/perplexity on model-turn tokens (base vs fine-tuned, and any --compare models), the mean reward of
    their answers (--reward-function/--reward-model), lm-eval tasks, or the Gemma 2 report's benchmark table. For a
    reward model: its pairwise accuracy and margin on --dataset's preference pairs."""
    request = check(EvalRequest, {
        "--dataset": ("dataset", dataset), "--tasks": ("tasks", tasks), "--suite": ("suite", suite),
        "--max-length": ("max_length", max_length), "--max-rows": ("max_rows", max_rows), "--limit": ("limit", limit),
        "--compare": ("compare", compare or []), "--include-path": ("include_path", include_path),
        "--reward-function": ("reward_functions", reward_function or []), "--reward-model": ("reward_model", reward_model),
        "--max-new-tokens": ("max_new_tokens", max_new_tokens), "--temperature": ("temperature", temperature),
        "--samples": ("samples", samples), "--json": ("json_path", str(json_path) if json_path else None),
        "--enable-thinking": ("enable_thinking", enable_thinking)}, "eval")
    from ..after.eval import run_eval
    from ..after.inference import read_run

    run_eval(request, read_run(adapter, model), load_in_value(load_in), model or "model", echo, warn)

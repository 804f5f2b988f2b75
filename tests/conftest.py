"""Shared fixtures: a tiny Gemma 2 (built once per session, locally) and its tokenizer, the same with a SentencePiece
tokenizer. Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails instead of downloading
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# Questions the "answer ok" tests teach on (sft, Gemma 3, distillation).
QUESTIONS = ["What is the time?", "Tell me a story.", "How tall is Everest?", "Name a colour.", "Say something.",
             "Why is the sky blue?", "What is two plus two?", "Where is Paris?", "Who wrote Hamlet?",
             "Is water wet?", "Can fish fly?", "What day is it?", "How are you?", "What is a prime?", "Sing!",
             "Define love."]


@pytest.fixture(scope="session", autouse=True)
def tune_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("gemma2_tune_home")
    os.environ["GEMMA2_TUNE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tune_home) -> Path:
    from gemma2_tune.models.builtin import builtin_path

    return builtin_path("builtin:tiny-gemma2")


@pytest.fixture(scope="session")
def spm_gemma2_dir(tune_home) -> Path:
    """A tiny random Gemma 2 whose tokenizer is SentencePiece like every published Gemma's (tokenizer.model and
    tokenizer.json; models/tiny.py build_tiny_sentencepiece), built once per session. Needs sentencepiece."""
    pytest.importorskip("sentencepiece", reason="needs sentencepiece (the dev or export extra)")
    from gemma2_tune.families import GEMMA2
    from gemma2_tune.models.tiny import build_tiny_sentencepiece

    return build_tiny_sentencepiece(GEMMA2, tune_home / "tiny-gemma2-spm")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from gemma2_tune.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def gemma4():
    """A family with Gemma 4's turn format (its other facts are Gemma 3 text's): the turn format's tests."""
    import dataclasses

    from gemma2_tune.families import GEMMA3_TEXT

    return dataclasses.replace(GEMMA3_TEXT, key="gemma4", display="Gemma 4", model_types=("gemma4",),
                               name_pattern=r"gemma-?4",
                               size_pattern=r"(?<![0-9.])(e2b|e4b|12b|26b-a4b|31b)(?![a-z0-9])",
                               turn_format="gemma4", empty_thought_sizes=("12b", "26b-a4b", "31b"))


@pytest.fixture(scope="session")
def gemma4_tokenizer(gemma4):
    """The tiny tokenizer with Gemma 4's special tokens at their published ids and the generated template."""
    from gemma2_tune.models.tiny import build_tokenizer

    return build_tokenizer(family=gemma4)


@pytest.fixture(scope="session")
def answer_ok_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A QLoRA run of the tiny Gemma 2 taught to answer every question with 'ok' and stop (40 steps, unpacked,
    a quarter of QUESTIONS held out for its eval loss), built once per test session. Tests only read it:
    anything they write goes to their own tmp_path."""
    from typer.testing import CliRunner

    from gemma2_tune.cli import app

    tmp = tmp_path_factory.mktemp("answer-ok")
    data = write_jsonl(tmp / "ok.jsonl", ok_rows(QUESTIONS))
    out = tmp / "okrun"
    r = CliRunner().invoke(app, ["sft", "--recipe", "quickstart-cpu", "--dataset", str(data), "-o", str(out),
                                 "--max-steps", "40", "--set", "data.eval_fraction=0.25", "--set",
                                 "training.eval_steps=20", "--set", "training.logging_steps=5", "--set",
                                 "data.packing=false", "--set", "training.gradient_accumulation_steps=1", "--set",
                                 "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    return out


def ok_rows(questions: list[str]) -> list[dict]:
    """Chats that answer every question with 'ok' (what the "answer ok" tests teach)."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]} for q in questions]


def divergence_from_logprobs(log_ps, log_pt, beta: float):
    """TRL DistillationTrainer's per-position divergence from full log-softmax rows (..., V) of student and teacher:
    forward KL at beta 0, reverse KL at 1, else the generalized JSD with a log-space (logaddexp) mixture."""
    import math

    import torch

    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    return (beta * log_pt.exp() * (log_pt - log_m) + (1 - beta) * log_ps.exp() * (log_ps - log_m)).sum(-1)


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sigterm_after(args: list[str], marker: str, log_path: Path, timeout: float = 600, sig: int | None = None) -> str:
    """Run `python -m gemma2_tune ARGS` from the repository root, send SIGTERM (or `sig`: SIGINT is Ctrl-C) once its
    output shows `marker` (e.g. "step 4/"), and check it ended as an interrupted run does (exit 143). Returns its
    output."""
    import signal
    import subprocess
    import sys
    import time

    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gemma2_tune", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while marker not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(sig or signal.SIGTERM)
        assert proc.wait(timeout=300) == 143, log_path.read_text()[-2000:]
    return log_path.read_text()


def resumed_equals_uninterrupted(args: list[str], tmp_path: Path, marker: str, steps: int) -> tuple[dict, dict]:
    """`gemma2-tune ARGS` run to the end (the reference), then again killed by SIGTERM at `marker` and resumed
    with --resume: both complete `steps` steps and their adapters are equal within 1e-6. Returns (the resumed
    run's run.json, the reference's)."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from gemma2_tune.cli import app

    reference, out = tmp_path / "reference", tmp_path / "run"
    r = CliRunner().invoke(app, [*args, "-o", str(reference)])
    assert r.exit_code == 0, r.output
    sigterm_after([*args, "-o", str(out)], marker, tmp_path / "log.txt")
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    r = CliRunner().invoke(app, [*args, "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    resumed, ref = (json.loads((p / "run.json").read_text()) for p in (out, reference))
    assert resumed["status"] == "completed" and resumed["global_step"] == steps == ref["global_step"]
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (reference, out))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    return resumed, ref


def two_process_run(args: list[str], launch: str, out: Path, steps: int, timeout: float = 1200) -> dict:
    """`python -m gemma2_tune ARGS --launch LAUNCH --num-processes 2 -o OUT` (one thread per process): it must exit
    0 and complete `steps` steps over 2 processes. Returns its run.json."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gemma2_tune", *args, "--launch", launch, "--num-processes", "2", "-o", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["global_step"] == steps and m["launch"]["num_processes"] == 2
    return m


def serve_process(target, log_path: Path, *extra: str, startup_s: float = 240):
    """`gemma2-tune serve TARGET` in a child process on a free port, once /health answers: a context manager
    yielding (process, port, log path); the server is stopped (SIGTERM) on leaving."""
    import contextlib
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    @contextlib.contextmanager
    def running():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gemma2_tune", "serve", str(target), "--port", str(port),
                                     *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=os.environ | {"PYTHONUNBUFFERED": "1"})
            try:
                deadline = time.time() + startup_s
                while True:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                            break
                    except OSError:
                        assert proc.poll() is None, log_path.read_text()
                        assert time.time() < deadline, "server did not come up:\n" + log_path.read_text()
                        time.sleep(0.5)
                yield proc, port, log_path
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=60)

    return running()


# Coloured shapes (images drawn here, no downloads): the task the image tests teach is the shape's colour.
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPE_QUESTION = "What colour is the shape?"


def draw_shape(path: Path, colour: str, shape: str, rng, size: int = 32) -> Path:
    """A `size` x `size` PNG: a filled circle, square or triangle of `colour`, of random size and place, on light
    grey."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=SHAPE_COLOURS[colour])
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=SHAPE_COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=SHAPE_COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def shape_rows(folder: Path, n: int, seed: int) -> list[dict]:
    """`n` chats, colours in turn: an image (a path relative to `folder`, drawn into folder/img/) and the question,
    answered 'Red.', 'Green.' or 'Blue.'."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = list(SHAPE_COLOURS)[i % len(SHAPE_COLOURS)]
        name = f"img/{seed}-{i}.png"
        draw_shape(folder / name, colour, rng.choice(["circle", "square", "triangle"]), rng)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": SHAPE_QUESTION}]},
            {"role": "assistant", "content": colour.capitalize() + "."}]})
    return rows


@pytest.fixture(autouse=True)
def fresh_compiler_for_flex(request):
    """Each flex_attention test starts from a reset torch.compile: after other flex kernels compiled in the same
    process, torch 2.13's CPU flex template generated C++ that does not compile ("cur_qSplitSize4 was not declared"),
    which test depended on the order they ran in (reproduced with tests/e2e/test_attention.py and
    tests/unit/test_multimodal.py in either order)."""
    if "flex" in request.node.name:
        import torch

        torch._dynamo.reset()
    yield

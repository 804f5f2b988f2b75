"""Fine-tuning on conversations with pictures, end to end on the tiny image + text models (local, random towers, real
processors): a full fine-tune of Gemma 3 learns the colour of a drawn shape and answers held-out images right through
`chat --image` and through `serve` with an image_url part, its towers left byte-equal; a QLoRA run of Gemma 4 keeps
LoRA out of the towers, and `merge` keeps the towers and the image processor."""

import base64
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import SHAPE_QUESTION, shape_rows, write_jsonl
from gemma2_tune.cli import app
from gemma2_tune.families import GEMMA3, GEMMA4

pytestmark = pytest.mark.slow
runner = CliRunner()
TRAIN = ["--set", "model.dtype=float32", "--set", "training.gradient_accumulation_steps=1", "--set",
         "training.save_steps=null", "--set", "data.max_length=128", "--set", "training.gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """48 training chats and 9 held-out ones (other shapes, sizes and places), images beside them."""
    folder = tmp_path_factory.mktemp("shapes")
    return (write_jsonl(folder / "train.jsonl", shape_rows(folder, 48, seed=1)),
            write_jsonl(folder / "held_out.jsonl", shape_rows(folder, 9, seed=2)))


def held_out(path):
    """(image path, answer) of each held-out chat."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(str(path.parent / r["messages"][0]["content"][0]["image"]), r["messages"][1]["content"]) for r in rows]


def all_tensors(folder) -> dict:
    """Every tensor of a saved folder, as stored (all its safetensors files)."""
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}


def tower_tensors(folder, family) -> dict:
    """The towers' tensors as a saved folder stores them."""
    prefixes = tuple(t.removeprefix("model.") + "." for t in family.towers)
    return {k: v for k, v in all_tensors(folder).items() if k.removeprefix("model.").startswith(prefixes)}


@pytest.fixture(scope="module")
def gemma3_run(shapes, tmp_path_factory):
    """A full fine-tune of the tiny Gemma 3 image + text model (tower and projector frozen, the default)."""
    train, _ = shapes
    out = tmp_path_factory.mktemp("g3img") / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma3-vision", "--dataset",
                            str(train), "-o", str(out), "--max-steps", "30", "--set", "lora.enabled=false", "--set",
                            "quantization.load_in_4bit=false", "--set", "training.per_device_train_batch_size=4",
                            "--set", "training.learning_rate=3e-3", *TRAIN])
    assert r.exit_code == 0, r.output
    assert "images: 48 in 48 rows" in r.output and "packing: 48 rows with images are blocks of their own" in r.output
    return out


def test_a_full_fine_tune_answers_held_out_images_through_chat_and_serve(gemma3_run, shapes, tune_home):
    from fastapi.testclient import TestClient

    from gemma2_tune.after.serve.engines import SequentialEngine, load_for_serving
    from gemma2_tune.after.serve.routes import build_app
    from gemma2_tune.after.serve.schema import Served
    from gemma2_tune.models.builtin import builtin_path
    from gemma2_tune.models.loading import load_image_processing, load_tokenizer

    m = json.loads((gemma3_run / "run.json").read_text())
    assert m["status"] == "completed" and m["data"]["images"] == 48 and m["data"]["image_tokens"] == 48 * 6
    assert m["training"]["final_loss"] < m["training"]["first_loss"]  # what it learned is judged on held-out rows
    assert (gemma3_run / "processor_config.json").is_file()
    base = tower_tensors(builtin_path("builtin:tiny-gemma3-vision"), GEMMA3)
    trained = tower_tensors(gemma3_run, GEMMA3)
    assert base.keys() == trained.keys() and all(torch.equal(base[k], trained[k]) for k in base)  # never trained

    cases = held_out(shapes[1])
    for image, answer in cases[:3]:  # one of each colour, through the command
        r = runner.invoke(app, ["chat", "--model", str(gemma3_run), "--image", image, "--prompt", SHAPE_QUESTION,
                                "--max-new-tokens", "5"])
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == answer

    served = Served(gemma3_run, "shapes", "fold", GEMMA3, str(gemma3_run))
    model = load_for_serving(gemma3_run, device="cpu")
    served.tokenizer = load_tokenizer(str(gemma3_run))
    served.images = load_image_processing(str(gemma3_run), GEMMA3, served.tokenizer)
    served.context, served.vocab_size = 4096, model.config.get_text_config().vocab_size
    client = TestClient(build_app(served, SequentialEngine(model, served.tokenizer), None))
    answers = []
    for image, _ in cases:
        url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
        r = client.post("/v1/chat/completions", json={"max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": SHAPE_QUESTION}]}]})
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    assert answers == [answer for _, answer in cases]  # every held-out image, never seen in training
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/shape.png"}}, {"type": "text", "text": "?"}]}]})
    assert r.status_code == 400 and "remote image" in r.json()["error"]["message"]

    r = runner.invoke(app, ["eval", "--model", str(gemma3_run), "--dataset", str(shapes[1]), "--compare",
                            "builtin:tiny-gemma3-vision"])
    assert r.exit_code == 0, r.output
    assert "images: 9 in 9 rows" in r.output
    table = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()
             if line.startswith(("model ", "builtin:tiny-gemma3-vision "))}
    loss, tokens = float(table["model"][0]), int(table["model"][2].replace(",", ""))
    # a model that wrote every answer's other tokens right but guessed the colour among the three would lose
    # ln 3 nats on one token per row: the held-out loss must be below that (it read the colours off the images)
    guessing = 9 * math.log(3) / tokens
    assert loss < guessing < float(table["builtin:tiny-gemma3-vision"][0]), (loss, guessing, r.output)


def test_chat_refuses_images_for_text_models_and_unreadable_images(gemma3_run, shapes, tmp_path, answer_ok_run):
    r = runner.invoke(app, ["chat", "--adapter", str(answer_ok_run), "--image", held_out(shapes[1])[0][0], "-p", "?"])
    assert r.exit_code == 2 and "--image: Gemma 2 takes text only" in r.output
    r = runner.invoke(app, ["chat", "--model", str(gemma3_run), "--image", str(tmp_path / "nope.png"), "-p", "?"])
    assert r.exit_code == 2 and f"--image {tmp_path / 'nope.png'}: image {tmp_path / 'nope.png'} does not exist" \
        in r.output


def test_merge_models_merges_two_gemma3_image_runs_decoder_by_the_formula_towers_carried(gemma3_run, shapes, tmp_path,
                                                                                         tune_home):
    """merge-models on image + text runs: a full fine-tune and a QLoRA run (its adapter merged into the base first)
    merged linearly; the decoder is the weighted mean of the two (the LoRA one: base + alpha/r B A), the towers and
    the image processor are the base's, byte-equal, the output is Gemma3ForConditionalGeneration and reads images."""
    from gemma2_tune.models.builtin import builtin_path

    train, held = shapes
    lora = tmp_path / "lora"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma3-vision", "--dataset",
                            str(train), "-o", str(lora), "--max-steps", "3", "--set", "training.learning_rate=1e-2",
                            *TRAIN])
    assert r.exit_code == 0, r.output
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge-models", "--method", "linear", "--weights", "0.7,0.3", "--models", str(gemma3_run),
                            str(lora), "-o", str(merged)])
    assert r.exit_code == 0, r.output
    assert "the towers (39 tensors, equal in every input) are carried from" in r.output, r.output
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert (merged / "processor_config.json").read_bytes() == (gemma3_run / "processor_config.json").read_bytes()
    report = json.loads((merged / "merge.json").read_text())
    assert report["check"]["passed"] and report["towers"]["tower_tensors"] == 39, report
    base = all_tensors(builtin_path("builtin:tiny-gemma3-vision"))
    got, full = all_tensors(merged), all_tensors(gemma3_run)
    assert got.keys() == base.keys()
    towers = tower_tensors(merged, GEMMA3)
    assert towers and all(torch.equal(towers[k], base[k]) for k in towers)
    adapter = load_file(str(lora / "adapter_model.safetensors"))
    config = json.loads((lora / "adapter_config.json").read_text())
    name = "language_model.model.layers.1.self_attn.q_proj.weight"
    a, b = (next(v for k, v in adapter.items() if ".layers.1.self_attn.q_proj.lora_" + x in k) for x in "AB")
    lora_q = base[name] + config["lora_alpha"] / config["r"] * b @ a
    assert not torch.allclose(lora_q, base[name])  # the adapter moved it
    assert torch.allclose(got[name], 0.7 * full[name] + 0.3 * lora_q, atol=1e-6), (got[name] - 0.7 * full[name]
                                                                                      - 0.3 * lora_q).abs().max()
    image, _ = held_out(held)[0]
    r = runner.invoke(app, ["chat", "--model", str(merged), "--image", image, "-p", SHAPE_QUESTION,
                            "--max-new-tokens", "5"])
    assert r.exit_code == 0 and r.stdout.strip(), r.output


def test_gemma4_qlora_keeps_lora_out_of_the_towers_and_merge_keeps_towers_and_processor(shapes, tmp_path, tune_home):
    from gemma2_tune.models.builtin import builtin_path

    train, held = shapes
    out = tmp_path / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma4", "--dataset",
                            str(train), "-o", str(out), "--max-steps", "12", "--set",
                            "training.per_device_train_batch_size=2", "--set", "training.learning_rate=1e-2", *TRAIN])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["model"]["family"] == "gemma4" and m["data"]["images"] == 48
    assert m["model"]["quantization"]["load_in_4bit"] and m["training"]["first_loss"] > m["training"]["final_loss"] + 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"].startswith(r"model\.language_model\.layers")
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(".language_model.layers." in k for k in keys)
    assert (out / "processor_config.json").is_file()
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--dataset", str(held), "--compare", "builtin:tiny-gemma4"])
    assert r.exit_code == 0, r.output
    table = {line.split()[0]: float(line.split()[1]) for line in r.output.splitlines()
             if line.startswith(("base ", "fine-tuned ", "builtin:tiny-gemma4 "))}
    assert "images: 9 in 9 rows" in r.output, r.output
    assert table["fine-tuned"] < min(table["base"], table["builtin:tiny-gemma4"]), r.output

    image = held_out(held)[0][0]
    # 20 tokens: 12 steps teach the answer's form, not yet its first tokens (blank); the merge must keep them all
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--image", image, "-p", SHAPE_QUESTION,
                            "--max-new-tokens", "20"])
    assert r.exit_code == 0, r.output
    adapter_answer = r.stdout.strip()
    assert adapter_answer, r.output
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert json.loads((merged / "processor_config.json").read_text()) == json.loads(
        (out / "processor_config.json").read_text())
    base = tower_tensors(builtin_path("builtin:tiny-gemma4"), GEMMA4)
    kept = tower_tensors(merged, GEMMA4)
    assert base.keys() == kept.keys() and all(torch.equal(base[k], kept[k]) for k in base)
    r = runner.invoke(app, ["chat", "--model", str(merged), "--image", image, "-p", SHAPE_QUESTION,
                            "--max-new-tokens", "20"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == adapter_answer

    # merge-models on Gemma 4 (mergekit infers its decoder): task arithmetic from the base, the towers carried
    half = tmp_path / "half"
    r = runner.invoke(app, ["merge-models", "--method", "task_arithmetic", "--models", str(merged), "--weights", "0.5",
                            "--base", "builtin:tiny-gemma4", "-o", str(half)])
    assert r.exit_code == 0, r.output
    assert json.loads((half / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]
    start, tuned, got = (all_tensors(f) for f in (builtin_path("builtin:tiny-gemma4"), merged, half))
    assert got.keys() == start.keys() and all(torch.equal(got[k], start[k]) for k in base)
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(tuned[name], start[name])
    assert torch.allclose(got[name], start[name] + 0.5 * (tuned[name] - start[name]), atol=1e-6)
    r = runner.invoke(app, ["chat", "--model", str(half), "--image", image, "-p", SHAPE_QUESTION,
                            "--max-new-tokens", "5"])
    assert r.exit_code == 0 and r.stdout.strip(), r.output


def build_spm_gemma3_vision(path):
    """A tiny Gemma 3 image + text model llama.cpp's converter reads: a SentencePiece tokenizer holding the image
    markers, the published 5 local : 1 global layer pattern (llama.cpp's Gemma 3 assumes it), a random projector, its
    image processor (32x32 pixels, 4 soft tokens)."""
    from gemma2_tune.models.tiny import build_tiny_sentencepiece

    return build_tiny_sentencepiece(GEMMA3, path, num_hidden_layers=6,
                                    layer_types=["sliding_attention"] * 5 + ["full_attention"])


@pytest.mark.export  # slow: the module's mark (two conversions)
def test_export_writes_the_projector_file_and_an_image_prompt_generates_as_in_transformers(tmp_path, tune_home):
    """An image + text Gemma 3 folder with its image processor exports its decoder (parity on text prompts) and
    llama.cpp's projector file (mmproj) beside it, whose metadata matches the folder's tower and processor, whose
    soft-token embeddings of a drawn image equal transformers' (f16 rounding), and with which an image prompt
    generated through llama.cpp (libmtmd) has transformers' prompt tokens, greedy tokens and logits. A processor at
    another resolution than the tower's is refused, the earlier export left as it was."""
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    from gemma2_tune.after.export import read_metadata

    folder = build_spm_gemma3_vision(tmp_path / "vision")
    out = tmp_path / "out" / "mm.gguf"
    r = runner.invoke(app, ["export", str(folder), "-o", str(out)])
    assert r.exit_code == 0, r.output
    projector = out.parent / "mm.mmproj.gguf"
    assert f"projector: {projector}" in r.output and "not checked" not in r.output, r.output
    assert "projector parity (cosine similarity >= 0.99): 4 soft tokens of a 32x32 drawn test image" in r.output
    assert "image prompt parity (prompt tokens equal, the first 8 greedy tokens equal" in r.output
    meta = read_metadata(projector)
    assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "gemma3"
    config = json.loads((folder / "config.json").read_text())
    assert meta["clip.vision.image_size"] == 32 and meta["clip.vision.projection_dim"] == config["text_config"]["hidden_size"]
    report = json.loads((out.parent / "mm.export.json").read_text())
    assert report["parity"]["passed"] and report["projector"]["written"], report
    assert report["projector"]["file"] == projector.name and report["projector"]["tensors"] > 0
    assert all(c["passed"] for c in report["projector"]["checks"]) and len(report["projector"]["checks"]) == 11
    embeddings = report["projector"]["image_embeddings"]
    assert embeddings["passed"] and embeddings["tokens_llama_cpp"] == embeddings["tokens_transformers"] == 4
    assert embeddings["min_cosine"] > 0.999 and 0 < embeddings["max_abs_diff"] < 0.01 * embeddings["max_abs_value"]
    prompt = report["projector"]["image_prompt"]
    assert prompt["passed"] and prompt["prompt_ids_equal"] and prompt["soft_tokens_llama_cpp"] == 4, prompt
    assert prompt["greedy_tokens_compared"] == 8 and prompt["llama_cpp_continuation"] == prompt["transformers_continuation"]
    assert 0 < prompt["max_abs_logit_diff"] < 0.01 * prompt["image_effect_max_abs_logit_diff"], prompt
    assert report["projector"]["not_checked"] is None
    text_only = read_metadata(out)
    assert not any(k.startswith("clip.") for k in text_only)  # the decoder's file carries no tower

    # a damaged projector file: its embeddings of the image, then the logits after it, are caught
    from gemma2_tune.after.image_prompt import check_image_prompt
    from gguf import GGUFReader

    damaged = tmp_path / "damaged.mmproj.gguf"
    damaged.write_bytes(projector.read_bytes())
    reader = GGUFReader(str(damaged), "r+")
    tensor = next(t for t in reader.tensors if t.name == "mm.input_projection.weight")
    tensor.data[...] = 0
    reader.data.flush()
    (tmp_path / "work").mkdir()
    failed = check_image_prompt(out, damaged, folder, GEMMA3, "fold", tmp_path / "work")
    assert not failed["passed"] and "logits after the image differ from transformers'" in failed["failure"], failed

    processor = json.loads((folder / "processor_config.json").read_text())
    processor["image_processor"]["size"] = {"height": 64, "width": 64}
    (folder / "processor_config.json").write_text(json.dumps(processor))
    before = {f.name: f.read_bytes() for f in out.parent.iterdir()}
    r = runner.invoke(app, ["export", str(folder), "-o", str(out), "--overwrite"])
    assert r.exit_code == 2 and "image size (processor): 32 (expected 64)" in r.output, r.output
    assert {f.name: f.read_bytes() for f in out.parent.iterdir()} == before  # the earlier export left whole

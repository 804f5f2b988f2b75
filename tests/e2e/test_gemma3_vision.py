"""Gemma 3 image + text checkpoints (4B/12B/27B: Gemma3ForConditionalGeneration) end to end on the tiny one
(local, random, a 2-layer SigLIP tower): a text fine-tune learns a style and stops, its LoRA lives in the language
model only, merge writes the checkpoint's own class with the towers byte-equal to the base's (images still go
through them), a full fine-tune leaves the towers untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import QUESTIONS, write_jsonl
from gemma2_tune.cli import app
from gemma2_tune.families import GEMMA3

runner = CliRunner()
# the towers' tensors as checkpoints store them (transformers writes Gemma 3's original key names: vision_tower.*,
# multi_modal_projector.*, language_model.model.*)
TOWERS = tuple(f"{t.removeprefix('model.')}." for t in GEMMA3.towers)
Q_PROJ = "language_model.model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "language_model.model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def base_dir(tune_home):
    from gemma2_tune.models.builtin import builtin_path

    return builtin_path("builtin:tiny-gemma3-vision")


@pytest.fixture(scope="module")
def ok_run(tmp_path_factory, base_dir):
    """A QLoRA run of the tiny Gemma 3 image + text model (packed rows, system messages folded, float32 so the
    merge is in the base's precision) taught to answer 'ok'."""
    tmp = tmp_path_factory.mktemp("g3vok")
    rows = [{"messages": ([{"role": "system", "content": "Answer briefly."}] if i % 2 else [])
             + [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp / "ok.jsonl", rows)
    out = tmp / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma3-vision", "--dataset",
                            str(data), "-o", str(out), "--max-steps", "40", "--set", "data.max_length=64", "--set",
                            "model.dtype=float32", "--set", "training.gradient_accumulation_steps=1", "--set",
                            "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    return out, tmp


@pytest.mark.slow
def test_text_fine_tune_learns_and_stops_with_lora_only_in_the_language_model(ok_run):
    out, _ = ok_run
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["model"]["family"] == "gemma3-vision"
    assert m["training"]["first_loss"] > m["training"]["final_loss"] + 3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"].startswith(r"model\.language_model\.layers")
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert len(keys) == 4 * 4 * 2 and all(".language_model.layers." in k for k in keys)  # 4 layers x q/k/v/o x A/B
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", "What is the weather like?",
                            "--system", "Answer briefly.", "--max-new-tokens", "30"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "ok"


@pytest.mark.slow
def test_merge_keeps_the_towers_byte_equal_and_images_still_work(ok_run, base_dir, tmp_path):
    out, tmp = ok_run
    held = write_jsonl(tmp / "held.jsonl", [{"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": "ok"}]}
                                           for q in ["Is it late?", "Do cats purr?", "What is blue?"]])
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--dataset", str(held)])
    assert r.exit_code == 0, r.output
    losses = {line.split()[0]: float(line.split()[1]) for line in r.output.splitlines()
              if line.startswith(("base", "fine-tuned"))}
    assert losses["fine-tuned"] < losses["base"] - 2.0, r.output
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    base, after = load_file(str(base_dir / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    towers = [k for k in base if k.startswith(TOWERS)]
    assert towers and sorted(k for k in after if k.startswith(TOWERS)) == sorted(towers)
    assert all(after[k].dtype == base[k].dtype and torch.equal(after[k], base[k]) for k in towers)
    assert not torch.equal(after[Q_PROJ], base[Q_PROJ])  # the adapter went into the decoder
    # images still go through the tower: the merged model's image features are the base's, and an image prompt runs
    from transformers import AutoModelForImageTextToText

    models = [AutoModelForImageTextToText.from_pretrained(p, dtype=torch.float32).eval() for p in (base_dir, merged)]
    config = models[1].config
    pixels = torch.rand(1, 3, config.vision_config.image_size, config.vision_config.image_size,
                        generator=torch.Generator().manual_seed(0))
    image = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image + [config.eoi_token_index]
    ids = torch.tensor([[2, 40, 41, *image, 42, 43]])
    token_types = (ids == config.image_token_index).long()
    with torch.no_grad():
        features = [m.get_image_features(pixel_values=pixels).pooler_output for m in models]
        logits = models[1](input_ids=ids, pixel_values=pixels, token_type_ids=token_types).logits
    assert torch.equal(features[0], features[1]) and torch.isfinite(logits).all()
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(merged))
    answer = pipe([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How is the weather?"}],
                  max_new_tokens=20, do_sample=False)
    assert answer[0]["generated_text"][-1]["content"].strip() == "ok"


@pytest.mark.slow
def test_full_fine_tuning_with_sdpa_leaves_the_towers_untouched(tmp_path, base_dir):
    out = tmp_path / "full"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma3-vision", "-o", str(out),
                            "--max-steps", "3", "--set", "quantization.load_in_4bit=false", "--set", "lora.enabled=false",
                            "--set", "model.attn_implementation=sdpa", "--set", "model.dtype=float32", "--set",
                            "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    base, after = load_file(str(base_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    towers = sum(t.numel() for k, t in base.items() if k.startswith(TOWERS))
    assert m["model"]["attn_implementation"] == "sdpa"
    assert m["model"]["trainable_params"] == m["model"]["total_params"] - towers  # the decoder trains
    assert all(torch.equal(after[k], base[k]) for k in base if k.startswith(TOWERS))
    assert not torch.equal(after[UP_PROJ], base[UP_PROJ])
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert saved["use_cache"] is saved["text_config"]["use_cache"] is True  # training turned both off


@pytest.mark.slow
@pytest.mark.export
def test_the_decoder_exports_to_gguf_and_passes_parity(tmp_path):
    """llama.cpp's converter takes Gemma3ForConditionalGeneration's decoder (the image tower's projector file is
    the images step's): a tiny image + text model with Gemma 3's published 5 : 1 layers and a SentencePiece
    tokenizer exports as `gemma3` with its metadata checked and the f16 parity bound passed."""
    pytest.importorskip("llama_cpp", reason="needs the export extra: pip install 'gemma2-tune[export]'")
    import shutil

    from test_export import build_spm_gemma3_vision

    from gemma2_tune.after.export import read_metadata

    model, tokenizer, text = build_spm_gemma3_vision(tmp_path)  # no image token in its vocabulary: none is given
    folder = tmp_path / "tiny-gemma3-vision-spm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name in ("tokenizer.model", "complete.json"):  # llama.cpp reads the SentencePiece model; no Gemma terms
        shutil.copy(text / name, folder / name)
    out = tmp_path / "out" / "mm.gguf"
    r = runner.invoke(app, ["export", str(folder), "-o", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    assert meta["general.architecture"] == "gemma3" and meta["gemma3.block_count"] == 6
    report = json.loads((out.parent / "mm.export.json").read_text())
    assert report["family"] == "gemma3-vision" and report["parity"]["passed"], report["parity"]
    assert all(p["prompt_ids_equal"] and p["greedy_equal"] for p in report["parity"]["prompts"])
    assert all(c["passed"] for c in report["checks"]), report["checks"]

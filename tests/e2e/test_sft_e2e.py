"""End to end on CPU: the real command, a tiny Gemma 2, real bitsandbytes 4-bit, a few optimizer steps."""

import json
import math

import pytest
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import ROOT
from gemma2_tune.cli import app

ROOT_QUICKSTART = ROOT / "gemma2_tune" / "assets" / "quickstart" / "messages.jsonl"

pytestmark = pytest.mark.slow
runner = CliRunner()
EXPECTED_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "config.yaml", "loss.png",
    "run.json", "tokenizer.json", "tokenizer_config.json", "training_args.bin",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("runs") / "quick"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--max-steps", "16",
                            "--set", "training.logging_steps=1"])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_output_files_exactly(run_dir):
    out, _ = run_dir
    # the trainer also checkpoints the last step (resumable, marked complete)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES | {"checkpoint-16"}
    assert (out / "checkpoint-16" / "complete.json").is_file()


def test_adapter_targets_and_rank(run_dir):
    out, _ = run_dir
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        modules = {k.split(".")[-3] for k in keys}
        assert modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert len(keys) == 4 * 4 * 2  # 4 layers x 4 projections x (A, B)
        a = next(k for k in keys if k.endswith("q_proj.lora_A.weight"))
        assert f.get_tensor(a).shape[0] == 16


def test_manifest_records_what_happened(run_dir):
    out, output = run_dir
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["global_step"] == 16
    assert m["model"]["attn_implementation"] == "eager"
    assert (m["model"]["attention_softcap"], m["model"]["final_softcap"]) == (50.0, 30.0)
    assert m["model"]["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert m["versions"]["transformers"] and m["versions"]["bitsandbytes"]
    assert m["dataset"]["name"] == "quickstart" and len(m["dataset"]["fingerprint"]) == 16
    d = m["data"]
    assert (d["rows_read"], d["rows_kept"], d["rows_bad"]) == (36, 35, 1)
    assert 0 < d["supervised_tokens"] < d["total_tokens"]
    # LoRA r=16 on 4 layers of tiny-gemma2 (hidden 64, 4 query heads and 2 key/value heads of 16):
    # q and o 16 x (64 + 64), k and v 16 x (64 + 32) each: 7,168 per layer
    assert m["model"]["trainable_params"] == 28_672 and m["wall_time_s"] > 0
    t = m["throughput"]
    assert t["supervised_tokens_trained"] > 0 and t["supervised_tokens_counted"] == "exact"
    assert t["supervised_tokens_per_s"] > 0 and t["peak_memory_bytes"] > 0 and 0 <= t["padding_fraction"] < 1
    assert m["data"]["packing"] is True and m["loss_implementation"] == "supervised_chunked"
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["max_steps"] == 16
    assert "trainable params" in output and "eager" in output


def test_loss_is_finite_and_falls(run_dir):
    out, _ = run_dir
    losses = [e["loss"] for e in json.loads((out / "run.json").read_text())["training"]["loss_history"]]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, losses


def test_adapter_loads_with_plain_peft_and_generates(run_dir, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run_dir
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids.shape[1]


def test_a_second_run_refuses_then_overwrites(run_dir, tmp_path):
    out = tmp_path / "again"
    args = ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--max-steps", "1"]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "run.json").read_text()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "run.json").read_text() == before
    r = runner.invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0 and json.loads((out / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("sets,weights_file", [
    (["quantization.load_in_4bit=false"], "adapter_model.safetensors"),  # bf16 LoRA, no 4-bit
    (["quantization.load_in_4bit=false", "lora.enabled=false"], "model.safetensors"),  # full fine-tuning
], ids=["lora-bf16", "full"])
def test_other_modes_train_and_save_loadable_weights(tmp_path, tiny_model_dir, sets, weights_file):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--max-steps", "3"]
    for s in sets:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / weights_file).is_file()
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["model"]["quantization"] is None
    if weights_file == "model.safetensors":
        model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
        assert model.config.model_type == "gemma2" and model.config.final_logit_softcapping == 30.0
        assert m["model"]["trainable_params"] == m["model"]["total_params"]


def test_a_run_refused_before_training_does_not_block_its_rerun(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:1000])  # a download cut short
    out = tmp_path / "run"
    args = ["sft", "--recipe", "quickstart-cpu", "--model", str(model), "-o", str(out), "--max-steps", "1",
            "--set", "training.save_steps=null"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "could not load the weights" in r.output
    failed = json.loads((out / "run.json").read_text())
    assert failed["status"] == "failed" and not failed.get("global_step")
    (model / "model.safetensors").write_bytes(weights)
    r = runner.invoke(app, args)  # the same command, the model fixed: no --overwrite needed
    assert r.exit_code == 0, r.output
    assert "replacing the previous run" in r.output and "failed before its first optimizer step" in r.output
    r = runner.invoke(app, args)  # this one trained: it is kept unless --overwrite
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_a_run_that_failed_after_training_steps_is_kept(tmp_path):
    from gemma2_tune.training.manifest import check_output_dir, write_manifest

    out = tmp_path / "run"
    out.mkdir()
    write_manifest(out, {"status": "failed", "global_step": 7, "error": "RuntimeError: out of memory"})
    with pytest.raises(Exception, match="--overwrite"):
        check_output_dir(out, overwrite=False)
    write_manifest(out, {"status": "failed", "error": "RuntimeError: x"})
    (out / "checkpoint-5").mkdir()
    with pytest.raises(Exception, match="--overwrite"):
        check_output_dir(out, overwrite=False)


def test_a_run_failing_mid_training_records_its_step_and_is_kept(tmp_path, monkeypatch):
    from gemma2_tune.training.callbacks import StopOnSignal

    def crash(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("simulated crash at step 2")
        return control

    monkeypatch.setattr(StopOnSignal, "on_step_end", crash)
    out = tmp_path / "run"
    args = ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--max-steps", "4", "--set", "training.save_steps=null"]
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "failed" and m["global_step"] == 2 and "simulated crash" in m["error"]
    monkeypatch.undo()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_an_output_folder_that_is_an_input_is_refused_even_with_overwrite(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    data = tmp_path / "runs" / "chats.jsonl"
    data.parent.mkdir()
    shutil.copy(ROOT_QUICKSTART, data)
    for out, key in ((model, "model.name_or_path"), (data.parent, "data.dataset")):
        for extra in ([], ["--dry-run"]):
            r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", str(model), "--dataset", str(data),
                                    "-o", str(out), "--overwrite", "--max-steps", "1", *extra])
            assert r.exit_code == 2 and "is, or holds, an input of this run" in r.output and key in r.output
    assert sorted(p.name for p in model.iterdir()) == before and data.is_file()

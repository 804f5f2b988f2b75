"""Folding accumulation into the micro-batch: same items per step, same gradient (fp32, CPU, 1e-5)."""

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.config.layering import resolve
from gemma2_tune.families import GEMMA2
from gemma2_tune.training.batching import micro_batch
from gemma2_tune.training.launch import Launch
from gemma2_tune.config.memory import GIB

GEMMA2_9B = GEMMA2.shapes["9b"]


def test_the_choice_follows_the_setting_and_the_memory_model():
    cfg = resolve("gemma-2-9b-qlora").config  # batch 1 x accumulation 4, 1024 tokens
    single = Launch("single")
    assert micro_batch(cfg, GEMMA2_9B, single, None).folded == 1  # auto without a GPU: as configured
    big = micro_batch(cfg, GEMMA2_9B, single, 80 * GIB)
    assert (big.per_device, big.accumulation, big.folded) == (4, 1, 4) and "plan estimates" in big.reason
    small = micro_batch(cfg, GEMMA2_9B, single, 10 * GIB)  # only the unfolded step fits a 10 GiB card
    assert small.folded < 4
    on = resolve("gemma-2-9b-qlora", ["training.fold_accumulation=true"]).config
    assert micro_batch(on, GEMMA2_9B, single, None).per_device == 4
    off = resolve("gemma-2-9b-qlora", ["training.fold_accumulation=false"]).config
    assert micro_batch(off, GEMMA2_9B, single, 80 * GIB).folded == 1


@pytest.mark.slow
def test_a_folded_step_gives_the_accumulated_gradient(tmp_path, tiny_model_dir):
    """Two fp32 runs, identical but for folding, end with the same adapter (dropout off, 3 optimizer steps)."""
    adapters = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        r = CliRunner().invoke(app, [
            "sft", "--recipe", "quickstart-cpu", "-o", str(out), "--max-steps", "3",
            "--set", "model.dtype=float32", "--set", "quantization.load_in_4bit=false", "--set", "lora.dropout=0",
            "--set", "training.gradient_accumulation_steps=4", "--set", "data.max_length=64",
            "--set", f"training.fold_accumulation={mode}", "--set", "training.save_steps=null"])
        assert r.exit_code == 0, r.output
        record = json.loads((out / "run.json").read_text())["micro_batch"]
        assert record["per_device"] == (4 if mode == "true" else 1) and "running: micro-batch" in r.output
        adapters[mode] = load_file(out / "adapter_model.safetensors")
    worst = max((adapters["true"][k] - adapters["false"][k]).abs().max().item() for k in adapters["false"])
    moved = max((adapters["false"][k]).abs().max().item() for k in adapters["false"] if "lora_B" in k)
    assert moved > 1e-4  # the adapters trained (LoRA B starts at zero)
    print(f"folded vs accumulated adapters: max |difference| {worst:.2e} (adapter scale {moved:.2e})")
    assert worst <= 1e-5, worst

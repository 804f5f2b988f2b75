"""training.torch_compile=regional: compiled decoder layers train like the plain model (fp32, CPU), the probe
check runs and is recorded, and a compile that changed the numerics would stop the run."""

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from gemma2_tune.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
# fp32 LoRA (no 4-bit), so the comparison is tight; no dropout (compiled code draws its masks from another
# generator: the same distribution, other masks)
RUN = ["sft", "--recipe", "quickstart-cpu", "--max-steps", "3", "--set", "model.dtype=float32", "--set", "lora.dropout=0",
       "--set", "quantization.load_in_4bit=false", "--set", "training.save_steps=null",
       "--set", "training.logging_steps=1"]


def test_regional_compile_trains_like_the_plain_model(tmp_path, tiny_model_dir):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    r = runner.invoke(app, [*RUN, "-o", str(plain)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*RUN, "-o", str(compiled), "--set", "training.torch_compile=regional"])
    assert r.exit_code == 0, r.output
    assert "compiled 4 decoder layers" in r.output
    record = json.loads((compiled / "run.json").read_text())["compiled"]
    assert record["compiled_layers"] == 4 and record["probe_max_abs_logit_diff"] <= 1e-4
    assert record["probe_max_rel_grad_diff"] <= 1e-4
    a = load_file(str(plain / "adapter_model.safetensors"))
    b = load_file(str(compiled / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5  # the same three optimizer steps
    assert (b[next(k for k in b if "lora_B" in k)].abs().max() > 0)  # and they did train


def test_a_compiled_model_that_changes_the_logits_is_refused(monkeypatch, tiny_model_dir):
    import torch

    from gemma2_tune.errors import UserError
    from gemma2_tune.models.loading import LoadRequest, load_model
    from gemma2_tune.training import compiling

    model, _ = load_model(LoadRequest(str(tiny_model_dir), dtype="float32"))
    layer = compiling.decoder_layers(model)[0]
    original = type(layer).forward

    def skewed(self, hidden_states, *args, **kwargs):  # what a miscompiled kernel would do
        out = original(self, hidden_states, *args, **kwargs)
        if torch.compiler.is_compiling():
            out = out + 0.5 if isinstance(out, torch.Tensor) else (out[0] + 0.5, *out[1:])
        return out

    monkeypatch.setattr(type(layer), "forward", skewed)
    with pytest.raises(UserError, match="the compiled model's logits moved by"):
        compiling.compile_layers(model, "float32")


def test_a_compiled_model_whose_backward_differs_is_refused(monkeypatch, tiny_model_dir):
    import torch

    from gemma2_tune.errors import UserError
    from gemma2_tune.models.loading import LoadRequest, load_model
    from gemma2_tune.training import compiling

    from test_kernels import _ScaledBackward as ScaledBackward  # identity forward, gradients x1.5

    model, _ = load_model(LoadRequest(str(tiny_model_dir), dtype="float32"))
    layer = compiling.decoder_layers(model)[0]
    original = type(layer).forward

    def wrong_backward(self, hidden_states, *args, **kwargs):  # right logits, wrong gradients, only compiled
        out = original(self, hidden_states, *args, **kwargs)
        if torch.compiler.is_compiling():
            out = ScaledBackward.apply(out) if isinstance(out, torch.Tensor) else (ScaledBackward.apply(out[0]),
                                                                                     *out[1:])
        return out

    monkeypatch.setattr(type(layer), "forward", wrong_backward)
    with pytest.raises(UserError, match="the compiled model's logits moved by .* and its gradients by") as caught:
        compiling.compile_layers(model, "float32")
    logits = float(str(caught.value).split("logits moved by ")[1].split(" ")[0])
    assert logits <= 1e-3  # the forward alone would have passed: the gradients are what the check caught


def test_regional_compile_is_refused_under_zero3(tmp_path):
    r = runner.invoke(app, [*RUN, "-o", str(tmp_path / "r"), "--set", "training.torch_compile=regional",
                            "--launch", "zero3", "--dry-run"])
    assert r.exit_code == 2 and "training.torch_compile" in r.output

"""training.use_liger_kernel: refused where it cannot run (before loading), and the probe check that guards it
accepts an equivalent kernel and refuses one that changes the logits or only the gradients. Liger itself runs
on CUDA only: its equivalence test skips here, with the reason."""

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.errors import UserError
from gemma2_tune.families import GEMMA2
from gemma2_tune.training import kernels

runner = CliRunner()
HAVE_LIGER_GPU = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def lora_model(model_dir, device="cpu"):
    """The tiny Gemma 2 in fp32 with LoRA on q/k/v/o, B initialised non-zero so every LoRA weight has a gradient."""
    from peft import LoraConfig, get_peft_model

    from gemma2_tune.models.loading import LoadRequest, load_model

    model, _ = load_model(LoadRequest(str(model_dir), dtype="float32"))
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, config).to(device)


def gemma_rms_norm(self, x):
    """Gemma's RMSNorm written out: fp32, scaled by (1 + weight), cast back."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (normed * (1.0 + self.weight.float())).type_as(x)


def patch_norms(forward):
    def patch(model):
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = forward.__get__(module)
    return patch


class _ScaledBackward(torch.autograd.Function):
    """The identity forward, gradients x1.5: a kernel whose forward is right and whose backward is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.5


def test_an_equivalent_kernel_passes_the_probe_and_is_recorded(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    record = kernels.apply_checked(model, patch_norms(gemma_rms_norm), "float32", "training.use_liger_kernel")
    assert record["probe_max_abs_logit_diff"] <= 1e-5 and record["probe_max_rel_grad_diff"] <= 1e-5
    assert record["logit_tolerance"] == 1e-3
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


def test_a_kernel_that_drops_gemmas_norm_offset_is_refused(tiny_model_dir):
    def without_offset(self, x):  # the Llama RMSNorm: weight, not (1 + weight)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)

    with pytest.raises(UserError, match="training.use_liger_kernel: the patched model's logits moved"):
        kernels.apply_checked(lora_model(tiny_model_dir), patch_norms(without_offset), "float32",
                              "training.use_liger_kernel")


class _NaNBackward(_ScaledBackward):
    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_kernel_whose_backward_gives_nan_is_refused(tiny_model_dir):
    def nan_backward(self, x):
        return _NaNBackward.apply(gemma_rms_norm(self, x))

    with pytest.raises(UserError, match="gradients by nan"):
        kernels.apply_checked(lora_model(tiny_model_dir), patch_norms(nan_backward), "float32",
                              "training.use_liger_kernel")


def test_a_model_that_is_not_finite_before_any_patch_is_named_as_such(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    with torch.no_grad():
        kernels.base_model(model).model.norm.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="the plain model's logits or gradients on a probe batch are not finite"):
        kernels.apply_checked(model, patch_norms(gemma_rms_norm), "float32", "training.use_liger_kernel")


def test_the_probe_compares_the_first_layers_weights_only():
    holder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])})
    first = holder["layers"][0]
    assert [id(p) for p in kernels.probed_weights(holder)] == [id(first.weight), id(first.bias)]
    first.requires_grad_(False)  # nothing trainable there: every trainable weight
    assert len(kernels.probed_weights(holder)) == 2 and kernels.probed_weights(holder)[0] is holder["layers"][1].weight


def test_a_kernel_with_a_wrong_backward_only_is_refused(tiny_model_dir):
    def wrong_backward(self, x):
        return _ScaledBackward.apply(gemma_rms_norm(self, x))

    with pytest.raises(UserError, match=r"gradients by [0-9.]+ of the largest") as caught:
        kernels.apply_checked(lora_model(tiny_model_dir), patch_norms(wrong_backward), "float32",
                              "training.use_liger_kernel")
    assert "logits moved by 0 " in str(caught.value)  # the forward alone would have passed


def full_logits_loss(softcap):
    """The reference a fused loss must equal: full soft-capped logits, cross-entropy summed (fp32)."""
    def loss(weight, hidden, targets):
        z = hidden.float() @ weight.float().t()
        z = softcap * torch.tanh(z / softcap) if softcap else z
        return torch.nn.functional.cross_entropy(z, targets, reduction="sum")
    return loss


def test_a_fused_loss_equal_to_the_tiles_passes_its_probe_and_is_used():
    from gemma2_tune.training.loss import supervised_loss_sum

    weight = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    record = kernels.check_fused_loss(full_logits_loss(30.0), weight, 30.0, "float32", "training.loss")
    assert record["probe_rel_loss_diff"] <= 1e-6 and record["probe_max_rel_grad_diff"] <= 1e-5
    hidden = torch.randn(2, 9, 32)
    labels = torch.randint(0, 300, (2, 9))
    labels[0, :4] = -100
    tiled, n = supervised_loss_sum(hidden, labels, weight, 30.0)
    fused, m = supervised_loss_sum(hidden, labels, weight, 30.0, fused=full_logits_loss(30.0))
    assert n == m == 2 * 8 - 3 and abs(tiled.item() - fused.item()) <= 1e-4 * tiled.item()


@pytest.mark.parametrize("std", [0.03, 3.0])  # lm_head weights small or large: the probe's logits reach the cap
def test_a_fused_loss_that_drops_the_final_softcap_is_refused(std):
    weight = std * torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UserError, match="training.loss=supervised_liger: the fused loss differs"):
        kernels.check_fused_loss(full_logits_loss(None), weight, 30.0, "bfloat16", "training.loss=supervised_liger")


@pytest.mark.skipif(HAVE_LIGER_GPU, reason="this machine can run Liger")
@pytest.mark.parametrize("setting", ["training.use_liger_kernel=true", "training.loss=supervised_liger"])
def test_liger_is_refused_before_loading_where_it_cannot_run(tmp_path, setting):
    out = tmp_path / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--max-steps", "1", "-o", str(out),
                            "--set", setting])
    assert r.exit_code == 2, r.output
    assert f"{setting.split('=true')[0]}:" in r.output
    assert "no CUDA GPU" in r.output or "not installed" in r.output
    assert not out.exists()  # nothing written, nothing loaded


def test_both_liger_settings_are_named_together_when_refused(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(kernels, "liger_problems", lambda family: ["no CUDA GPU here"])
    cfg = SimpleNamespace(training=SimpleNamespace(use_liger_kernel=True))
    with pytest.raises(UserError) as caught:
        kernels.check_kernel_settings(cfg, GEMMA2, "supervised_liger")
    assert str(caught.value).startswith("training.use_liger_kernel and training.loss=supervised_liger: no CUDA")
    assert "training.use_liger_kernel=false and training.loss=supervised_chunked" in str(caught.value)


def test_liger_is_refused_under_zero3_said_in_the_dry_run_and_unused_by_distill(tmp_path):
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(tmp_path / "r"), "--launch", "zero3",
                            "--set", "training.use_liger_kernel=true", "--dry-run"])
    assert r.exit_code == 2 and "training.use_liger_kernel is set but" in r.output
    r = runner.invoke(app, ["validate", "quickstart-cpu", "--launch", "zero3",
                            "--set", "training.loss=supervised_liger"])
    assert r.exit_code == 2 and "training.loss is supervised_liger but ZeRO-3" in r.output
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(tmp_path / "r"), "--dry-run",
                            "--set", "training.use_liger_kernel=true", "--set", "training.loss=supervised_liger"])
    line = next(x for x in r.output.splitlines() if x.startswith("kernels:"))
    assert "loss supervised_liger" in line and "Liger RMSNorm, GeGLU, RoPE" in line
    r = runner.invoke(app, ["validate", "gemma-2-9b-distill-from-27b", "--set", "training.use_liger_kernel=true",
                            "--set", "training.fold_accumulation=true"])
    assert r.exit_code == 2
    for key in ("training.use_liger_kernel", "training.fold_accumulation"):
        assert f"{key} (--set {key}=true): unknown key for method distill (a key of sft" in r.output


def test_every_family_names_a_liger_patch_that_liger_has():
    from gemma2_tune.families import FAMILIES, GEMMA4, GEMMA4_UNIFIED
    from gemma2_tune.training.kernels import liger_problems

    for family in FAMILIES:
        if family in (GEMMA4, GEMMA4_UNIFIED):  # Liger has no Gemma 4 patch: refused, saying so
            assert family.liger_patch is None and "Liger has no kernels for Gemma 4" in liger_problems(family)[0]
            continue
        assert family.liger_patch and family.liger_patch.startswith("apply_liger_kernel_to_")
        if importlib.util.find_spec("liger_kernel") is not None:  # installed: the function exists there
            import liger_kernel.transformers

            assert callable(getattr(liger_kernel.transformers, family.liger_patch))


@pytest.mark.skipif(not HAVE_LIGER_GPU, reason="Liger's kernels are Triton GPU kernels: needs CUDA and liger-kernel")
def test_liger_on_cuda_equals_the_plain_model_in_fp32(tiny_model_dir, monkeypatch):
    from transformers.models.gemma2 import modeling_gemma2

    for name in ("Gemma2RMSNorm", "Gemma2MLP", "apply_rotary_pos_emb"):  # Liger replaces these for the process:
        monkeypatch.setattr(modeling_gemma2, name, getattr(modeling_gemma2, name))  # restored after this test
    model = lora_model(tiny_model_dir, "cuda")
    record = kernels.apply_liger(model, GEMMA2, "float32")
    assert record["probe_max_abs_logit_diff"] <= 1e-4 and record["probe_max_rel_grad_diff"] <= 1e-4
    base = kernels.base_model(model)
    assert base.model.layers[0].mlp._get_name() == "LigerGEGLUMLP"  # the kernels are in place
    json.dumps(record)  # goes to run.json as is


@pytest.mark.skipif(not HAVE_LIGER_GPU, reason="Liger's kernels are Triton GPU kernels: needs CUDA and liger-kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_loss_on_cuda_equals_the_tiles(dtype):
    weight = torch.randn(4096, 256, generator=torch.Generator().manual_seed(1)).to("cuda", dtype) / 4
    name = "float32" if dtype == torch.float32 else "bfloat16"
    record = kernels.check_fused_loss(kernels.liger_loss(30.0), weight, 30.0, name, "training.loss")
    assert record["probe_rel_loss_diff"] <= kernels.LOSS_TOLERANCE[name]

"""Attention kernels against eager: flex_attention keeps Gemma 2's soft-cap and masks packed rows exactly.

On CPU the forward runs (logits and loss within 1e-5 in fp32, packed and unpacked, rows longer than the
sliding window); flex has no CPU backward, so gradients are compared on CUDA only, and training with flex
on a CPU is refused before anything loads.
"""

import pytest
import torch
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.data.examples import Example
from gemma2_tune.data.packing import BlockCollator, pack
from gemma2_tune.data.turns import IGNORE_INDEX

CUDA = torch.cuda.is_available()


def models(path, kernel, device="cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(path, attn_implementation=k, dtype=dtype).to(device).eval()
            for k in ("eager", kernel)]


def batches(vocab, window, device="cpu"):
    """A packed batch (rows longer than the sliding window among them) and an unpacked one."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in [3 * window, 2 * window + 5, window + 1, 9, 40, 70]:
        ids = [2] + torch.randint(10, vocab, (n - 1,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    packed = BlockCollator(pad_token_id=0)([vars(b) for b in pack(examples, capacity=128)])
    single = {"input_ids": torch.tensor([examples[0].input_ids]), "labels": torch.tensor([examples[0].labels])}
    return {name: {k: v.to(device) for k, v in batch.items()} for name, batch in (("packed", packed),
                                                                                  ("unpacked", single))}


@pytest.fixture(scope="module", params=["tiny-gemma2", "tiny-gemma3"])
def tiny(request, tune_home):
    from gemma2_tune.models.builtin import builtin_path

    return builtin_path(f"builtin:{request.param}")


# the packed batch holds the unpacked example (3 windows long) and five more: unpacked is the `heavy` angle
@pytest.mark.parametrize("shape", ["packed", pytest.param("unpacked", marks=pytest.mark.heavy)])
def test_flex_attention_equals_eager_forward_in_fp32(tiny, shape):
    eager, flex = models(tiny, "flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    batch = batches(eager.config.vocab_size, eager.config.sliding_window)[shape]
    with torch.no_grad():
        a = eager(**batch, use_cache=False)
        b = flex(**batch, use_cache=False)
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_flex_with_the_soft_cap_removed_is_detected(tune_home):
    """Negative control: the comparison is sensitive to the attention soft-cap (Gemma 2's 50.0)."""
    from gemma2_tune.models.builtin import builtin_path

    eager, flex = models(builtin_path("builtin:tiny-gemma2"), "flex_attention")
    flex.config.attn_logit_softcapping = None
    for layer in flex.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with torch.no_grad():  # raw scores of a sharpened model exceed the cap, so capping matters
        for m in (eager, flex):
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(40.0)
        batch = batches(eager.config.vocab_size, eager.config.sliding_window)["packed"]
        diff = (eager(**batch, use_cache=False).logits - flex(**batch, use_cache=False).logits).abs().max().item()
    assert diff > 1e-3


@pytest.mark.skipif(not CUDA, reason="flex_attention has no CPU backward; gradients are compared on CUDA only")
@pytest.mark.parametrize("shape", ["packed", "unpacked"])
def test_flex_attention_equals_eager_gradients_on_cuda(tiny, shape):
    eager, flex = models(tiny, "flex_attention", "cuda", torch.bfloat16)
    batch = batches(eager.config.vocab_size, eager.config.sliding_window, "cuda")[shape]
    grads = []
    for model in (eager, flex):
        model.train()
        model.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.float())
    scale = grads[0].abs().max().item()
    assert (grads[0] - grads[1]).abs().max().item() <= 0.05 * scale  # bf16


@pytest.mark.skipif(CUDA, reason="on CUDA flex_attention trains")
def test_training_with_flex_on_a_cpu_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--max-steps", "1",
                                 "--set", "model.attn_implementation=flex_attention"])
    assert r.exit_code == 2 and "flex_attention has no backward on a CPU" in r.output and "Traceback" not in r.output
    assert not out.exists()  # found before anything was written or loaded


def test_validate_accepts_flex_for_both_families_and_plan_models_it_without_scores():
    for model in ("google/gemma-2-9b", "google/gemma-3-1b-it"):
        r = CliRunner().invoke(app, ["validate", "gemma-2-9b-qlora", "--set", f"model.name_or_path={model}",
                                     "--set", "model.attn_implementation=flex_attention"])
        assert r.exit_code == 0, r.output  # a recipe for a GPU run, checked in CI without one

    def activations(kernel):
        r = CliRunner().invoke(app, ["plan", "--recipe", "gemma-2-9b-qlora", "--max-length", "8192", "--gpu",
                                     "a100-80gb", "--set", f"model.attn_implementation={kernel}",
                                     "--set", "training.fold_accumulation=false"])  # the same micro-batch for both
        line = next(x for x in r.output.splitlines() if x.strip().startswith("activations"))
        return float(line.split()[-2])

    assert activations("flex_attention") < activations("eager") / 4  # no (heads x T x T) scores held

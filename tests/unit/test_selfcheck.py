"""The self-check every published folder goes through (after/selfcheck.py): a bound measured from the precision's
own noise, so healthy bf16 merges pass whatever the logits' scale, and real errors (a wrong LoRA scaling, a
module left out, another base) fail."""

import copy

import pytest
import torch

from gemma2_tune.after import selfcheck

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(path, dtype, seed=0, logit_scale=1.0):
    """A tiny model with a LoRA of random A and B (a trained adapter's size of update, not a fresh one's zero).
    `logit_scale` scales the final norm's output (Gemma's RMSNorm multiplies by 1 + weight), so the logits grow by it
    and nothing else changes: Gemma 3 has no final soft-cap, and the real 270M's logits reach ~160."""
    from peft import LoraConfig, get_peft_model

    from gemma2_tune.models.loading import LoadRequest, load_model

    base, _ = load_model(LoadRequest(str(path), dtype=dtype, attn_implementation="eager"))
    with torch.no_grad():
        norm = base.model.norm.weight
        norm.copy_(logit_scale * (1 + norm.float()) - 1)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


@pytest.fixture(scope="module")
def gemma3(tune_home):
    from gemma2_tune.models.builtin import builtin_path
    from gemma2_tune.models.loading import checkpoint_family, load_tokenizer

    path = builtin_path("builtin:tiny-gemma3")
    family, _ = checkpoint_family(str(path))
    return path, selfcheck.prompts(load_tokenizer(str(path)), "fold", family)


def checked(peft, merged, ids, dtype):
    reference = selfcheck.fp32_logits(peft, ids)
    floor = selfcheck.compare(selfcheck.logits(peft, ids), reference)
    return selfcheck.verdict(selfcheck.compare(selfcheck.logits(merged, ids), reference), floor, dtype)


def test_a_healthy_bf16_merge_passes_where_a_fixed_bound_refused_it(gemma3):
    path, ids = gemma3
    peft = lora_model(path, "bfloat16", logit_scale=60.0)
    assert selfcheck.fp32_logits(peft, ids)[0].abs().max() > 100  # logits on the real Gemma 3's scale
    record = checked(peft, copy.deepcopy(peft).merge_and_unload(), ids, "bfloat16")
    # the fixed bound (0.5 logits, 95% top-1) refused this healthy merge: bf16 logits above 64 are 0.5 apart
    assert record["max_abs_logit_diff"] > 0.5
    assert record["passed"], record
    assert record["noise_floor"]["dtype"] == "bfloat16" and record["noise_floor"]["max_abs_logit_diff"] > 0.5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_wrong_scaling_a_missing_module_or_another_base_fail(gemma3, dtype):
    path, ids = gemma3
    peft = lora_model(path, dtype, logit_scale=60.0)
    assert checked(peft, copy.deepcopy(peft).merge_and_unload(), ids, dtype)["passed"]
    wrong_alpha = copy.deepcopy(peft)  # merged with alpha/r doubled
    for module in wrong_alpha.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling = {k: 2 * v for k, v in module.scaling.items()}
    missing = copy.deepcopy(peft)  # one layer's v_proj update left out of the merge
    missing.base_model.model.model.layers[1].self_attn.v_proj.merge = lambda *a, **k: None
    other = lora_model(path, dtype, logit_scale=60.0)  # the same adapter on a base with other weights
    with torch.no_grad():
        for param in other.base_model.model.model.layers[0].parameters():
            if not param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    other.load_state_dict({k: v for k, v in peft.state_dict().items() if "lora_" in k}, strict=False)
    for name, bad in (("wrong alpha", wrong_alpha), ("missing module", missing), ("other base", other)):
        record = checked(peft, bad.merge_and_unload(), ids, dtype)
        assert not record["passed"], (name, record)
        assert record["max_abs_logit_diff"] > 5 * record["bound"]["max_abs_logit_diff"], (name, record)


def test_fp32_logits_upcast_exactly_and_leave_the_model_as_it_was(gemma3):
    path, ids = gemma3
    peft = lora_model(path, "bfloat16")
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    dtypes = {k: v.dtype for k, v in before.items()}
    upcast = selfcheck.fp32_logits(peft, ids)
    assert all(torch.equal(before[k], v) and v.dtype == dtypes[k] for k, v in peft.state_dict().items())
    as_fp32 = copy.deepcopy(peft).float()  # the whole model in float32 at once: the same numbers
    assert max((a - b).abs().max().item() for a, b in zip(selfcheck.logits(as_fp32, ids), upcast)) < 1e-4


def test_fp32_logits_of_an_offloaded_model(gemma3):
    """device_map with CPU offload (a model larger than the GPU): weights exist only inside accelerate's forward."""
    from accelerate import cpu_offload

    path, ids = gemma3
    peft = lora_model(path, "bfloat16")
    expected = selfcheck.fp32_logits(peft, ids)
    offloaded = cpu_offload(copy.deepcopy(peft), execution_device="cpu")
    got = selfcheck.fp32_logits(offloaded, ids)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-4

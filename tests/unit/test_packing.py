"""Packing is exact: a packed batch gives every row the logits and loss it gets alone (fp32, 1e-5)."""

import random

import pytest
import torch

from gemma2_tune.data.examples import Example
from gemma2_tune.data.turns import IGNORE_INDEX
from gemma2_tune.data.packing import BlockCollator, best_fit_decreasing, pack, unpacked


def test_best_fit_decreasing_places_every_row_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.choice([5, 8, 12, 30, 64, 100, 250]) for _ in range(500)]
    blocks = best_fit_decreasing(lengths, 256)
    assert sorted(i for b in blocks for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in blocks)
    lower_bound = -(-sum(lengths) // 256)
    assert len(blocks) <= lower_bound + 2
    assert best_fit_decreasing(lengths, 256) == blocks  # deterministic
    with pytest.raises(ValueError):
        best_fit_decreasing([300], 256)


def test_blocks_restart_positions_and_never_learn_a_rows_first_token():
    examples = [Example([2, 5, 6, 7], [IGNORE_INDEX, 5, 6, 7]), Example([2, 8, 9], [2, 8, 9])]  # 2nd: train_on=all
    (block,) = pack(examples, 16)
    assert block.input_ids == [2, 5, 6, 7, 2, 8, 9] and block.rows == 2
    assert block.position_ids == [0, 1, 2, 3, 0, 1, 2]
    assert block.labels == [IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX, 8, 9]
    collator = BlockCollator(pad_token_id=0)
    batch = collator([vars(block), vars(unpacked(examples)[1])])
    assert batch["input_ids"].shape == (2, 7) and "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3]  # padding is its own row
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 8, 9] + [IGNORE_INDEX] * 4
    assert collator.padding_fraction == pytest.approx(4 / 14)


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def rows(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [2] + torch.randint(10, vocab, (n - 1,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    return out


def alone(model, example):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]), use_cache=False)
    return out.logits[0], out.loss


def test_packed_logits_and_loss_equal_rows_alone_across_sliding_and_global_layers(fp32_model):
    window = fp32_model.config.sliding_window
    examples = rows(fp32_model.config.vocab_size, [3 * window, 2 * window + 5, window + 1, 9, 40, 70, 1])
    assert max(len(e.input_ids) for e in examples) > window and set(fp32_model.config.layer_types) == {
        "sliding_attention", "full_attention"}
    blocks = pack(examples, capacity=128)
    assert len(blocks) >= 2 and any(b.rows > 1 for b in blocks)
    batch = BlockCollator(pad_token_id=0)([vars(b) for b in blocks])
    with torch.no_grad():
        packed = fp32_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    order = best_fit_decreasing([len(e.input_ids) for e in examples], 128)
    worst = 0.0
    for b, members in enumerate(order):
        start = 0
        for i in sorted(members):
            n = len(examples[i].input_ids)
            ref_logits, ref_loss = alone(fp32_model, examples[i])
            got = packed[b, start : start + n]
            worst = max(worst, (got - ref_logits).abs().max().item())
            if n > 1:
                loss = torch.nn.functional.cross_entropy(got[:-1], torch.tensor(examples[i].labels[1:]))
                assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
            start += n
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("leak", ["2d-attention-mask", "kv-cache-on"])
def test_the_equivalence_check_catches_contamination(fp32_model, leak):
    """Negative controls: the same packed block, run the ways that let its second row see the first."""
    first, second = rows(fp32_model.config.vocab_size, [50, 60])
    (block,) = pack([first, second], capacity=128)  # rows keep their order inside a block
    ids, pos = torch.tensor([block.input_ids]), torch.tensor([block.position_ids])
    kwargs = {"attention_mask": torch.ones_like(ids), "use_cache": False} if leak == "2d-attention-mask" else {"use_cache": True}
    with torch.no_grad():
        leaked = fp32_model(input_ids=ids, position_ids=pos, **kwargs).logits
        clean = fp32_model(input_ids=ids, position_ids=pos, use_cache=False).logits
    ref, _ = alone(fp32_model, second)
    assert (clean[0, 50:] - ref).abs().max().item() <= 1e-5
    assert (leaked[0, 50:] - ref).abs().max().item() > 1e-3

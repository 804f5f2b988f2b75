"""The supervised-only, tiled loss equals the reference (full logits -> soft-cap -> masked CE) in fp32."""

import pytest
import torch
import torch.nn.functional as F

from gemma2_tune.training.loss import supervised_loss_sum


def reference_loss(hidden, labels, weight, softcap):
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)


def case(seed=0, batch=2, length=37, hidden=16, vocab=1000, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, length, hidden, generator=g) * scale).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * scale).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.6] = -100  # most positions not learned
    return h, w, labels


@pytest.mark.parametrize("softcap", [30.0, None])
def test_loss_and_gradients_match_the_reference(softcap):
    h, w, labels = case()
    ref = reference_loss(h, labels, w, softcap)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    total, n = supervised_loss_sum(h, labels, w, softcap, token_chunk=7, vocab_chunk=97)
    assert n == int((labels[:, 1:] != -100).sum())
    ours = total / n
    gh, gw = torch.autograd.grad(ours, (h, w))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert (gh - gh_ref).abs().max().item() <= 1e-5
    assert (gw - gw_ref).abs().max().item() <= 1e-5


def test_dropping_the_soft_cap_is_detected():
    h, w, labels = case(scale=6.0)  # logits far beyond 30
    ref = reference_loss(h, labels, w, 30.0)
    total, n = supervised_loss_sum(h, labels, w, None)
    assert abs(total.item() / n - ref.item()) > 1.0


def test_no_supervised_position_gives_a_connected_zero():
    h, w, labels = case()
    labels[:] = -100
    total, n = supervised_loss_sum(h, labels, w, 30.0)
    assert n == 0 and total.item() == 0.0
    total.backward()
    assert h.grad is not None


def test_training_loss_and_lora_gradients_equal_the_models_own_loss(tiny_model_dir, tmp_path):
    """The trainer's compute_loss (hook on the decoder, tiles) vs the model's forward loss, fp32, LoRA."""
    from datasets import Dataset

    from gemma2_tune.training.launch import Launch
    from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer
    from gemma2_tune.data.packing import BlockCollator
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.training.trainer import build_trainer, trainer_args

    cfg = resolve("quickstart-cpu", ["quantization.load_in_4bit=false", "model.dtype=float32", "lora.dropout=0.0"]).config
    model, _ = load_model(LoadRequest.for_run(cfg))
    args = trainer_args(cfg, tmp_path, Launch("single"))
    data = Dataset.from_dict({"input_ids": [[2, 5]], "labels": [[-100, 5]], "position_ids": [[0, 1]]})
    trainer = build_trainer(cfg, model, load_tokenizer(str(tiny_model_dir)), data, args, Launch("single"))
    peft_model = trainer.model
    # LoRA B starts at zero; give it values so the adapter matters
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (2, 50), generator=g)
    labels = ids.clone()
    labels[:, :20] = -100
    inputs = BlockCollator(0)([{"input_ids": r.tolist(), "labels": l.tolist(), "position_ids": list(range(50))}
                               for r, l in zip(ids, labels)])
    ours = trainer.compute_loss(peft_model, dict(inputs))
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, lora)
    ref = peft_model(input_ids=inputs["input_ids"], labels=inputs["labels"], use_cache=False).loss
    g_ref = torch.autograd.grad(ref, lora)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(g_ours, g_ref)) <= 1e-5

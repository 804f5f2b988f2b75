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


@pytest.mark.parametrize("name", ["builtin:tiny-gemma2", "builtin:tiny-gemma4", "builtin:tiny-gemma3-vision"])
def test_training_loss_and_lora_gradients_equal_the_models_own_loss(name, tune_home, tmp_path):
    """The trainer's compute_loss (hook on the decoder, tiles) vs the model's forward loss, fp32, LoRA. Gemma 4's
    KV-shared layers are where asking for one position's logits by count once cut the hidden states short."""
    from datasets import Dataset

    from gemma2_tune.training.launch import Launch
    from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer
    from gemma2_tune.data.packing import BlockCollator
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.training.trainer import build_trainer, trainer_args

    from gemma2_tune.models.builtin import builtin_path

    cfg = resolve("quickstart-cpu", ["quantization.load_in_4bit=false", "model.dtype=float32", "lora.dropout=0.0",
                                     f"model.name_or_path={name}"]).config
    model, _ = load_model(LoadRequest.for_run(cfg))
    args = trainer_args(cfg, tmp_path, Launch("single"))
    data = Dataset.from_dict({"input_ids": [[2, 5]], "labels": [[-100, 5]], "position_ids": [[0, 1]]})
    trainer = build_trainer(cfg, model, load_tokenizer(str(builtin_path(name))), data, args, Launch("single"))
    peft_model = trainer.model
    # LoRA B starts at zero; give it values so the adapter matters
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.get_text_config().vocab_size, (2, 50), generator=g)
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


# ----------------------------------------------------------------------------- TRL 1.16's fused loss, side by side
# `training.loss: trl` runs plain SFTTrainer.compute_loss: `model(**inputs, fused_lm_head=True)` through the forward
# `trl.trainer.utils.add_fused_lm_head` patched in at trainer init (final soft-cap read from the config then), then
# -sum(log_probs) / supervised tokens. On a CPU (no Triton) it scores every position and zeroes the ignored ones.
def trl_loss_sum(hidden, labels, weight, softcap, vocab_chunk=97):
    """TRL's chunked log-probabilities over the supervised positions (as its CUDA path selects them), summed."""
    from trl.kernels import ChunkedLogProbFunction

    mask = labels[:, 1:] != -100
    log_probs = ChunkedLogProbFunction.apply(hidden[:, :-1][mask], weight, None, labels[:, 1:][mask], 1.0, vocab_chunk,
                                             softcap, 1.0, ("log_probs",))[0]
    return -log_probs.sum()


@pytest.mark.parametrize("softcap", [30.0, None])
def test_trls_chunked_log_probs_equal_our_tiles(softcap, monkeypatch):
    """Ours, TRL's kernel and the reference agree in fp32 (loss, hidden and lm_head gradients), tiled both ways."""
    import trl.kernels.chunked_logprob as trl_kernel

    monkeypatch.setattr(trl_kernel, "TOKEN_CHUNK_SIZE", 5)  # several token tiles, as ours with token_chunk=7
    h, w, labels = case(scale=6.0)  # logits far beyond the cap: a dropped soft-cap moves the loss by > 1
    n = int((labels[:, 1:] != -100).sum())
    ref = reference_loss(h, labels, w, softcap)
    ours = supervised_loss_sum(h, labels, w, softcap, token_chunk=7, vocab_chunk=97)[0] / n
    theirs = trl_loss_sum(h, labels, w, softcap) / n
    grads = [torch.autograd.grad(x, (h, w)) for x in (ref, ours, theirs)]
    for loss, (gh, gw) in zip((ours, theirs), grads[1:]):
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-5)
        assert (gh - grads[0][0]).abs().max().item() <= 1e-5 * max(1.0, grads[0][0].abs().max().item())
        assert (gw - grads[0][1]).abs().max().item() <= 1e-5 * max(1.0, grads[0][1].abs().max().item())
    if softcap:  # either side without the cap would be this far off
        assert abs(reference_loss(h, labels, w, None).item() - ref.item()) > 1.0


def _fp32_lora_trainer(tmp_path, loss="supervised_chunked"):
    from datasets import Dataset

    from gemma2_tune.config.layering import resolve
    from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer
    from gemma2_tune.training.launch import Launch
    from gemma2_tune.training.trainer import build_trainer, trainer_args

    cfg = resolve("quickstart-cpu", ["quantization.load_in_4bit=false", "model.dtype=float32", "lora.dropout=0.0",
                                     f"training.loss={loss}"]).config
    model, _ = load_model(LoadRequest.for_run(cfg))
    args = trainer_args(cfg, tmp_path, Launch("single"))
    data = Dataset.from_dict({"input_ids": [[2, 5]], "labels": [[-100, 5]], "position_ids": [[0, 1]]})
    trainer = build_trainer(cfg, model, load_tokenizer(cfg.model.name_or_path), data, args, Launch("single"))
    torch.manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; give it values so the adapter matters
            p.data.normal_(0, 0.5)
    return trainer


def _packed_batch(vocab, supervised=True):
    """Two packed blocks (rows restart their position ids) plus right padding as its own row, -100 off the answers."""
    from gemma2_tune.data.packing import BlockCollator

    g = torch.Generator().manual_seed(1)
    blocks = []
    for lengths in ((30, 20, 14), (41, 9)):
        ids, labels, positions = [], [], []
        for n in lengths:
            row = torch.randint(10, vocab, (n,), generator=g).tolist()
            ids += row
            labels += [-100] * (n // 2) + (row[n // 2:] if supervised else [-100] * (n - n // 2))
            positions += list(range(n))
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return BlockCollator(0)(blocks)


def _loss_and_grads(compute, trainer, inputs):
    """compute(model, inputs) -> loss; its gradients for every trainable weight and the final norm's output."""
    from gemma2_tune.models.lora import base_model

    captured = {}
    handle = base_model(trainer.model).get_decoder().register_forward_hook(
        lambda m, a, out: captured.__setitem__("hidden", out.last_hidden_state))
    try:
        loss = compute(trainer.model, dict(inputs))  # TRL's compute_loss writes into its inputs
    finally:
        handle.remove()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, trainable + [captured["hidden"]])


def test_our_trainer_loss_equals_trls_fused_loss_on_packed_blocks(tmp_path):
    """fp32, LoRA on a tiny soft-capped Gemma 2, packed blocks with padding: SupervisedLossTrainer.compute_loss vs
    TRL's SFTTrainer.compute_loss (what `training.loss: trl` runs) vs the model's own full-logits loss. The final
    norm is scaled so that logits reach far past the 30.0 cap: either side dropping it fails."""
    from trl import SFTTrainer

    from gemma2_tune.models.lora import base_model

    trainer = _fp32_lora_trainer(tmp_path)
    base = base_model(trainer.model)
    assert base.config.final_logit_softcapping == 30.0
    base.get_decoder().norm.weight.data.fill_(40.0)  # RMSNorm scales by 1 + weight: logits ~ +-100 before the cap
    inputs = _packed_batch(base.config.vocab_size)
    ours, g_ours = _loss_and_grads(trainer.compute_loss, trainer, inputs)
    theirs, g_theirs = _loss_and_grads(lambda m, x: SFTTrainer.compute_loss(trainer, m, x), trainer, inputs)
    own = trainer.model(**inputs, use_cache=False)  # the model's forward: full logits, soft-capped, masked CE
    assert own.logits.abs().max().item() > 25.0
    with torch.no_grad():  # the same CE on logits without the cap
        hidden = base.get_decoder()(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                    use_cache=False).last_hidden_state
        uncapped = reference_loss(hidden, inputs["labels"], base.get_output_embeddings().weight, None)
    assert abs(uncapped.item() - own.loss.item()) > 0.1  # the cap matters here, by far more than the tolerance
    assert ours.item() == pytest.approx(own.loss.item(), rel=1e-6, abs=1e-5)
    assert theirs.item() == pytest.approx(own.loss.item(), rel=1e-6, abs=1e-5)
    for a, b in zip(g_ours, g_theirs):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_a_fully_masked_batch_is_a_connected_zero_on_both_sides(tmp_path):
    """No supervised position: ours and TRL's give loss 0 with zero gradients (no NaN from 0/0, backward works)."""
    from trl import SFTTrainer

    trainer = _fp32_lora_trainer(tmp_path)
    inputs = _packed_batch(trainer.model.config.vocab_size, supervised=False)
    for compute in (trainer.compute_loss, lambda m, x: SFTTrainer.compute_loss(trainer, m, x)):
        loss, grads = _loss_and_grads(compute, trainer, inputs)
        assert loss.item() == 0.0
        assert all(torch.isfinite(g).all() and g.abs().max().item() == 0.0 for g in grads)


def test_training_loss_trl_is_trls_fused_nll(tmp_path):
    """`training.loss: trl` builds plain SFTTrainer (TRL 1.16: nll through the fused LM head, no full logits)."""
    from trl import SFTTrainer
    from trl.trainer.utils import FusedCausalLMOutput

    from gemma2_tune.models.lora import base_model

    trainer = _fp32_lora_trainer(tmp_path, loss="trl")
    assert type(trainer) is SFTTrainer
    assert trainer.args.loss_type == "nll" and trainer.label_smoother is None and trainer.compute_loss_func is None
    inputs = _packed_batch(trainer.model.config.vocab_size)
    out = base_model(trainer.model)(**inputs, fused_lm_head=True)
    assert isinstance(out, FusedCausalLMOutput) and not hasattr(out, "logits")

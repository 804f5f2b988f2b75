"""The one LM-head path (training/logprobs.py): per-token log-probabilities, their gradients and TRL's logged extras
equal a full-vocabulary log_softmax of the soft-capped logits; and inside each TRL trainer a method uses (DPO, KTO,
GRPO, RLOO), losses, scored log-probabilities and LoRA gradients equal those of TRL's own fused head, fp32, 1e-5."""

import pytest
import torch

from gemma2_tune.training.logprobs import head_problem, install_supervised_head, token_logprobs, use_supervised_heads

TOLERANCE = 1e-5


def reference(h, w, y, softcap, temperature):
    z = h @ w.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = z.log_softmax(-1)
    return (logp.gather(1, y[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1), z.mean(-1), z.argmax(-1) == y)


@pytest.mark.parametrize("softcap,temperature", [(30.0, 1.0), (30.0, 0.7), (None, 1.0)])
def test_values_gradients_and_extras_equal_a_full_log_softmax(softcap, temperature):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 24, generator=g) * 3).requires_grad_()  # logits of tens: the cap bites
    w = torch.randn(3000, 24, generator=g).requires_grad_()
    y = torch.randint(0, 3000, (300,), generator=g)
    upstream = torch.randn(300, generator=g)  # a loss weighting each token differently, as DPO/GRPO do
    ref, entropy, mean, top1 = reference(h, w, y, softcap, temperature)
    gh_ref, gw_ref = torch.autograd.grad((ref * upstream).sum(), (h, w))
    ours, extras = token_logprobs(h, w, y, softcap, temperature, ("entropy", "mean_logits", "is_top1"),
                                  token_chunk=64, vocab_chunk=700)  # several tiles each way, a ragged last one
    gh, gw = torch.autograd.grad((ours * upstream).sum(), (h, w))
    assert (ours - ref).abs().max().item() <= TOLERANCE
    assert (gh - gh_ref).abs().max().item() <= TOLERANCE * gh_ref.abs().max().item()
    assert (gw - gw_ref).abs().max().item() <= TOLERANCE * gw_ref.abs().max().item()
    assert (extras["entropy"] - entropy).abs().max().item() <= 1e-4
    assert (extras["mean_logits"] - mean).abs().max().item() <= TOLERANCE
    assert torch.equal(extras["is_top1"], top1)


def test_a_tie_with_an_earlier_token_is_not_top1_and_a_missing_cap_shows():
    w = torch.eye(4).repeat(2, 1)  # tokens i and i + 4 have the same logit
    h = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    _, extras = token_logprobs(h, w, torch.tensor([4, 1]), None, extras=("is_top1",), vocab_chunk=3)
    assert extras["is_top1"].tolist() == [False, True]  # 4 ties with 0, which comes first (argmax's rule)
    big = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 40
    capped, _ = token_logprobs(big, torch.eye(4), torch.zeros(8, dtype=torch.long), 30.0)
    uncapped, _ = token_logprobs(big, torch.eye(4), torch.zeros(8, dtype=torch.long), None)
    assert (capped - uncapped).abs().max() > 1.0


def test_trl_heads_are_kept_where_ours_would_compute_otherwise(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert head_problem(model, ("log_probs", "entropy", "mean_logits", "is_top1"), sharded=False) is None
    assert "log_sum_sq_probs" in head_problem(model, ("log_probs", "log_sum_sq_probs"), sharded=False)
    assert "ZeRO-3" in head_problem(model, ("log_probs",), sharded=True)
    model.config.logit_scale = 0.5
    assert "logit_scale" in head_problem(model, ("log_probs",), sharded=False)


# ------------------------------------------------------------------------------------ inside TRL's trainers, fp32
def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _common(tmp_path):
    return dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                logging_steps=1)


def _randomise_adapters(trainer):
    """LoRA weights drawn (seeded), so the policy differs from its reference and every gradient is non-zero."""
    g = torch.Generator().manual_seed(1)
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.2


def _gradients(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}


def _same(a, b, what):
    assert a.keys() == b.keys() and a, what
    for name in a:
        scale = max(a[name].abs().max().item(), 1e-12)
        assert (a[name] - b[name]).abs().max().item() <= TOLERANCE * scale, f"{what}: {name}"


def _preference_trainer(kind, model_dir, tokenizer, tmp_path, ours):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gemma2_tune.training.dpo import GemmaDPOTrainer, GemmaKTOTrainer, trl_head_outputs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(10, 400, (n,), generator=g).tolist()

    if kind == "dpo":
        from trl import DPOConfig

        rows = [{"prompt_ids": ids(5 + i), "chosen_ids": ids(3 + 2 * i), "rejected_ids": ids(6 - i)} for i in range(4)]
        args = DPOConfig(**_common(tmp_path), per_device_train_batch_size=4, beta=0.1, max_length=64)
        trainer = GemmaDPOTrainer(model=model, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(rows), peft_config=_lora())
    else:
        from trl import KTOConfig

        rows = [{"prompt_ids": ids(5 + i), "completion_ids": ids(3 + i), "label": i % 2 == 0} for i in range(4)]
        args = KTOConfig(**_common(tmp_path), per_device_train_batch_size=4, beta=0.1, max_length=64,
                         train_sampling_strategy="sequential")
        trainer = GemmaKTOTrainer(model=model, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(rows), peft_config=_lora())
    _randomise_adapters(trainer)
    if ours:
        assert use_supervised_heads(trainer, trl_head_outputs(trainer))["lm_head"] == "supervised_chunked"
    return trainer


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_losses_equal_trls_own_head(kind, tiny_model_dir, tokenizer, tmp_path):
    """Loss (policy and adapter-disabled reference log-probabilities, KTO's KL completions), the metrics TRL logs
    from its head (entropy, mean logits, token accuracy) and every LoRA gradient."""
    results = []
    for ours in (False, True):
        trainer = _preference_trainer(kind, tiny_model_dir, tokenizer, tmp_path / str(ours), ours)
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        metrics = {k: torch.tensor(v) for k, v in trainer._metrics["train"].items()}
        results.append((loss.detach(), _gradients(trainer), metrics))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert abs(loss_a.item() - loss_b.item()) <= TOLERANCE * max(abs(loss_a.item()), 1.0)
    _same(grads_a, grads_b, "LoRA gradients")
    assert {"entropy", "logits/chosen"} <= metrics_a.keys() and metrics_a.keys() == metrics_b.keys()
    for name in metrics_a:
        assert torch.allclose(metrics_a[name], metrics_b[name], atol=1e-4, rtol=1e-5), name


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rl_losses_equal_trls_own_head(algorithm, tiny_model_dir, tokenizer, tmp_path):
    """The same sampled group scored by both heads: the old policy's (num_iterations=2) and the reference's
    (beta > 0) log-probabilities at the sampling temperature, the loss and every LoRA gradient."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gemma2_tune.training.rl import trainer_classes

    grpo, rloo = trainer_classes()
    prompt = [{"role": "user", "content": "count to three please"}]
    results = []
    for ours in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
        settings = dict(**_common(tmp_path / str(ours)), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=8, beta=0.1, num_iterations=2, temperature=0.7)
        if algorithm == "grpo":
            from trl import GRPOConfig

            args, trainer_class = GRPOConfig(**settings), grpo
        else:
            from trl import RLOOConfig

            args, trainer_class = RLOOConfig(**settings), rloo
        trainer = trainer_class(model=model, args=args, processing_class=tokenizer, peft_config=_lora(),
                                reward_funcs=lambda completions, **k: [float(len(c[0]["content"])) for c in completions],
                                train_dataset=Dataset.from_dict({"prompt": [prompt] * 4}))
        _randomise_adapters(trainer)
        if ours:
            head = use_supervised_heads(trainer, ("log_probs", "entropy"), temperature=0.7)
            assert head["lm_head"] == "supervised_chunked"
        torch.manual_seed(5)  # the same completions on both sides (generation does not use the fused head)
        batch = trainer._generate_and_score_completions([{"prompt": prompt}] * 4)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((batch, loss.detach(), _gradients(trainer)))
    (batch_a, loss_a, grads_a), (batch_b, loss_b, grads_b) = results
    assert torch.equal(batch_a["completion_ids"], batch_b["completion_ids"])
    # RLOO keeps the old policy's sequence log-probabilities and folds the KL to the reference into the advantages
    scored = ("old_per_token_logps", "ref_per_token_logps") if algorithm == "grpo" else ("old_logps", "advantages")
    for key in scored:
        assert batch_a.get(key) is not None, key
        assert (batch_a[key] - batch_b[key]).abs().max().item() <= TOLERANCE, key
    assert abs(loss_a.item() - loss_b.item()) <= TOLERANCE * max(abs(loss_a.item()), 1.0)
    _same(grads_a, grads_b, "LoRA gradients")


def test_the_model_forward_without_the_fused_flag_is_unchanged(tiny_model_dir):
    """Generation and everything else call the model without `fused_lm_head`: the model's own forward runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(10, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids)
        install_supervised_head(model)
        after = model(input_ids=ids, labels=ids)
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert torch.equal(before.logits, after.logits) and before.loss.item() == after.loss.item()
    # generate reads the forward's signature: without `logits_to_keep` there its first step scores every prompt
    # position over the whole vocabulary
    assert model._supports_logits_to_keep()
    assert abs(fused.loss.item() - before.loss.item()) <= TOLERANCE  # the mean next-token cross-entropy, both ways

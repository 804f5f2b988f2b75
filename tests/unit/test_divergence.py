"""distill's divergence (training/divergence.py): values, the student's entropy and gradients (hidden states and, when
it trains, the lm_head) equal a float64 log_softmax computation of the same formula, and TRL's own chunked divergence
(fp32, its loss function included: masks, token counts), for forward KL, reverse KL and the generalized JSD; the blocks
and the sliced cast of a bf16 weight change nothing; saturated distributions stay finite. And the inverse-CDF draw that
replaces torch.multinomial while generating (training/generation.py) draws from the same distribution."""

import pytest
import torch

from conftest import divergence_from_logprobs
from gemma2_tune.training import divergence as div
from gemma2_tune.training.divergence import divergence_loss, divergence_problem, token_divergence
from gemma2_tune.training.generation import BAD_WEIGHTS, ZERO_ROW, inverse_cdf_sampling, sample_categorical

BETAS = [0.0, 0.1, 0.5, 1.0]


def reference(h_s, w_s, h_t, w_t, beta, softcaps, temperature):
    """The divergence from full log_softmax rows (trl DistillationTrainer's formula, logaddexp mixture)."""
    def logits(h, w, cap):
        z = h @ w.t()
        return (cap * torch.tanh(z / cap) if cap else z) / temperature

    ls, lt = logits(h_s, w_s, softcaps[0]).log_softmax(-1), logits(h_t, w_t, softcaps[1]).log_softmax(-1)
    return divergence_from_logprobs(ls, lt, beta), -(ls.exp() * ls).sum(-1)


def inputs(n=37, vocab=3001, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, generator=g) * scale, torch.randn(vocab, 16, generator=g) * 0.7,
            torch.randn(n, 24, generator=g) * scale, torch.randn(vocab, 24, generator=g) * 0.7,
            torch.randn(n, generator=g))


def close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-3)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("softcaps,temperature,rows,scale", [((30.0, 30.0), 1.0, 5, 3.0),
                                                             ((None, None), 0.7, None, 1.5),
                                                             ((30.0, 30.0), 2.0, 1, 3.0)])
def test_values_and_gradients_equal_a_float64_log_softmax(beta, softcaps, temperature, rows, scale):
    """Values and entropy within 1e-5, gradients 5e-5 (relative to their largest entry): the JSD's gradient sums
    terms that cancel (each row's sums to zero), and TRL's own fp32 kernel errs by up to 1.6e-4 on these inputs."""
    h_s, w_s, h_t, w_t, upstream = inputs(scale=scale)  # logits of tens: the cap bites; blocks, a ragged last one
    h_s, w_s = h_s.requires_grad_(), w_s.requires_grad_()
    d, entropy = token_divergence(h_s, w_s, h_t, w_t, beta, softcaps, temperature, rows)
    gh, gw = torch.autograd.grad((d * upstream).sum(), (h_s, w_s))
    h64, w64 = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    ref, ref_entropy = reference(h64, w64, h_t.double(), w_t.double(), beta, softcaps, temperature)
    gh_ref, gw_ref = torch.autograd.grad((ref * upstream.double()).sum(), (h64, w64))
    assert d.dtype == torch.float32 and not entropy.requires_grad
    assert close(d.double(), ref) and close(entropy.double(), ref_entropy)
    assert close(gh.double(), gh_ref, 5e-5) and close(gw.double(), gw_ref, 5e-5)


def error(x, exact):
    return (x.double() - exact).abs().max().item() / exact.abs().max().item()


@pytest.mark.parametrize("beta", BETAS)
def test_equal_to_trls_chunked_divergence_and_its_loss(beta):
    """Values, entropy and losses equal TRL's at 1e-5; gradients are at least as close to float64's as TRL's own
    (they differ from TRL's by up to 3e-5 where the JSD's gradient cancels, each kernel rounding its own way)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    h_s, w_s, h_t, w_t, upstream = inputs(n=24)
    h_s = h_s.requires_grad_()
    ours, ours_entropy = token_divergence(h_s, w_s, h_t, w_t, beta, (30.0, 30.0), 0.7, 7)
    trl, trl_entropy = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, beta, 0.7, 1.0, 30.0, 1.0,
                                                       30.0)
    g_ours, g_trl = (torch.autograd.grad((x * upstream).sum(), h_s)[0] for x in (ours, trl))
    h64 = h_s.detach().double().requires_grad_()
    exact = torch.autograd.grad((reference(h64, w_s.double(), h_t.double(), w_t.double(), beta, (30.0, 30.0), 0.7)[0]
                                 * upstream.double()).sum(), h64)[0]
    assert close(ours, trl) and close(ours_entropy, trl_entropy)
    assert error(g_ours, exact) <= max(error(g_trl, exact), 1e-5), (error(g_ours, exact), error(g_trl, exact))
    # TRL's loss function: (B, K, H) states, a completion mask with padding, mean or sum / num_items_in_batch
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:], mask[2, 1:] = 0, 0
    states = (h_s.view(4, 6, 16), h_t.view(4, 6, 24))
    for items in (None, torch.tensor(40)):
        kwargs = dict(num_items_in_batch=items, student_final_logit_softcapping=30.0,
                      teacher_final_logit_softcapping=30.0, temperature=0.7)
        loss, entropy, n = divergence_loss(*states, w_s, w_t, mask, beta, **kwargs)
        trl_loss, trl_entropy_sum, trl_n = _chunked_divergence_loss(*states, w_s, w_t, mask, beta, **kwargs)
        assert int(n) == int(trl_n) == 17
        assert close(loss, trl_loss) and close(entropy, trl_entropy_sum)
        assert close(torch.autograd.grad(loss, h_s)[0], torch.autograd.grad(trl_loss, h_s)[0], 5e-5)


def test_a_bf16_lm_head_copied_whole_or_cast_a_slice_at_a_time_gives_the_same_result(monkeypatch):
    h_s, w_s, h_t, w_t, upstream = inputs()
    w_s, w_t = w_s.bfloat16(), w_t.bfloat16()
    h = h_s.clone().requires_grad_()
    exact, _ = token_divergence(h, w_s.float(), h_t, w_t.float(), 0.5, (30.0, 30.0))
    g_exact = torch.autograd.grad((exact * upstream).sum(), h)[0]
    copied, _ = token_divergence(h, w_s, h_t, w_t, 0.5, (30.0, 30.0))  # both fp32 copies fit the budget
    g_copied = torch.autograd.grad((copied * upstream).sum(), h)[0]
    monkeypatch.setattr(div, "DIVERGENCE_CAST_BYTES", 0)
    monkeypatch.setattr(div, "CAST_BYTES", 4 * 24 * 500)  # slices of 500 and 750 rows, a ragged last one
    sliced, _ = token_divergence(h, w_s, h_t, w_t, 0.5, (30.0, 30.0))
    g_sliced = torch.autograd.grad((sliced * upstream).sum(), h)[0]
    assert torch.equal(copied, exact) and torch.equal(g_copied, g_exact)
    assert close(sliced, exact) and close(g_sliced, g_exact)


def test_saturated_distributions_stay_finite_and_exact():
    """Logits in the hundreds (no cap): most probabilities underflow fp32 on both sides; the mixture's floor keeps
    every term finite and the result equal to the log-space reference."""
    h_s, w_s, h_t, w_t, upstream = inputs(scale=40.0)
    h_s = h_s.requires_grad_()
    for beta in BETAS:
        d, entropy = token_divergence(h_s, w_s, h_t, w_t, beta, (None, None))
        g = torch.autograd.grad((d * upstream).sum(), h_s)[0]
        ref, _ = reference(h_s.detach().double(), w_s.double(), h_t.double(), w_t.double(), beta, (None, None), 1.0)
        assert torch.isfinite(d).all() and torch.isfinite(g).all() and torch.isfinite(entropy).all()
        assert close(d.double(), ref, rel=1e-4), beta


def test_near_identical_distributions_keep_fp32s_noise_floor():
    """A student close to its teacher (the end of a good run): the divergence is tiny, and its error against float64
    stays within TRL's own (or 1e-7 nats) instead of a sum of per-entry rounding over the vocabulary."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(16, 32, generator=g) * 2, torch.randn(5000, 32, generator=g)
    for eps in (0.0, 1e-4, 1e-2):
        h_t = h + eps * torch.randn(h.shape, generator=g)
        for beta in BETAS:
            ours, _ = token_divergence(h, w, h_t, w, beta, (30.0, 30.0))
            trl, _ = ChunkedDivergenceFunction.apply(h, w, None, h_t, w, None, beta, 1.0, 1.0, 30.0, 1.0, 30.0)
            exact, _ = reference(h.double(), w.double(), h_t.double(), w.double(), beta, (30.0, 30.0), 1.0)
            ours_error, trl_error = ((x.double() - exact).abs().max().item() for x in (ours, trl))
            assert ours_error <= max(2 * trl_error, 1e-7), (eps, beta, ours_error, trl_error)


def test_no_valid_position_gives_a_zero_loss_connected_to_the_student_and_bad_arguments_are_refused():
    h_s, w_s, h_t, w_t, _ = inputs(n=6)
    h_s = h_s.requires_grad_()
    loss, entropy, n = divergence_loss(h_s.view(2, 3, 16), h_t.view(2, 3, 24), w_s, w_t,
                                       torch.zeros(2, 3, dtype=torch.long), 0.5)
    assert loss.item() == 0.0 and entropy.item() == 0.0 and int(n) == 0
    assert torch.autograd.grad(loss, h_s)[0].abs().sum() == 0
    with pytest.raises(ValueError, match="vocabulary"):
        token_divergence(h_s, w_s, h_t, w_t[:-1], 0.5)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(h_s, w_s, h_t, w_t, 1.5)
    with pytest.raises(ValueError, match="positions"):
        token_divergence(h_s, w_s, h_t[:-1], w_t, 0.5)
    with torch.no_grad():  # evaluation: nothing differentiable comes out
        assert token_divergence(h_s, w_s, h_t, w_t, 0.5)[0].grad_fn is None
    with pytest.raises(ValueError, match="bias"):
        divergence_loss(h_s.view(2, 3, 16), h_t.view(2, 3, 24), w_s, w_t, torch.ones(2, 3), 0.5,
                        student_lm_head_bias=torch.zeros(w_s.shape[0]))


def test_trls_divergence_is_kept_where_ours_would_compute_otherwise(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from gemma2_tune.config.distill import DistillConfig
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.training.distill import use_divergence
    from gemma2_tune.training.launch import Launch

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert divergence_problem(student, teacher, sharded=False) is None
    assert "ZeRO-3" in divergence_problem(student, teacher, sharded=True)
    # the trainer's choice reads the teacher unwrapped: under DeepSpeed (any stage) TRL hands it over in an engine,
    # whose `config` is DeepSpeed's settings dict
    engine = SimpleNamespace(module=teacher, config={"zero_optimization": {"stage": 2}})
    trainer = SimpleNamespace(model=student, teacher_model=engine, completion_rows=False,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m.module))
    for asked, chosen in (("auto", "completion_rows"), ("completion_rows", "completion_rows"), ("trl", "trl")):
        trainer.completion_rows = False
        cfg = resolve(None, [f"distill.loss={asked}"], schema=DistillConfig).config
        record = use_divergence(trainer, cfg, Launch("single"))
        assert record["loss"] == chosen and trainer.completion_rows == (chosen == "completion_rows"), record
    teacher.config.logit_scale = 0.5
    assert divergence_problem(student, teacher, sharded=False).startswith("the teacher: the config scales")
    record = use_divergence(trainer, resolve(None, [], schema=DistillConfig).config, Launch("single"))
    assert record["loss"] == "trl" and "logit" in record["reason"]


# ------------------------------------------------------------------------------------------- the sampling draw
def test_the_inverse_cdf_draw_has_multinomials_distribution():
    torch.manual_seed(0)
    weights = torch.tensor([[0.1, 0.0, 0.3, 0.6, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    scratch: dict = {}  # one buffer for every draw, as within a generation
    sample_categorical(weights.repeat(4, 1), scratch)  # a larger batch first: the buffer is reused, not outgrown
    draws = torch.cat([sample_categorical(weights, scratch) for _ in range(20_000)], dim=1)  # (3, 20000)
    assert draws.dtype == torch.int64 and sample_categorical(weights[0]).shape == (1,)
    expected = weights / weights.sum(-1, keepdim=True)
    frequencies = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double() / draws.shape[1]
    # a zero weight is never drawn; the others within 4.5 standard errors of their probability
    assert (frequencies[expected == 0] == 0).all()
    bound = 4.5 * (expected * (1 - expected) / draws.shape[1]).sqrt() + 1e-12
    assert ((frequencies - expected).abs() <= bound).all(), frequencies
    for bad in ([[1.0, -0.5]], [[1.0, float("nan")]], [[float("inf"), 1.0]], [[0.0, 0.0]]):
        with pytest.raises(RuntimeError) as ours:
            sample_categorical(torch.tensor(bad))
        with pytest.raises(RuntimeError) as theirs:
            torch.multinomial(torch.tensor(bad), 1)
        assert str(ours.value) == str(theirs.value) and str(ours.value) in (BAD_WEIGHTS, ZERO_ROW)


def test_generation_draws_through_it_only_inside_the_context(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[2, 10, 11, 12], [2, 13, 14, 15]])
    original = torch.multinomial
    greedy = model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    with inverse_cdf_sampling():
        assert torch.multinomial is not original
        # top_k=1 leaves one token with all the probability: the draw must be the greedy choice
        sampled = model.generate(ids, do_sample=True, top_k=1, max_new_tokens=6, min_new_tokens=6)
        assert torch.multinomial(torch.ones(3), 2, replacement=False).shape == (2,)  # other calls: torch's own
    assert torch.multinomial is original
    assert torch.equal(sampled, greedy)

"""The distillation divergence between student and teacher next-token distributions, at the completion positions
only, over whole vocabulary rows in fp32: `distill`'s loss head.

Reference (what TRL's DistillationTrainer minimises, Agarwal et al. 2024, "On-Policy Distillation of Language
Models", eq. 1; `beta` as TRL's DistillationConfig names it):
    z_s = softcap * tanh(h_s @ W_s.T / softcap) / temperature        # student, (N, V); the teacher alike
    p_s, p_t = softmax(z_s), softmax(z_t)
    beta = 0:   KL(p_t || p_s)                                        # forward KL
    beta = 1:   KL(p_s || p_t)                                        # reverse KL
    otherwise:  beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = beta * p_t + (1 - beta) * p_s

TRL 1.16's ChunkedDivergenceFunction folds (4,096 x 32,768) tiles with an online log-sum-exp, so it projects both
models three times per step for the JSD (statistics, divergence, and again in backward; twice for beta 0 or 1), and
off a Triton device it projects every completion position, padding included, with fresh temporaries per tile. Here
the valid positions are taken in blocks of `rows` whole vocabulary rows (six reused fp32 buffers of rows x V,
config/memory.divergence_rows), each model is projected once (16-bit weights copied to fp32 once per call where the
copies fit a budget), and the gradient with respect to the student's hidden states is formed in the same pass (each
row's divergence depends on its own hidden state only, so backward scales it by the incoming per-row gradient). Only
when the student's lm_head weight itself trains (full fine-tuning, tied embeddings) does backward project again, to
accumulate its gradient.
tests/unit/test_divergence.py checks values and gradients against autograd on log_softmax and against TRL's kernel.
"""

from __future__ import annotations

import math

import torch

from ..config.memory import divergence_rows
from ..config.schema import DIVERGENCE_CAST_BYTES

# fp32 copy of a weight's vocabulary slice when the weight is not fp32 and not copied whole: at most this many bytes
CAST_BYTES = 64 * 2**20


def _fp32(*weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The weights in fp32, copied once for the whole call when the copies of those stored in 16 bits fit
    DIVERGENCE_CAST_BYTES together; else as they are (each block then casts a slice at a time: `_slices`)."""
    size = sum(4 * w.numel() for w in weights if w.dtype != torch.float32)
    return tuple(w.float() for w in weights) if 0 < size <= DIVERGENCE_CAST_BYTES else weights


def _slices(w: torch.Tensor):
    """Vocabulary slices of w (V, H) whose fp32 copies hold CAST_BYTES at most."""
    step = max(1, CAST_BYTES // (4 * w.shape[1]))
    return ((v, w[v : v + step].float()) for v in range(0, w.shape[0], step))


def _project(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """out (n, V) <- h (n, H) fp32 @ w (V, H).T in fp32; a weight in another dtype is cast a slice at a time (a whole
    fp32 copy of a 27B teacher's lm_head would be 4.7 GB)."""
    if w.dtype == torch.float32:
        torch.mm(h, w.t(), out=out)
        return
    for v, part in _slices(w):
        torch.mm(h, part.t(), out=out[:, v : v + part.shape[0]])


def _times_weight(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g (n, V) fp32 @ w (V, H) in fp32, sliced over the vocabulary as `_project`; (n, H)."""
    if w.dtype == torch.float32:
        return g @ w
    out = torch.zeros(g.shape[0], w.shape[1], dtype=torch.float32, device=g.device)
    for v, part in _slices(w):
        out.addmm_(g[:, v : v + part.shape[0]], part)
    return out


def _dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of two (n, V) tensors, (n,), their products written into `scratch` (torch's sum adds
    them pairwise: a row of 256,000 terms loses ~10x less than a batched matrix product's running sum)."""
    return torch.mul(a, b, out=scratch).sum(dim=1)


def _log_softmax_(z: torch.Tensor, probs: torch.Tensor) -> None:
    """z (n, V) logits -> their log-probabilities in place; probs <- the probabilities."""
    z.sub_(z.amax(dim=1, keepdim=True))
    torch.exp(z, out=probs)
    total = probs.sum(dim=1, keepdim=True)
    z.sub_(total.log())
    probs.div_(total)


def _logits_(z: torch.Tensor, h: torch.Tensor, w: torch.Tensor, softcap: float | None, temperature: float,
             capped: torch.Tensor | None = None) -> None:
    """z <- softcap * tanh(h @ w.T / softcap) / temperature; `capped`, if given, keeps tanh(h @ w.T / softcap)."""
    _project(z, h, w)
    if softcap:
        z.div_(softcap).tanh_()
        if capped is not None:
            capped.copy_(z)
        z.mul_(softcap / temperature)
    elif temperature != 1.0:
        z.div_(temperature)


def _block(h_s, w_s, h_t, w_t, beta: float, softcaps: tuple, temperature: float, buffers: list, gradient: bool):
    """One block of n valid rows, in the six (>= n, V) buffers. Returns (divergence (n,), student entropy (n,), and
    if `gradient` the derivative of each row's divergence with respect to the student's raw logits h_s @ w_s.T,
    (n, V) in a buffer, else None). Each sum is taken over differences (p * (log p - log q)), not as a difference of
    sums, which would cancel to a fraction of their size in fp32."""
    n = h_s.shape[0]
    capped, log_p_s, p_s, log_p_t, p_t, log_m = (b[:n] for b in buffers)
    _logits_(log_p_s, h_s, w_s, softcaps[0], temperature, capped)
    _log_softmax_(log_p_s, p_s)
    _logits_(log_p_t, h_t, w_t, softcaps[1], temperature)
    _log_softmax_(log_p_t, p_t)
    entropy = -_dot(p_s, log_p_s, log_m)
    if beta == 0.0:  # KL(p_t || p_s); d/dz_s = p_s - p_t
        divergence = _dot(p_t, log_p_t.sub_(log_p_s), log_m)
        grad = p_s.sub_(p_t) if gradient else None
    elif beta == 1.0:  # KL(p_s || p_t); d/dz_s = p_s * (log p_s - log p_t - KL)
        divergence = _dot(p_s, log_p_s.sub_(log_p_t), log_m)
        grad = log_p_s.sub_(divergence[:, None]).mul_(p_s) if gradient else None
    else:  # d/dz_s = (1 - beta) * p_s * (log p_s - log m - KL(p_s || m))
        # log p - log m from d = log((1 - beta) p_s) - log(beta p_t) alone, in log space (never from m's rounded
        # probabilities, whose log would disagree with log p by an ulp per entry, summed over the vocabulary):
        #   log p_t - log m = -log(beta) - softplus(d),  log p_s - log m = d - softplus(d) - log(1 - beta)
        c_s, c_t = math.log1p(-beta), math.log(beta)
        d = torch.sub(log_p_s, log_p_t, out=log_m).add_(c_s - c_t)
        softplus = torch.abs(d, out=log_p_t).neg_().exp_().log1p_().add_(torch.clamp(d, min=0.0, out=log_p_s))
        gap_s = torch.sub(d, softplus, out=log_p_s).sub_(c_s)  # log p_s - log m
        gap_t = softplus.neg_().sub_(c_t)  # log p_t - log m, in log_p_t's buffer
        kl_t = gap_t.mul_(p_t).sum(dim=1)
        kl_s = _dot(p_s, gap_s, log_m)
        divergence = beta * kl_t + (1.0 - beta) * kl_s
        grad = gap_s.sub_(kl_s[:, None]).mul_(p_s).mul_(1.0 - beta) if gradient else None
    if grad is not None:
        if temperature != 1.0:
            grad.div_(temperature)
        if softcaps[0]:  # d(c * tanh(y / c)) / dy = 1 - tanh(y / c)^2
            grad.mul_(capped.mul_(capped).neg_().add_(1.0))
    return divergence, entropy, grad


def _buffers(n: int, rows: int, vocab: int, device) -> list[torch.Tensor]:
    return [torch.empty(min(n, rows), vocab, dtype=torch.float32, device=device) for _ in range(6)]


class _TokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, beta, softcaps, temperature, rows, grad_enabled):
        # under no_grad (evaluation) nothing is differentiated, whatever the inputs' requires_grad says
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        with torch.autocast(h_s.device.type, enabled=False):  # fp32, whatever the training precision
            n, device = h_s.shape[0], h_s.device
            buffers = _buffers(n, rows, w_s.shape[0], device)
            divergence = torch.empty(n, dtype=torch.float32, device=device)
            entropy = torch.empty(n, dtype=torch.float32, device=device)
            grad_h = torch.empty(n, h_s.shape[1], dtype=torch.float32, device=device) if need_h else None
            w_dtype = w_s.dtype
            w_s, w_t = _fp32(w_s, w_t)
            for a in range(0, n, rows):
                d, e, g = _block(h_s[a : a + rows].float(), w_s, h_t[a : a + rows].float(), w_t, beta, softcaps,
                                 temperature, buffers, need_h)
                divergence[a : a + rows], entropy[a : a + rows] = d, e
                if need_h:
                    grad_h[a : a + rows] = _times_weight(g, w_s)
        ctx.config = (beta, softcaps, temperature, rows, h_s.dtype, w_dtype)
        ctx.save_for_backward(grad_h, *((h_s, w_s, h_t, w_t) if need_w else ()))
        ctx.mark_non_differentiable(entropy)
        return divergence, entropy

    @staticmethod
    def backward(ctx, grad_divergence, _):  # the entropy carries no gradient
        grad_h, *inputs = ctx.saved_tensors
        beta, softcaps, temperature, rows, h_dtype, w_dtype = ctx.config
        g = grad_divergence.float()[:, None]
        grad_w = None
        if inputs:  # the lm_head trains: project again and accumulate (g * dD/dz).T @ h_s
            h_s, w_s, h_t, w_t = inputs
            with torch.autocast(h_s.device.type, enabled=False):
                buffers = _buffers(h_s.shape[0], rows, w_s.shape[0], h_s.device)
                grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device)
                for a in range(0, h_s.shape[0], rows):
                    h = h_s[a : a + rows].float()
                    _, _, dz = _block(h, w_s, h_t[a : a + rows].float(), w_t, beta, softcaps, temperature, buffers,
                                      True)
                    grad_w.addmm_(dz.mul_(g[a : a + rows]).t(), h)
            grad_w = grad_w.to(w_dtype)
        grad_h = (grad_h * g).to(h_dtype) if grad_h is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def token_divergence(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, beta: float,
                     softcaps: tuple[float | None, float | None] = (None, None), temperature: float = 1.0,
                     rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position divergence (module docstring) between the student's and the teacher's next-token distributions.

    h_s: (N, H_s) student final-norm hidden states at the valid positions only; w_s: (V, H_s) its lm_head weight;
    h_t: (N, H_t), w_t: (V, H_t) the teacher's (no gradient flows to them); beta in [0, 1]; softcaps: (student,
    teacher) final logit soft-caps (Gemma 2/3/4: 30.0) or None; temperature > 0, for both; rows: vocabulary rows per
    block (default config/memory.divergence_rows(H_s, H_t)). Returns ((N,) divergence in nats, fp32, differentiable with
    respect to h_s and w_s; (N,) the student's entropy in nats, without a gradient). Raises ValueError when the
    vocabularies or the numbers of positions differ, or beta is outside [0, 1].
    """
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"student vocabulary {w_s.shape[0]} != teacher vocabulary {w_t.shape[0]}")
    if h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"{h_s.shape[0]} student positions != {h_t.shape[0]} teacher positions")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta {beta} outside [0, 1]")
    return _TokenDivergence.apply(h_s, w_s, h_t, w_t, float(beta), tuple(softcaps), float(temperature),
                                  rows or divergence_rows(w_s.shape[1], w_t.shape[1]), torch.is_grad_enabled())


# ------------------------------------------------------------------------------------------- in TRL's trainer
def divergence_loss(student_hidden_states: torch.Tensor, teacher_hidden_states: torch.Tensor,
                    student_lm_head_weight: torch.Tensor, teacher_lm_head_weight: torch.Tensor,
                    completion_mask: torch.Tensor, beta: float, num_items_in_batch=None,
                    student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale: float = 1.0,
                    teacher_logit_scale: float = 1.0, student_final_logit_softcapping: float | None = None,
                    teacher_final_logit_softcapping: float | None = None,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's `_chunked_divergence_loss` (trl/trainer/distillation_trainer.py), same arguments and returns,
    through token_divergence: hidden states (B, K, H) aligned to the completion, completion_mask (B, K); returns
    (loss: sum over valid positions / num_items_in_batch, or their mean; the student's entropy summed over them; how
    many there are). Raises ValueError for a bias or a logit scale (divergence_problem keeps TRL's there)."""
    if student_lm_head_bias is not None or teacher_lm_head_bias is not None or (
            student_logit_scale, teacher_logit_scale) != (1.0, 1.0):
        raise ValueError("an lm_head bias or a logit scale: TRL's divergence handles them, this one does not")
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    divergence, entropy = token_divergence(h_s, student_lm_head_weight, h_t, teacher_lm_head_weight, beta,
                                           (student_final_logit_softcapping, teacher_final_logit_softcapping),
                                           temperature)
    loss = divergence.sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss, entropy.sum(), n_valid


def divergence_problem(student, teacher, *, sharded: bool) -> str | None:
    """Why token_divergence would compute something else than TRL's divergence for these two models (transformers
    models, under any PEFT wrapper), or None. `sharded`: the launch partitions the weights (ZeRO-3)."""
    from .logprobs import head_problem

    for name, model in (("student", student), ("teacher", teacher)):
        problem = head_problem(model, (), sharded=sharded)
        if problem:
            return f"the {name}: {problem}"
    return None

"""Next-token log-probabilities only where a label is, soft-capped, in fp32 tiles: the one LM-head path of every
method. `sft`'s loss is their negative sum (training/loss.py); dpo/KTO (policy and reference), rl (GRPO/RLOO:
policy, old-policy and reference) read them per token through `install_supervised_head`.

Reference (what the model's own forward computes, then the methods gather):
    logits   = softcap * tanh(lm_head(h) / softcap) / temperature    # every position, (batch, length, vocab)
    logprobs = log_softmax(logits)[..., labels]                        # fp32 in TRL's trainers

Here: only the rows of final-norm hidden states whose next-token label is kept (not -100) are projected, in tiles of
`token_chunk` rows x `vocab_chunk` columns (fp32, 1,024 x 8,192 = 32 MiB) with an online log-sum-exp; backward
recomputes each tile. Memory holds one tile, never (positions x vocabulary), and prompt and padding positions cost
nothing. TRL 1.16's fused head (`trl.trainer.utils.add_fused_lm_head`) projects the same rows only on a Triton device;
on any other it projects every position (prompt and padding included), in 4,096 x 32,768 tiles in the autocast dtype.
tests/unit/test_logprobs.py checks values and gradients against log_softmax of the soft-capped logits and against TRL's
own head, per method.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from ..config.schema import LOSS_TOKEN_CHUNK as TOKEN_CHUNK
from ..config.schema import LOSS_VOCAB_CHUNK as VOCAB_CHUNK

# The per-token fields of TRL's FusedCausalLMOutput computed besides the log-probabilities (without a gradient)
EXTRAS = ("entropy", "mean_logits", "is_top1")
# What our head computes of those fields; a trainer asking for others (log_sum_sq_probs) keeps TRL's head
OUTPUTS = frozenset({"log_probs", *EXTRAS})


def _tile(h: torch.Tensor, w: torch.Tensor, softcap: float | None, temperature: float,
          buffer: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one tile, h (n, H) @ w (v, H).T, soft-capped, divided by the temperature, written into the
    front of `buffer` (flat, at least n * v floats: one allocation per call, not per tile); (n, v)."""
    z = buffer[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    torch.mm(h, w.t() if w.dtype == torch.float32 else w.float().t(), out=z)
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _buffers(rows: int, vocab_chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat fp32 tile buffers (logits, and their exponentials / gradient), reused by every tile of a call: a
    32 MiB tile allocated per tile is mapped and faulted in afresh each time (glibc serves blocks this large with
    mmap), which costs more system time than the tile's arithmetic."""
    return (torch.empty(rows * vocab_chunk, dtype=torch.float32, device=device),
            torch.empty(rows * vocab_chunk, dtype=torch.float32, device=device))


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, temperature, token_chunk, vocab_chunk, extras):
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 tiles, whatever the training precision
            n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
            lse = torch.empty(n, dtype=torch.float32, device=device)
            target_logit = torch.empty(n, dtype=torch.float32, device=device)
            # the extras TRL's trainers log: entropy, mean logit over the vocabulary, target is the (first) argmax
            entropy, mean_logits, is_top1 = (torch.empty(n if name in extras else 0, dtype=dtype, device=device)
                                             for name, dtype in (("entropy", torch.float32),
                                                                 ("mean_logits", torch.float32),
                                                                 ("is_top1", torch.bool)))
            z_buffer, e_buffer = _buffers(min(n, token_chunk), min(vocab, vocab_chunk), device)
            for a in range(0, n, token_chunk):
                h = hidden[a : a + token_chunk].float()
                y = targets[a : a + token_chunk]
                rows_here = h.shape[0]
                m = torch.full((rows_here,), float("-inf"), device=device)
                s = torch.zeros(rows_here, device=device)
                zs = torch.zeros(rows_here, device=device)  # sum of exp(z - m) * z: the entropy's numerator
                z_sum = torch.zeros(rows_here, device=device)
                before = torch.full((rows_here,), float("-inf"), device=device)  # largest logit left of the target
                t_logit = torch.zeros(rows_here, device=device)
                for v in range(0, vocab, vocab_chunk):
                    z = _tile(h, weight[v : v + vocab_chunk], softcap, temperature, z_buffer)
                    new_m = torch.maximum(m, z.amax(dim=1))
                    rescale = torch.exp(m - new_m)
                    e = e_buffer[: z.numel()].view_as(z)
                    torch.sub(z, new_m[:, None], out=e).exp_()
                    s = s * rescale + e.sum(dim=1)
                    if entropy.numel():
                        zs = zs * rescale + e.mul_(z).sum(dim=1)
                    if mean_logits.numel():
                        z_sum += z.sum(dim=1)
                    if is_top1.numel():
                        left = torch.arange(z.shape[1], device=device)[None, :] < (y - v)[:, None]
                        before = torch.maximum(before, z.masked_fill(~left, float("-inf")).amax(dim=1))
                    m = new_m
                    inside = (y >= v) & (y < v + z.shape[1])
                    if inside.any():
                        rows = inside.nonzero().squeeze(1)
                        t_logit[rows] = z[rows, y[rows] - v]
                log_z = m + torch.log(s)
                lse[a : a + token_chunk] = log_z
                target_logit[a : a + token_chunk] = t_logit
                if entropy.numel():
                    entropy[a : a + token_chunk] = log_z - zs / s
                if mean_logits.numel():
                    mean_logits[a : a + token_chunk] = z_sum / vocab
                if is_top1.numel():
                    is_top1[a : a + token_chunk] = (t_logit >= m) & (t_logit > before)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.config = (softcap, temperature, token_chunk, vocab_chunk)
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return target_logit - lse, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logp, *_):  # the extras carry no gradient
        with torch.autocast(grad_logp.device.type, enabled=False):
            hidden, weight, targets, lse = ctx.saved_tensors
            softcap, temperature, token_chunk, vocab_chunk = ctx.config
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            g = grad_logp.float()
            n, vocab = hidden.shape[0], weight.shape[0]
            z_buffer, d_buffer = _buffers(min(n, token_chunk), min(vocab, vocab_chunk), hidden.device)
            for a in range(0, n, token_chunk):
                h = hidden[a : a + token_chunk].float()
                y = targets[a : a + token_chunk]
                ga = g[a : a + token_chunk]
                for v in range(0, vocab, vocab_chunk):
                    w = weight[v : v + vocab_chunk]
                    w = w if w.dtype == torch.float32 else w.float()
                    z = _tile(h, w, softcap, temperature, z_buffer)
                    # d logp(y) / dz = onehot(y) - softmax(z), times the incoming gradient per row
                    dz = d_buffer[: z.numel()].view_as(z)
                    torch.sub(z, lse[a : a + token_chunk, None], out=dz).exp_().mul_(-ga[:, None])
                    inside = (y >= v) & (y < v + z.shape[1])
                    rows = inside.nonzero().squeeze(1)
                    dz[rows, y[rows] - v] += ga[rows]
                    if softcap:  # d(c * tanh(x / c)) / dx = 1 - tanh(x / c)^2, and tanh(x / c) = z * T / c
                        t = z.mul_(temperature / softcap)
                        dz.mul_(t.mul_(t).neg_().add_(1.0))
                    if temperature != 1.0:
                        dz.div_(temperature)
                    if need_h:
                        grad_h[a : a + token_chunk].addmm_(dz, w)
                    if need_w:
                        grad_w[v : v + vocab_chunk].addmm_(dz.t(), h)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None, None, None)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                   temperature: float = 1.0, extras: tuple[str, ...] = (), token_chunk: int = TOKEN_CHUNK,
                   vocab_chunk: int = VOCAB_CHUNK) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """log p(target) under softmax(softcap * tanh(hidden @ weight.T / softcap) / temperature), per row (nats, fp32).

    hidden: (N, H) final-norm hidden states of the scored positions only; weight: (V, H) lm_head; targets: (N,) ids;
    softcap: the final logit soft-cap (Gemma 2/3/4: 30.0) or None; extras: any of "entropy" (nats), "mean_logits"
    (the mean of the row's scaled logits over the vocabulary), "is_top1" (the target is the first argmax), as TRL's
    FusedCausalLMOutput defines them. Returns ((N,) log-probabilities with a gradient to `hidden` and `weight`,
    {extra: (N,) tensor without a gradient}).
    """
    logp, *rest = _TokenLogProbs.apply(hidden, weight, targets, softcap, float(temperature), token_chunk,
                                       vocab_chunk, frozenset(extras))
    return logp, {name: value for name, value in zip(EXTRAS, rest) if name in extras}


# ------------------------------------------------------------------------------------------ TRL's head, replaced
def head_problem(model, outputs: tuple[str, ...] | frozenset, *, sharded: bool) -> str | None:
    """Why our head would compute something else than TRL's fused head on `model` (a PreTrainedModel), or None.
    `sharded`: the launch partitions the weights (ZeRO-3), so no whole lm_head weight is there to read."""
    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    if sharded:
        return "the launch shards the lm_head weight (ZeRO-3): TRL's head gathers it"
    if set(outputs) - OUTPUTS:
        return f"the trainer asks for {sorted(set(outputs) - OUTPUTS)}"
    if getattr(head, "bias", None) is not None:
        return "the lm_head has a bias"
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, key, None) not in (None, 1.0):
            return f"the config scales the logits ({key})"
    if getattr(text, "output_router_logits", False) or getattr(model.config, "output_router_logits", False):
        return "the model returns router logits (mixture of experts): TRL's head adds their load-balancing loss"
    return None


def install_supervised_head(model, temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Give `model` (a PreTrainedModel, under any PEFT wrapper) our fused LM head, in place of TRL's if it had one:
    `model(..., labels=labels, fused_lm_head=True)` returns TRL's FusedCausalLMOutput (log_probs (B, T-1), zero where
    the label is -100; the EXTRAS named in `outputs`, without a gradient; label_mask; loss: their negative mean, or
    sum / num_items_in_batch), computed by `token_logprobs` on the labelled positions only. Without `fused_lm_head` the
    model's own forward runs (generation is unchanged). Call head_problem first."""
    from trl.trainer.utils import FusedCausalLMOutput

    from ..models.checks import softcaps

    own_forward = types.MethodType(type(model).forward, model)
    softcap = softcaps(model.config)[1]
    extras = tuple(name for name in EXTRAS if name in outputs)

    # the model's own signature kept: generation reads it (no `logits_to_keep` there, and generate's first step
    # would compute the whole prompt's logits: 8 prompts x 70 tokens x 256,000 in fp32 took 1.1 GiB more, measured)
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return own_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        weight = self.get_output_embeddings().weight
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        logp, more = token_logprobs(hidden[mask], weight, labels[mask], softcap, temperature, extras)
        # masked_scatter keeps an all-masked batch connected to the model: a zero with a gradient
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        more = {name: x.new_zeros(mask.shape).masked_scatter(mask, x) for name, x in more.items()}
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **more)

    model.forward = types.MethodType(forward, model)


def use_supervised_heads(trainer, outputs: tuple[str, ...] = ("log_probs",), *, temperature: float = 1.0,
                         sharded: bool = False, entropy_gradient: bool = False) -> dict[str, Any]:
    """Replace the fused LM head TRL's trainer put on its policy (and its reference model, if any) by ours, where ours
    computes the same (head_problem; `entropy_gradient`: the loss differentiates the entropy, which ours does not).
    Returns run.json's record: {"lm_head": "supervised_chunked" | "trl", "reason": why TRL's was kept}."""
    from ..models.lora import base_model

    policy = base_model(trainer.model)
    problem = ("the loss differentiates the entropy (an entropy bonus)" if entropy_gradient
               else head_problem(policy, outputs, sharded=sharded))
    if problem:
        return {"lm_head": "trl", "reason": problem}
    install_supervised_head(policy, temperature, outputs)
    reference = getattr(trainer, "ref_model", None)
    if reference is not None:
        install_supervised_head(base_model(reference), temperature, ("log_probs",))
    return {"lm_head": "supervised_chunked", "reason": "only labelled positions projected, fp32 tiles "
            f"{TOKEN_CHUNK} x {VOCAB_CHUNK}"}


def describe_head(head: dict[str, str]) -> str:
    """use_supervised_heads' record in words."""
    if head["lm_head"] == "supervised_chunked":
        return "the supervised-positions-only fp32 tiled LM head"
    return f"TRL's fused LM head ({head['reason']})"

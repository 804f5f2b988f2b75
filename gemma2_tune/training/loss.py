"""Cross-entropy only where something is learned, without a full-vocabulary logits tensor.

Reference (what the model's own forward does):
    logits = softcap * tanh(lm_head(h) / softcap)      # every position, (batch, length, 256000)
    loss   = cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)

Here: only the final-norm hidden states at supervised positions are used, in tiles of
`token_chunk` rows x `vocab_chunk` columns with an online log-sum-exp, in fp32. Backward recomputes
each tile, so memory holds one tile, never (positions x vocabulary).
tests/unit/test_loss.py checks loss and gradients against the reference, soft-cap on.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config.schema import LOSS_TOKEN_CHUNK as TOKEN_CHUNK
from ..config.schema import LOSS_VOCAB_CHUNK as VOCAB_CHUNK
from ..data.turns import IGNORE_INDEX


def _tile_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one tile, soft-capped; also tanh (needed for the soft-cap's derivative)."""
    z = h @ w.float().t()
    if softcap:
        t = torch.tanh(z / softcap)
        return t * softcap, t
    return z, None


class _SupervisedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, token_chunk, vocab_chunk):
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 tiles, whatever the training precision
            return _SupervisedCE._forward(ctx, hidden, weight, targets, softcap, token_chunk, vocab_chunk)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, softcap, token_chunk, vocab_chunk):
        n, vocab = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for a in range(0, n, token_chunk):
            h = hidden[a : a + token_chunk].float()
            y = targets[a : a + token_chunk]
            m = torch.full((h.shape[0],), float("-inf"), device=h.device)
            s = torch.zeros(h.shape[0], device=h.device)
            t_logit = torch.zeros(h.shape[0], device=h.device)
            for v in range(0, vocab, vocab_chunk):
                z, _ = _tile_logits(h, weight[v : v + vocab_chunk], softcap)
                new_m = torch.maximum(m, z.max(dim=1).values)
                s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(dim=1)
                m = new_m
                inside = (y >= v) & (y < v + z.shape[1])
                if inside.any():
                    rows = inside.nonzero().squeeze(1)
                    t_logit[rows] = z[rows, y[rows] - v]
            lse[a : a + token_chunk] = m + torch.log(s)
            target_logit[a : a + token_chunk] = t_logit
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.config = (softcap, token_chunk, vocab_chunk)
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SupervisedCE._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        softcap, token_chunk, vocab_chunk = ctx.config
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        vocab = weight.shape[0]
        for a in range(0, hidden.shape[0], token_chunk):
            h = hidden[a : a + token_chunk].float()
            y = targets[a : a + token_chunk]
            for v in range(0, vocab, vocab_chunk):
                w = weight[v : v + vocab_chunk]
                z, t = _tile_logits(h, w, softcap)
                dz = torch.exp(z - lse[a : a + token_chunk, None])  # softmax
                inside = (y >= v) & (y < v + z.shape[1])
                rows = inside.nonzero().squeeze(1)
                dz[rows, y[rows] - v] -= 1.0
                if softcap:
                    dz = dz * (1.0 - t * t)  # d(c*tanh(x/c))/dx
                dz = dz * grad_out
                if need_h:
                    grad_h[a : a + token_chunk] += dz @ w.float()
                if need_w:
                    grad_w[v : v + vocab_chunk] += dz.t() @ h
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None)


# A fused replacement for the tiles: (weight (V, H), hidden (N, H), targets (N,)) -> summed loss (0-dim fp32)
FusedLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tiled_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                   token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of soft-capped logits hidden @ weight.T against targets, in fp32 tiles (nats).

    hidden: (N, H); weight: (V, H); targets: (N,) token ids. Returns a 0-dim fp32 tensor with a gradient.
    """
    return _SupervisedCE.apply(hidden, weight, targets, softcap, token_chunk, vocab_chunk)


def supervised_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, softcap: float | None,
                        token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK,
                        fused: FusedLoss | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions (nats), and their count.

    hidden: (batch, length, hidden) after the final norm; labels: (batch, length), unshifted, -100 = ignore;
    weight: (vocab, hidden) lm_head; softcap: the final logit soft-cap (Gemma 2: 30.0) or None; fused: a
    kernel computing the same sum (with the same soft-cap) instead of the fp32 tiles.
    Returns (a 0-dim fp32 tensor with a gradient, number of supervised positions).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    if selected.shape[0] == 0:  # keeps the graph connected: a zero with a gradient
        return hidden.sum() * 0.0, 0
    if fused is not None:
        return fused(weight, selected, shifted[mask]).float(), int(selected.shape[0])
    return tiled_loss_sum(selected, weight, shifted[mask], softcap, token_chunk, vocab_chunk), int(selected.shape[0])

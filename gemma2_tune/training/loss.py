"""Cross-entropy only where something is learned, without a full-vocabulary logits tensor.

Reference (what the model's own forward does):
    logits = softcap * tanh(lm_head(h) / softcap)      # every position, (batch, length, 256000)
    loss   = cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)

Here: only the final-norm hidden states at supervised positions are used, through the one LM-head path of every
method (training/logprobs.py: tiles of `token_chunk` rows x `vocab_chunk` columns with an online log-sum-exp, in
fp32; backward recomputes each tile, so memory holds one tile, never (positions x vocabulary)): the loss is the
negative sum of their log-probabilities. tests/unit/test_loss.py checks loss and gradients against the reference,
soft-cap on.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config.schema import LOSS_TOKEN_CHUNK as TOKEN_CHUNK
from ..config.schema import LOSS_VOCAB_CHUNK as VOCAB_CHUNK
from ..data.turns import IGNORE_INDEX
from .logprobs import token_logprobs


# A fused replacement for the tiles: (weight (V, H), hidden (N, H), targets (N,)) -> summed loss (0-dim fp32)
FusedLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tiled_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                   token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of soft-capped logits hidden @ weight.T against targets, in fp32 tiles (nats).

    hidden: (N, H); weight: (V, H); targets: (N,) token ids. Returns a 0-dim fp32 tensor with a gradient.
    """
    logp, _ = token_logprobs(hidden, weight, targets, softcap, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    return -logp.sum()


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

"""Packing rows into fixed-length blocks without contamination, and the collator that batches them.

Rows are placed by best-fit decreasing into blocks of at most `max_length` tokens. Inside a block,
position ids restart at 0 for every row and no attention mask is passed: transformers then masks
each row from the others (for sliding-window and global layers alike) under eager attention, provided
the KV cache is off. tests/unit/test_packing.py proves it: per-row logits of a packed batch equal the rows
run alone. The first label of every row is -100, so no row is trained to predict its neighbour's start.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

from .examples import Example
from .turns import IGNORE_INDEX, Image


@dataclass
class Block:
    """One batch item: rows packed end to end (position ids restart per row), `rows` of them; the images of its
    image tokens, in order (a row with images is a block of its own: `pack`)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    rows: int
    images: tuple[Image, ...] = ()


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of rows per block: each row, longest first, goes to the fullest block it still fits in.

    Deterministic (ties by index). Free space takes at most capacity+1 distinct values, so the search is
    over those values, not over blocks.
    """
    if any(n > capacity for n in lengths):
        raise ValueError("a row is longer than the block capacity")
    blocks: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free space -> blocks with exactly that much left
    free_values: list[int] = []  # sorted distinct keys of by_free
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        need = lengths[i]
        pos = bisect.bisect_left(free_values, need)
        if pos < len(free_values):
            free = free_values[pos]
            block = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_values.pop(pos)
        else:
            block, free = len(blocks), capacity
            blocks.append([])
        blocks[block].append(i)
        left = free - need
        if left not in by_free:
            bisect.insort(free_values, left)
            by_free[left] = []
        by_free[left].append(block)
    return blocks


# Why rows with images are not packed (transformers 5.25, masking_utils.create_causal_mask): with packed rows the
# mask's functions are called with each token's position in its own row instead of its index in the block, and the
# image overlay of the sliding-window layers (Gemma 3 and Gemma 4) reads the image blocks by index: a packed row's
# image tokens would attend bidirectionally to the wrong tokens (tests/unit/test_images.py shows it).
IMAGE_ROWS_UNPACKED = ("rows with images are blocks of their own, never packed: transformers' sliding-window image "
                       "mask reads packed rows' image tokens at the wrong places")


def pack(examples: Sequence[Example], capacity: int) -> list[Block]:
    """Examples -> blocks of at most `capacity` tokens (best-fit decreasing); each row's first label is
    IGNORE_INDEX so no row learns to predict its neighbour's start. Rows with images are blocks of their own
    (IMAGE_ROWS_UNPACKED), after the packed ones. ValueError when a row exceeds capacity."""
    with_images = [e for e in examples if e.images]
    examples = [e for e in examples if not e.images]
    out = []
    for members in best_fit_decreasing([len(e.input_ids) for e in examples], capacity):
        ids, labels, positions = [], [], []
        for i in sorted(members):  # original order inside a block
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += range(len(e.input_ids))
        out.append(Block(ids, labels, positions, len(members)))
    return out + unpacked(with_images)


def unpacked(examples: Sequence[Example]) -> list[Block]:
    """One row per block: the same collator and masking rules, without packing."""
    return [Block(e.input_ids, [IGNORE_INDEX] + e.labels[1:], list(range(len(e.input_ids))), 1, e.images)
            for e in examples]


@dataclass
class BlockCollator:
    """Right-pads blocks to the longest in the batch. Padding becomes its own 'row' (positions from 0,
    labels -100), so no 2D attention mask is needed and real rows never attend to it."""

    pad_token_id: int
    pad_tokens: int = 0
    total_tokens: int = 0

    @property
    def padding_fraction(self) -> float:
        """Share of the token slots batched so far that were padding."""
        return self.pad_tokens / self.total_tokens if self.total_tokens else 0.0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        self.total_tokens += width * len(features)
        self.pad_tokens += sum(width - len(f["input_ids"]) for f in features)
        ids, labels, positions = [], [], []
        for f in features:
            n = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * n)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * n)
            positions.append(list(f["position_ids"]) + list(range(n)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }

"""Rows -> training examples: Gemma turns, token ids, labels (-100 where nothing is learned).

Every row that doesn't make it into training is counted under a reason, with its first locations,
so a run can say exactly what happened to its data.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config.schema import SftDataSection
from ..errors import UserError
from ..families import GEMMA2, Family
from .images import BadImage, ImageProcessing, ImageReader, images_of
from .sources import Row, row_turns
from .turns import IGNORE_INDEX, BadRow, Image, Rendered, Turn, render, supervision_mask

SHOWN_LOCATIONS = 5


@dataclass
class Example:
    """One training row: token ids and labels (IGNORE_INDEX where nothing is learned), same length, and the images
    its image tokens stand for, in order (their pixels are made when the row is batched: data/collator.py)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    images: tuple[Image, ...] = ()

    @property
    def supervised_tokens(self) -> int:
        """Tokens whose prediction is learned (labels[0] never is: nothing precedes it)."""
        # labels[0] is never predicted (nothing precedes it), so it is never learned.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class DataReport:
    """What happened to every row of a source: kept, bad (with where and why), truncated, dropped."""

    rows_read: int = 0
    rows_kept: int = 0
    rows_bad: int = 0
    rows_truncated: int = 0
    rows_dropped_overlong: int = 0
    rows_dropped_unsupervised: int = 0
    notes: dict[str, int] = field(default_factory=dict)  # what was changed in kept rows, and how often
    total_tokens: int = 0
    supervised_tokens: int = 0
    bad_rows: list[str] = field(default_factory=list)  # first few "where: reason"
    dropped_rows: list[str] = field(default_factory=list)
    rows_duplicate: int = 0  # kept rows identical to an earlier kept row (they train once per copy)
    duplicate_rows: list[str] = field(default_factory=list)  # first few "where = where of the first copy"
    image_rows: int = 0  # kept rows with images
    images: int = 0  # images in kept rows
    image_tokens: int = 0  # their tokens (markers and soft tokens; never learned), counted in total_tokens

    def to_dict(self) -> dict[str, Any]:
        """As plain JSON-ready data (for run.json)."""
        return asdict(self)

    def bad(self, where: str, why: object) -> None:
        """Count a bad row, keeping the first locations."""
        self.rows_bad += 1
        if len(self.bad_rows) < SHOWN_LOCATIONS:
            self.bad_rows.append(f"{where}: {why}")

    def dropped(self, where: str, why: object) -> None:
        """Keep the first locations of rows dropped for their length or supervision (counted by the caller)."""
        if len(self.dropped_rows) < SHOWN_LOCATIONS:
            self.dropped_rows.append(f"{where}: {why}")

    def check_usable(self, on_bad_rows: str, what: str = "rows") -> None:
        """Raise UserError when bad rows exist and data.on_bad_rows is 'error', or nothing usable is left."""
        if self.rows_bad and on_bad_rows == "error":
            shown = "\n".join(f"  - {b}" for b in self.bad_rows)
            raise UserError(f"data: {self.rows_bad} bad rows and data.on_bad_rows is 'error'; first ones:\n{shown}")
        if not self.rows_kept:
            raise UserError(f"data: no usable {what} left\n" + "\n".join(self.summary_lines())
                            + f"\ndata: no usable {what} left (the rows above say why)")

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the log."""
        lines = [
            f"rows: {self.rows_read} read, {self.rows_kept} kept, {self.rows_bad} bad (skipped), "
            f"{self.rows_truncated} truncated, {self.rows_dropped_overlong} dropped as too long, "
            f"{self.rows_dropped_unsupervised} dropped with no supervised token",
            f"tokens: {self.total_tokens} total, {self.supervised_tokens} supervised "
            f"({self.supervised_tokens / max(self.total_tokens, 1):.1%})",
        ]
        if self.images:
            lines.append(f"images: {self.images} in {self.image_rows} rows, {self.image_tokens} image tokens "
                         f"({self.image_tokens / max(self.total_tokens, 1):.1%} of all; never learned)")
        lines += [f"  {count} x {note}" for note, count in sorted(self.notes.items())]
        lines += [f"  bad row {b}" for b in self.bad_rows]
        lines += [f"  dropped row {d}" for d in self.dropped_rows]
        if self.rows_duplicate:
            what = "rows are exact duplicates" if self.rows_duplicate > 1 else "row is an exact duplicate"
            lines.append(f"warning: {self.rows_duplicate} kept {what} of an earlier row (each copy trains: remove "
                         "them if they are not meant to weigh more)")
            lines += [f"  duplicate row {d}" for d in self.duplicate_rows]
        return lines


@dataclass
class Encoded:
    """A rendered conversation tokenized once: ids, character offsets per token, supervised mask; with images,
    each image's expansion's character span and soft tokens."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    mask: list[bool]  # supervised, per token
    images: tuple[Image, ...] = ()
    image_spans: tuple[tuple[int, int], ...] = ()
    soft_tokens: tuple[int, ...] = ()


class Overlong(BadRow):
    """A row longer than data.max_length under data.overlong='drop'."""


class TurnTokenizer:
    """Renders turns in the family's format and tokenizes the whole string once, with offsets.

    Tokenizing the full rendered text (not pieces) gives exactly the ids the model sees at inference;
    the character offsets then map the supervised spans onto tokens. `thinking` and `empty_thought`: Gemma 4's
    switches (turns.render).
    """

    def __init__(self, tokenizer: Any, family: Family = GEMMA2, thinking: bool = False, empty_thought: bool = False,
                 images: ImageProcessing | None = None):
        self.tokenizer = tokenizer
        self.images = images
        self.render_options = {"family": family, "thinking": thinking, "empty_thought": empty_thought}

    def encode(self, turns: Sequence[Turn], train_on: str = "model_turns") -> Encoded:
        """Render `turns`, expand each image as the checkpoint's processor does (`images`), tokenize the text in one
        piece, mark the supervised tokens; an image's tokens (its markers and soft tokens) never are. Raises BadRow
        for a row with images when no image processor was given, or an image its processor cannot take."""
        rendered = render(turns, **self.render_options)
        found = images_of(turns)
        spans: list = []
        features: dict = {"soft_tokens": []}
        if found:
            if self.images is None:
                raise BadImage("a row with images, but the checkpoint has no image processor (no processor_config.json "
                               "or preprocessor_config.json beside its weights): its images cannot be made into "
                               "pixels as the model was trained to see them")
            rendered, spans, features = self.images.expand(rendered, found)
        enc = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        mask = [True] * len(offsets) if train_on == "all" else supervision_mask(offsets, rendered.supervised)
        if found:  # every token of an image's expansion (its markers, soft tokens, Gemma 3's blank lines): not learned
            inside = [any(a <= start < b or a < end <= b for a, b in spans) for start, end in offsets]
            mask = [keep and not self.images.is_image_token(i) and not within
                    for keep, i, within in zip(mask, ids, inside)]
        return Encoded(rendered.text, ids, offsets, mask, tuple(found), tuple(spans), tuple(features["soft_tokens"]))


    def model_inputs(self, rendered: Rendered, turns: Sequence[Turn]) -> dict[str, Any]:
        """A rendered prompt (with its turns' images) as one forward's inputs, torch tensors: input_ids (1, length);
        with an image processor the token types of its image mask (1, length), always, and with images their
        pixel values (and Gemma 4's image_position_ids). Raises BadImage as `encode` does."""
        import torch

        found = images_of(turns)
        features: dict = {}
        if found:
            if self.images is None:
                raise BadImage("images, but the checkpoint has no image processor")
            rendered, _, features = self.images.expand(rendered, found)
        ids = torch.tensor([self.tokenizer(rendered.text, add_special_tokens=False)["input_ids"]])
        inputs: dict[str, Any] = {"input_ids": ids}
        if self.images is not None:
            inputs[self.images.token_type_key] = (ids == self.images.ids["soft"]).long()
        for key in ("pixel_values", "image_position_ids"):
            if key in features:
                inputs[key] = features[key]
        return inputs


def build_example(turns: Sequence[Turn], encoder: TurnTokenizer, cfg: SftDataSection) -> Example:
    """Raises Overlong / BadRow for rows that can't train. A row with images is never cut inside or before an
    image (its soft tokens must all be there for the image's features): it is dropped instead."""
    encoded = encoder.encode(turns, cfg.train_on)
    ids, mask = encoded.ids, encoded.mask
    truncated = False
    if len(ids) > cfg.max_length:
        if cfg.overlong == "drop":
            raise Overlong(f"{len(ids)} tokens > data.max_length {cfg.max_length}")
        cut = _cut_image(encoded, cfg.max_length)
        if cut is not None:
            raise Overlong(f"{len(ids)} tokens > data.max_length {cfg.max_length}, and truncating would cut image "
                           f"{cut + 1} ({encoded.images[cut].describe()}, {encoded.soft_tokens[cut]} tokens)")
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
        truncated = True
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask)]
    example = Example(ids, labels, truncated, encoded.images)
    if not example.supervised_tokens:
        raise BadRow("no supervised token" + (f" left after truncation to {cfg.max_length}" if truncated else ""))
    return example


def _cut_image(encoded: Encoded, length: int) -> int | None:
    """The first image whose expansion does not end within the first `length` tokens, or None."""
    for k, (_, end) in enumerate(encoded.image_spans):
        if not encoded.offsets[:length] or encoded.offsets[:length][-1][1] < end:
            return k
    return None


def row_image_reader(row: Row, cfg: SftDataSection) -> ImageReader:
    """How a row's images are read: relative paths against its file's folder, data.max_image_mb."""
    return ImageReader(Path(row.file).parent if row.file else None, cfg.max_image_mb)


def build_examples(rows: Sequence[Row], tokenizer: Any, cfg: SftDataSection, family: Family = GEMMA2, *,
                   empty_thought: bool = False, images: ImageProcessing | None = None,
                   ) -> tuple[list[Example], DataReport]:
    """Rows -> examples (Gemma turns, ids, labels) and a report of every row left out and why, and of kept rows
    that repeat an earlier one exactly (kept, and warned about). `empty_thought`: the checkpoint's size writes
    Gemma 4's empty thought block (gemma4.writes_empty_thought). `images`: the checkpoint's image processor, for a
    family that takes images (rows' images are read, checked and expanded into soft tokens; a missing, unreadable
    or oversized image makes its row bad); None: image rows are bad rows saying why.

    Raises UserError when no row is usable, or when bad rows exist and data.on_bad_rows is 'error'.
    """
    import sys

    encoder = TurnTokenizer(tokenizer, family, cfg.enable_thinking, empty_thought, images)
    read_images = family.images is not None
    report = DataReport(rows_read=len(rows))
    examples: list[Example] = []
    notes: Counter = Counter()
    first_seen: dict[bytes, str] = {}  # digest of a kept row's raw data -> where it was first
    if len(rows) >= 2000 and sys.stderr.isatty():  # a progress bar for long tokenizing, on a terminal only
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="tokenizing", unit="row")
    for row in rows:
        row_notes: Counter = Counter()
        try:
            turns = row_turns(row.data, cfg, family, notes=row_notes,
                              images=row_image_reader(row, cfg) if read_images else None)
        except BadRow as exc:
            report.bad(row.where, exc)
            continue
        try:
            example = build_example(turns, encoder, cfg)
        except BadRow as exc:
            if isinstance(exc, BadImage):  # an image that cannot be made into pixels: a bad row, not a dropped one
                report.bad(row.where, exc)
                continue
            if isinstance(exc, Overlong):
                report.rows_dropped_overlong += 1
            else:
                report.rows_dropped_unsupervised += 1
            report.dropped(row.where, exc)
            continue
        examples.append(example)
        digest = hashlib.sha256(json.dumps(row.data, sort_keys=True, default=str).encode()).digest()
        if digest in first_seen:
            report.rows_duplicate += 1
            if len(report.duplicate_rows) < SHOWN_LOCATIONS:
                report.duplicate_rows.append(f"{row.where} = {first_seen[digest]}")
        else:
            first_seen[digest] = row.where
        notes.update(row_notes)  # counted only for rows that train
        report.rows_truncated += example.truncated
        report.total_tokens += len(example.input_ids)
        report.supervised_tokens += example.supervised_tokens
        if example.images:
            report.image_rows += 1
            report.images += len(example.images)
            report.image_tokens += sum(1 for i in example.input_ids if images.is_image_token(i))
    report.rows_kept = len(examples)
    report.notes = dict(notes)
    report.check_usable(cfg.on_bad_rows)
    return examples, report


def image_mark(encoded: Encoded, k: int, tokens: int) -> str:
    """How preview shows image `k` of a row: one placeholder with its tokens (never learned), e.g.
    '⟨image 1: red.png, 40x30 px, 262 tokens⟩'."""
    return f"⟨image {k + 1}: {encoded.images[k].describe()}, {tokens} tokens⟩"


def mark_supervised(encoded: Encoded, limit: int, open_mark: str = "⟦", close_mark: str = "⟧") -> str:
    """The rendered text with each supervised run of tokens wrapped in marks (first `limit` tokens); the tokens of
    each image's expansion (its markers and soft tokens, never supervised) shown as one placeholder (`image_mark`)."""
    pieces, prev_end, inside = [], 0, False
    tokens = list(zip(encoded.offsets, encoded.mask))[:limit]
    image_at = {}  # index of an image's first token -> (image, its tokens within the limit)
    for k, (a, b) in enumerate(encoded.image_spans):
        members = [i for i, ((start, _), _) in enumerate(tokens) if a <= start < b]
        if members:
            image_at[members[0]] = (k, len(members))
    i = 0
    while i < len(tokens):
        (start, end), keep = tokens[i]
        if i in image_at:
            k, n = image_at[i]
            pieces.append(encoded.text[prev_end:start])
            if inside:
                pieces.append(close_mark)
                inside = False
            pieces.append(image_mark(encoded, k, n))
            prev_end = tokens[i + n - 1][0][1]
            i += n
            continue
        if keep != inside:
            pieces.append(encoded.text[prev_end:start])
            pieces.append(open_mark if keep else close_mark)
            prev_end, inside = start, keep
        pieces.append(encoded.text[prev_end:end])
        prev_end = end
        i += 1
    if inside:
        pieces.append(close_mark)
    if limit < len(encoded.ids):
        pieces.append(f" …[truncated at {limit} tokens; {len(encoded.ids) - limit} more]")
    return "".join(pieces)

"""`gemma2-tune preview`: rows as they will be trained, learned tokens between ⟦ ⟧, with counts."""

from __future__ import annotations

from typing import Any, Iterator

from ..config.schema import DataSection
from ..families import Family
from .examples import TurnTokenizer, build_examples, mark_supervised
from .sources import load_rows, row_to_messages
from .turns import BadRow, normalise


def preview(data: DataSection, tokenizer: Any, family: Family, n: int) -> Iterator[tuple[str, str]]:
    """Yields (heading, text) for the first `n` trainable rows, then ("summary", the data report).

    Raises UserError for an unreadable source (and for no usable rows at all, as training would).
    """
    rows, source = load_rows(data)
    _, report = build_examples(rows, tokenizer, data, family)
    encoder = TurnTokenizer(tokenizer)
    shown = 0
    for row in rows:
        if shown >= n:
            break
        try:
            encoded = encoder.encode(normalise(row_to_messages(row.data, data.unsupported_fields), data.system_policy,
                                               family=family), data.train_on)
        except BadRow:
            continue
        shown += 1
        kept = min(len(encoded.ids), data.max_length)
        supervised = sum(encoded.mask[1:kept])
        over = f" (longer than data.max_length: {data.overlong})" if len(encoded.ids) > kept else ""
        yield f"── {row.where}: {kept} tokens, {supervised} supervised{over}", mark_supervised(encoded, data.max_length)
    yield "summary", f"── {source.name}: " + "\n".join(report.summary_lines())

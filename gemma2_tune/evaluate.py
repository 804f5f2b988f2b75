"""`gemma2-tune eval`: loss and perplexity on the supervised (model-turn) tokens of held-out chats.

Rows are rendered and masked exactly as in training; base and fine-tuned are scored on the same tokens
(the adapter switched off for the base), one row at a time, with the model's own loss.
"""

from __future__ import annotations

import math
from typing import Any

from .config import DataSection
from .data import load_rows
from .examples import IGNORE_INDEX, build_examples


def supervised_loss(model, examples) -> dict[str, Any]:
    import torch

    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            n = sum(1 for label in e.labels[1:] if label != IGNORE_INDEX)
            ids = torch.tensor([e.input_ids], device=model.device)
            labels = torch.tensor([e.labels], device=model.device)
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.float().item() * n
            count += n
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "supervised_tokens": int(count), "rows": len(examples)}


def evaluate(model, tokenizer, data: DataSection, compare_base: bool, echo=print) -> dict[str, Any]:
    rows, source = load_rows(data)
    examples, report = build_examples(rows, tokenizer, data)
    for line in report.summary_lines():
        echo(line)
    results = {}
    if compare_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = supervised_loss(model, examples)
    results["fine-tuned" if hasattr(model, "disable_adapter") else "model"] = supervised_loss(model, examples)
    echo(f"{'':12s}{'loss':>10s}{'perplexity':>14s}{'supervised tokens':>20s}")
    for name, r in results.items():
        echo(f"{name:12s}{r['loss']:10.4f}{r['perplexity']:14.2f}{r['supervised_tokens']:20,d}")
    return {"dataset": source.name, "fingerprint": source.fingerprint, "results": results}

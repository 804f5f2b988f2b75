"""`gemma2-tune eval`: loss and perplexity on the supervised (model-turn) tokens of held-out chats.

Rows are rendered and masked exactly as in training; base and fine-tuned are scored on the same tokens
(the adapter switched off for the base), one row at a time, with the model's own loss.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..config.schema import SftDataSection
from ..data.examples import build_examples
from ..data.sources import load_rows
from ..data.turns import IGNORE_INDEX
from ..errors import UserError
from .inference import Loaded, TrainedRun


def supervised_loss(model, examples, images=None) -> dict[str, Any]:
    """Mean cross-entropy (nats) over the examples' supervised tokens, perplexity, counts; one row at a time. An
    image + text model (`images`: its data/images.py ImageProcessing) gets each row as training batched it: its
    token types, and its images' pixels (data/collator.py)."""
    import torch

    collate = None
    if images is not None:
        from ..data.collator import IMAGES_COLUMN, ImageBlockCollator, images_column
        from ..data.packing import unpacked

        collate = ImageBlockCollator(0, images=images, dtype=str(model.dtype).replace("torch.", ""))
    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            n = sum(1 for label in e.labels[1:] if label != IGNORE_INDEX)
            if collate is not None:
                block = unpacked([e])[0]
                item = {"input_ids": block.input_ids, "labels": block.labels, "position_ids": block.position_ids}
                if e.images:
                    item[IMAGES_COLUMN] = images_column([block])[0]
                inputs = {k: v.to(model.device) for k, v in collate([item]).items()}
            else:
                inputs = {"input_ids": torch.tensor([e.input_ids], device=model.device),
                          "labels": torch.tensor([e.labels], device=model.device)}
            total += model(**inputs, use_cache=False).loss.float().item() * n
            count += n
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "supervised_tokens": int(count), "rows": len(examples)}


def evaluate(loaded: Loaded, data: SftDataSection, compare_base: bool, echo=print,
             others: list[tuple[str, Callable[[], Loaded]]] = (), read: tuple[list, Any] | None = None
             ) -> dict[str, Any]:
    """Held-out loss of the loaded model (and of its base, adapter off, when `compare_base`), and of each of
    `others` ((name, loader): loaded one at a time, scored on the same tokens; the caller checks they share the
    family and vocabulary), printed as one table. `read`: load_rows(data) when the caller read it already.
    Raises UserError when the data has no usable rows."""
    model = loaded.model
    rows, source = read or load_rows(data)
    examples, report = build_examples(rows, loaded.tokenizer, data, loaded.family, empty_thought=loaded.empty_thought,
                                      images=loaded.images)
    for line in source.lines() + report.summary_lines():
        echo(line)
    results = {}
    if compare_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = supervised_loss(model, examples, loaded.images)
    results["fine-tuned" if hasattr(model, "disable_adapter") else "model"] = supervised_loss(model, examples,
                                                                                           loaded.images)
    for name, load_other in others:  # checked by the caller (same family and vocabulary)
        other = load_other()
        results[name] = supervised_loss(other.model, examples, other.images)
        del other
    width = max(12, *(len(n) + 2 for n in results))
    echo(f"{'':{width}s}{'loss':>10s}{'perplexity':>14s}{'supervised tokens':>20s}")
    for name, r in results.items():
        echo(f"{name:{width}s}{r['loss']:10.4f}{r['perplexity']:14.2f}{r['supervised_tokens']:20,d}")
    return {"dataset": source.name, "fingerprint": source.fingerprint, "results": results}


def compare_loaders(names: list[str], run: TrainedRun, load_in: str, warn: Callable[[str], None],
                    taken: set[str] = frozenset()) -> list[tuple[str, Callable[[], Loaded]]]:
    """`eval --compare` models (run folders, ema/, merged folders or hub ids), each checked now against the first
    model `run` (same family and tokenizer vocabulary; a different system policy is warned about), before any
    weights load. `taken`: the table's other row names (a compared model's row is its name as given, which must
    not be one of them). Returns (name, loader) pairs. Raises UserError."""
    from pathlib import Path

    from ..config.runs import missing_folder
    from ..models.checks import vocabulary_digest
    from ..models.loading import checkpoint_family, load_tokenizer
    from .inference import load, read_run

    def tokenizer_of(r: TrainedRun):  # checked for its family's turn markers (Gemma 4's are not Gemma 2/3's)
        return load_tokenizer(str(r.path) if (r.path / "tokenizer.json").is_file() else r.base_model,
                              family=checkpoint_family(r.base_model)[0])

    for i, name in enumerate(names):  # what the names alone say, before any tokenizer loads
        if name in taken:
            raise UserError(f"--compare {name}: the table already has a row named {name!r} (the first model's); "
                            f"name the folder another way (e.g. ./{name})")
        if name in names[:i]:
            raise UserError(f"--compare {name}: given twice")
        missing = missing_folder(name, bare_names=True)
        if missing:
            raise UserError(f"--compare {name}: {missing}")
    if not names:
        return []
    first, vocab = checkpoint_family(run.base_model)[0], vocabulary_digest(tokenizer_of(run))
    loaders = []
    for name in names:
        path = Path(name).expanduser()
        other = read_run(name, None, key="--compare") if path.is_dir() else read_run(None, name)
        if other.head != run.head:
            what = {"causal-lm": "a causal LM", "sequence-classification": "a reward model"}
            raise UserError(f"--compare {name}: {what[other.head]}, but the first model is {what[run.head]}: "
                            "they are scored differently (held-out loss or rewards; pairwise accuracy)")
        family = checkpoint_family(other.base_model)[0]
        if family.key != first.key:
            raise UserError(f"--compare {name}: a {family.display} model; the held-out chats are rendered for "
                            f"{first.display}")
        if vocabulary_digest(tokenizer_of(other)) != vocab:
            raise UserError(f"--compare {name}: its tokenizer differs from the first model's; the same held-out "
                            "tokens can't be scored by both")
        if other.system_policy != run.system_policy:
            warn(f"--compare {name}: trained with data.system_policy={other.system_policy}; the rows are rendered "
                 f"with the first model's ({run.system_policy})")
        loaders.append((name, lambda other=other: load(other, load_in)))
    return loaders

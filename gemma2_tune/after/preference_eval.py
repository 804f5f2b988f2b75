"""`eval` of a reward model: how often it scores the chosen answer of a held-out pair above the rejected one.

Pairs are read and rendered as `gemma2-tune reward` trains on them (data/preferences.py, the run's system policy):
each side is the prompt + answer through `<end_of_turn>` and its newline, scored whole, one sequence at a time (no
padding, so the score is read at the sequence's true last token). Every model scores the same pairs: the run and
each `--compare` reward model (a merge of reward models, another run). There is no "before training" row: with the
adapter off, a reward run's base has a score head newly initialised at each load, not the one training started
from (chance is 50%). Pairwise accuracy = pairs with r(chosen) >
r(rejected) / pairs (a tie counts as wrong, as in the reward run's own held-out accuracy); margin = the mean of
r(chosen) - r(rejected) over the pairs, in the model's score units (Bradley-Terry logits).
"""

from __future__ import annotations

from typing import Any, Callable

from ..config.schema import PreferenceDataSection
from ..data.preferences import PreferencePair, load_preferences
from .inference import Loaded

Echo = Callable[[str], None]


def pair_scores(model: Any, pairs: list[PreferencePair]) -> dict[str, Any]:
    """Score both sides of every pair with `model` (a sequence classifier with one output: logits (1, 1)).
    Returns {"pairwise_accuracy": fraction in [0, 1], "margin": mean r(chosen) - r(rejected), "pairs": n,
    "chosen_mean", "rejected_mean"} (scores in the model's units). Raises ValueError when a score is not finite."""
    import torch

    chosen, rejected = [], []
    with torch.no_grad():
        for pair in pairs:
            for ids, into in ((pair.prompt_ids + pair.chosen_ids, chosen), (pair.prompt_ids + pair.rejected_ids,
                                                                            rejected)):
                batch = torch.tensor([ids], device=model.device)
                score = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
                into.append(score.reshape(-1)[0].item())
    finite = torch.isfinite(torch.tensor(chosen + rejected))
    if not bool(finite.all()):
        raise ValueError(f"{int((~finite).sum())} of {2 * len(pairs)} scores are not finite (NaN or inf)")
    right = sum(c > r for c, r in zip(chosen, rejected))
    n = len(pairs)
    return {"pairwise_accuracy": right / n, "pairs_right": right, "pairs": n,
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "chosen_mean": sum(chosen) / n, "rejected_mean": sum(rejected) / n}


def preference_table(loaded: Loaded, data: PreferenceDataSection, others: list[tuple[str, Callable[[], Loaded]]] = (),
                     echo: Echo = print, model_label: str = "model") -> dict[str, Any]:
    """Pairwise accuracy and margin of the loaded reward model on `data`'s pairs (and of each of `others`, (name,
    loader), loaded one at a time: the caller checks they are reward models of the same family and vocabulary),
    printed as one table (`model_label`: the row of a model without an adapter). Returns {"dataset", "fingerprint", "pairs",
    "results": {name: pair_scores(...)}}. Raises UserError: unreadable data, no usable pair, a score that is not
    finite."""
    from ..errors import UserError

    prefs = load_preferences(data, loaded.tokenizer, loaded.family, "paired", empty_thought=loaded.empty_thought)
    for line in prefs.source.lines() + prefs.report.summary_lines():
        echo(line)
    pairs = prefs.items
    model = loaded.model
    results: dict[str, dict[str, Any]] = {}

    def score(name: str, scorer: Any) -> None:
        try:
            results[name] = pair_scores(scorer, pairs)
        except ValueError as exc:
            raise UserError(f"eval: {name}: {exc}") from None

    score("fine-tuned" if hasattr(model, "disable_adapter") else model_label, model)
    for name, load_other in others:
        other = load_other()
        score(name, other.model)
        del other
    width = max(20, *(len(n) + 2 for n in results))
    echo(f"{len(pairs)} pairs: the fraction whose chosen answer scores higher, and the mean score difference")
    echo(f"{'':{width}s}{'pairwise accuracy':>19s}{'margin':>10s}{'chosen':>10s}{'rejected':>10s}")
    for name, r in results.items():
        accuracy = f"{r['pairwise_accuracy']:.1%} ({r['pairs_right']}/{r['pairs']})"
        echo(f"{name:{width}s}{accuracy:>19s}{r['margin']:10.3f}{r['chosen_mean']:10.3f}{r['rejected_mean']:10.3f}")
    return {"dataset": prefs.source.name, "fingerprint": prefs.source.fingerprint, "pairs": len(pairs),
            "results": results}

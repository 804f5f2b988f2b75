"""`gemma2-tune preview`: rows as they will be trained, learned tokens between ⟦ ⟧, with counts."""

from __future__ import annotations

from typing import Any, Iterator

from ..config.schema import DataSection, PreferenceDataSection, SftDataSection
from ..families import Family
from .examples import TurnTokenizer, build_examples, mark_supervised, row_image_reader
from .sources import load_rows, row_turns
from .turns import BadRow


def preview(data: SftDataSection, tokenizer: Any, family: Family, n: int, *,
            empty_thought: bool = False, images: Any = None) -> Iterator[tuple[str, str]]:
    """Yields (heading, text) for the first `n` trainable rows, then ("summary", the data report).
    `empty_thought`: the checkpoint's size writes Gemma 4's empty thought block; `images`: the checkpoint's image
    processor (data/images.py ImageProcessing): each image is shown as one placeholder with its token count, outside
    the supervised marks.

    Raises UserError for an unreadable source (and for no usable rows at all, as training would).
    """
    rows, source = load_rows(data)
    _, report = build_examples(rows, tokenizer, data, family, empty_thought=empty_thought, images=images)
    encoder = TurnTokenizer(tokenizer, family, data.enable_thinking, empty_thought, images)
    shown = 0
    for row in rows:
        if shown >= n:
            break
        try:
            reader = row_image_reader(row, data) if family.images is not None else None
            encoded = encoder.encode(row_turns(row.data, data, family, images=reader), data.train_on)
        except BadRow:
            continue
        shown += 1
        kept = min(len(encoded.ids), data.max_length)
        supervised = sum(encoded.mask[1:kept])
        over = f" (longer than data.max_length: {data.overlong})" if len(encoded.ids) > kept else ""
        yield f"── {row.where}: {kept} tokens, {supervised} supervised{over}", mark_supervised(encoded, data.max_length)
    described = [f"images: {images.describe()}"] if images is not None and report.images else []
    yield "summary", f"── {source.name}: " + "\n".join(source.lines() + report.summary_lines() + described)


def preview_prompts(data: DataSection, tokenizer: Any, family: Family, n: int, max_completion_length: int,
                    writer: tuple[str, str] = ("the student", "scored against the teacher"),
                    columns_used: bool = False, *, empty_thought: bool = False) -> Iterator[tuple[str, str]]:
    """For a distill or rl config: yields (heading, text) for the first `n` prompts as the model will see them
    (the run's chat template, generation prompt included; `writer`: who writes the completion and what is done
    with it), then ("summary", the prompt report). `columns_used` (rl with reward functions): each prompt's row
    columns too, which the functions get as keyword arguments. `empty_thought`: Gemma 4's empty thought block."""
    from .prompts import build_prompts, describe_columns

    rows, source = load_rows(data)
    prompts, report, columns = build_prompts(rows, tokenizer, data, family, max_completion_length,
                                             empty_thought=empty_thought)
    who, scored = writer
    for i, prompt in enumerate(prompts[:n]):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        length = len(tokenizer(text, add_special_tokens=False).input_ids)
        shown = "; ".join(f"{k}={v!r:.80}" for k, v in columns[i].items()) or "none"
        yield (f"── prompt {i + 1}: {length} tokens; {who} writes up to {max_completion_length} more",
               text + f"⟦ {who}'s completion, {scored} ⟧"
               + (f"\ncolumns for the reward functions: {shown}" if columns_used else ""))
    lines = report.summary_lines()
    extra = [f"reward functions get each prompt's row columns as keyword arguments: {describe_columns(columns)}"] \
        if columns_used else []
    yield "summary", f"── {source.name}: " + "\n".join(lines[:1] + lines[2:] + extra)


def preview_preferences(data: PreferenceDataSection, tokenizer: Any, family: Family, n: int,
                        kind: str = "paired", *, empty_thought: bool = False) -> Iterator[tuple[str, str]]:
    """For a dpo, reward (`kind='paired'`) or kto (`'unpaired'`) config: yields (heading, text) for the first `n`
    pairs or examples as trained (the prompt, then each answer's supervised tokens between ⟦ ⟧), then
    ("summary", the data report). Raises UserError as training would (unreadable source, nothing usable)."""
    from .preferences import describe_pair, load_preferences

    loaded = load_preferences(data, tokenizer, family, kind, empty_thought=empty_thought)
    for item in loaded.items[:n]:
        if kind == "paired":
            counts = f"prompt {len(item.prompt_ids)} tokens; chosen {len(item.chosen_ids)}, rejected " \
                     f"{len(item.rejected_ids)} supervised"
            sides = " and ".join(side for side, was_cut in zip(("chosen", "rejected"), item.cut) if was_cut)
        else:
            counts = f"prompt {len(item.prompt_ids)} tokens; {len(item.completion_ids)} supervised"
            sides = "answer" if item.truncated else ""
        cut = f" ({sides} cut at data.max_length)" if sides else ""
        yield f"── {item.where}: {counts}{cut}", "\n".join(describe_pair(item, tokenizer))
    yield "summary", f"── {loaded.source.name}: " + "\n".join(loaded.report.summary_lines())

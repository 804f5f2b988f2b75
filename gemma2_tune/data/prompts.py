"""Prompts for on-policy training (distill, rl) and for `eval`'s reward scores: each row's conversation up to
its last user turn, in Gemma's format.

The model writes the answers itself, so a row's own last answer is not trained on (it is counted as a
reference answer set aside). Rows are checked exactly as for `sft` (turn format, system policy, fields the
format cannot express); a row with no user turn to answer is a bad row. A prompt is the row's own messages
(role and content), cut after the last user turn: the trainer renders it with the run's chat template,
which is the training renderer, so system text folds exactly as it does at serving time. A prompt-only row
(TRL's format: {"prompt": "text"}, one user turn, or {"prompt": [messages]}) is read as that conversation.

A row's other keys are its columns (a GSM8K-style `answer`, an id): `rl` and `eval` pass each prompt's columns to
reward functions as keyword arguments, as TRL's GRPOTrainer passes a dataset's extra columns.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from ..config.schema import DataSection
from ..families import Family
from .examples import DataReport
from .sources import Row, row_to_messages, row_turns
from .turns import ROLE_NAMES, BadRow, render

REFERENCE_SET_ASIDE = "reference answer set aside (on-policy: the student writes its own)"
# Keys a row's conversation is read from, and TRL's own "completion" (GRPOTrainer passes every dataset column but
# "prompt", "completion" and "completion_ids" to reward functions): not columns.
CONVERSATION_KEYS = ("messages", "conversations", "prompt", "completion", "completion_ids", "text")


def row_columns(data: Any) -> dict[str, Any]:
    """A raw row's columns: its keys other than those its conversation is read from (CONVERSATION_KEYS), as they
    are (a GSM8K row's `answer`, an id, ...)."""
    return {k: v for k, v in data.items() if k not in CONVERSATION_KEYS} if isinstance(data, dict) else {}


def describe_columns(columns: list[dict[str, Any]]) -> str:
    """'answer (16 of 16 prompts), id (12 of 16 prompts)' for the prompts' row `columns`; 'none (...)' when no row
    has a column beside its conversation."""
    counts = Counter(name for row in columns for name in row)
    return (", ".join(f"{name} ({n} of {len(columns)} prompts)" for name, n in counts.items())
            or "none (no row has a key beside its conversation)")


def prompt_only(data: dict[str, Any]) -> dict[str, Any]:
    """A prompt-only row ({"prompt": str | messages}, no completion, chat or pair) as a chat row: a string is
    one user turn; other rows unchanged."""
    if not isinstance(data, dict) or data.get("prompt") is None or any(data.get(k) is not None for k in
                                          ("completion", "messages", "conversations", "chosen", "rejected")):
        return data
    prompt = data["prompt"]
    if not isinstance(prompt, (str, list)):
        raise BadRow(f"'prompt' is {type(prompt).__name__}: expected text or a list of messages")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {**{k: v for k, v in data.items() if k != "prompt"}, "messages": messages}


def build_prompts(rows: Sequence[Row], tokenizer: Any, data: DataSection, family: Family,
                  max_completion_length: int, *, empty_thought: bool = False
                  ) -> tuple[list[list[dict[str, str]]], DataReport, list[dict[str, Any]]]:
    """Rows -> prompts (normalised messages ending with a user turn; system text already handled by the
    policy), a report, and each prompt's row columns (row_columns; aligned with the prompts). A prompt longer
    than data.max_length - max_completion_length tokens is dropped (cutting a prompt changes what it asks).
    `empty_thought`: the checkpoint's size writes Gemma 4's empty thought block in the generation prompt. Raises
    UserError when no prompt is usable, or when bad rows exist and data.on_bad_rows is 'error'.

    A prompt is role/content messages: a Gemma 4 row with tools or tool calls is a bad row (on-policy prompts
    carry text turns only)."""
    report = DataReport(rows_read=len(rows))
    prompts, columns, notes = [], [], Counter()
    budget = data.max_length - max_completion_length
    for row in rows:
        row_notes: Counter = Counter()
        try:
            row_data = prompt_only(row.data)
            messages = row_to_messages(row_data, data.unsupported_fields, family=family)
            if isinstance(row_data, dict) and (row_data.get("tools") or any(
                    isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)):
                raise BadRow("tools or tool calls in a prompt: on-policy prompts carry text turns only")
            turns = row_turns(row_data, data, family, allow_open_end=True, notes=row_notes)
            if turns[-1].role == "model":
                turns = turns[:-1]
                row_notes[REFERENCE_SET_ASIDE] += 1
            if not turns:
                raise BadRow("no user turn to answer")
            last_user = max(i for i, m in enumerate(messages) if ROLE_NAMES[str(m["role"]).lower()] == "user")
        except BadRow as exc:
            report.bad(row.where, exc)
            continue
        text = render(turns, add_generation_prompt=True, family=family, thinking=data.enable_thinking,
                      empty_thought=empty_thought).text
        length = len(tokenizer(text, add_special_tokens=False).input_ids)
        if length > budget:
            report.rows_dropped_overlong += 1
            report.dropped(row.where, f"prompt of {length} tokens > data.max_length {data.max_length} - "
                                      f"the {max_completion_length} tokens kept for the completion")
            continue
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]])
        columns.append(row_columns(row.data))
        notes.update(row_notes)
        report.total_tokens += length
    report.rows_kept, report.notes = len(prompts), dict(notes)
    report.check_usable(data.on_bad_rows, "prompts")
    return prompts, report, columns

"""Preference data for DPO, KTO and reward models: rows -> pairs (or unpaired examples) in Gemma's format.

Row schemas, detected per row:
  explicit prompt   {"prompt": messages | text, "chosen": messages | text, "rejected": messages | text}
                    (TRL's conversational form; a text prompt is one user turn, a text side one model turn;
                    a text prompt in Anthropic HH form, "\\n\\nHuman: ...\\n\\nAssistant:", is parsed into turns)
  implicit prompt   {"chosen": conversation, "rejected": conversation}: whole conversations that share every
                    turn but the last model turn (UltraFeedback binarized; its text `prompt` column is then
                    ignored, as TRL's `maybe_extract_prompt` does). A conversation is messages, Anthropic HH text
                    ("\\n\\nHuman: ...\\n\\nAssistant: ..."), ChatML or Gemma-format text.
  unpaired          {"prompt": ..., "completion": ..., "label": true | false} (KTO; pairs are unpaired for it:
                    chosen -> true, rejected -> false)
Messages may be role/content or ShareGPT from/value, or JSON text of either (CSV cells).

Each side is checked exactly as `sft` checks a conversation (turn format, data.system_policy and the family's
fold rule, data.unsupported_fields), and a pair must compare two answers to one conversation: a bad row names
its missing side, a prompt that does not end on a user turn, sides that share no prompt or differ before the
last model turn, or a chosen answer identical to the rejected one.

Tokens follow TRL 1.16's DPO/KTO preparation (`DPOTrainer._prepare_dataset`): the prompt rendered with the
generation prompt, each whole sequence (prompt + answer) tokenized in one piece, and the answer starting where
the prompt's ids and the sequence's ids part (`trl.data_utils.common_prefix_length`). So `prompt_ids +
chosen_ids` are exactly the ids of the run's chat template for prompt + chosen, and an answer's ids are its text,
<end_of_turn> and the newline the renderer writes after it (the newline is in the answer's log-probability, as
in TRL; it is the same token on both sides). tests/unit/test_preferences.py checks both against `apply_chat_template`
and against TRL's own preparation.

Length (data.max_length counts prompt + answer, per side): the prompt is never cut (cutting it changes what it
asks); a pair whose prompt leaves no room for an answer is dropped. Otherwise a longer side is cut at
data.max_length (`overlong: truncate`, TRL's keep_start) or the pair dropped (`overlong: drop`); a pair whose
two answers are the same within the limit is dropped (nothing left to prefer). All counted in the DataReport.
data.train_on is not read: the preference losses cover the answers only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from ..config.schema import PreferenceDataSection, RunConfig
from ..errors import UserError
from ..families import Family
from .examples import DataReport
from .sources import PACKAGE_DIR, UNEXPRESSIBLE_ROW_FIELDS, Row, Source, load_rows, parse_marked_text, row_to_messages
from .turns import ROLE_NAMES, BadRow, Turn, normalise, render

Kind = Literal["paired", "unpaired"]
Trainer = Literal["dpo", "kto", "reward"]
Form = Literal["ids", "messages"]

PREFS_DIR = PACKAGE_DIR / "assets" / "preferences"
# Preference datasets shipped with the package: name -> (file, description). A concise answer is preferred to
# the same answer wrapped in hedging boilerplate; held-out prompts do not occur in training.
PREFERENCE_ALIASES: dict[str, tuple[Path, str]] = {
    "concise": (PREFS_DIR / "train.jsonl",
                "40 preference pairs shipped with gemma2-tune: a concise answer over the same answer hedged"),
    "concise-held-out": (PREFS_DIR / "held_out.jsonl", "12 held-out pairs in the same style (for eval)"),
    "concise-kto": (PREFS_DIR / "kto_train.jsonl",
                    "the 40 pairs unpaired for KTO: 80 rows, prompt/completion/label"),
    "concise-kto-held-out": (PREFS_DIR / "kto_held_out.jsonl", "the 12 held-out pairs unpaired: 24 rows"),
}

SCHEMA_NOTES = {
    "explicit": "read as prompt/chosen/rejected",
    "implicit": "read as whole chosen/rejected conversations (prompt = the shared turns)",
    "hh": "read as Anthropic HH text",
    "unpaired": "read as prompt/completion/label",
}
PROMPT_COLUMN_IGNORED = "text 'prompt' ignored: chosen and rejected hold the whole conversation"
SHARED_TURNS_TO_PROMPT = "turns shared by chosen and rejected moved into the prompt"
BOUNDARY_MERGED = "prompt's last tokens merged with the answer's first (answer starts where the ids part)"
PAIR_UNPAIRED = "pair unpaired for KTO (chosen: desirable, rejected: undesirable)"
_CANONICAL_ROLE = {"system": "system", "user": "user", "model": "assistant"}


@dataclass
class PreferencePair:
    """One pair, as messages for TRL and as the ids training uses.

    prompt: role/content messages ending with a user message (system messages kept: the run's chat template
    applies data.system_policy to them as training did); chosen, rejected: one assistant message each.
    prompt_ids: the prompt through `<start_of_turn>model\\n`; chosen_ids, rejected_ids: the answer's tokens
    through `<end_of_turn>` and `\\n`, each cut to data.max_length - len(prompt_ids) when it is longer (`cut`:
    (chosen cut, rejected cut); `truncated`: either).
    """

    where: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    cut: tuple[bool, bool] = (False, False)

    @property
    def truncated(self) -> bool:
        """Whether either answer was cut at data.max_length."""
        return any(self.cut)


@dataclass
class UnpairedExample:
    """One KTO example: a prompt, one answer, and whether the answer is desirable (`label`).

    Fields as in PreferencePair, with `completion`/`completion_ids` for the one answer.
    """

    where: str
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    label: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False


@dataclass
class PreferenceData:
    """What `load_preferences` read: the items, the report of every row, and the source it came from."""

    kind: Kind
    items: list[PreferencePair] | list[UnpairedExample]
    report: DataReport
    source: Source
    family: str = "gemma2"
    system_policy: str = "fold"

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for run.json and fingerprints: dataset name, content fingerprint of the source,
        `ids_fingerprint` of what trains (16 hex digits each), counts, and the report."""
        out: dict[str, Any] = {"dataset": self.source.name, "fingerprint": self.source.fingerprint, "kind": self.kind,
                               "family": self.family, "system_policy": self.system_policy,
                               "items": len(self.items), "ids_fingerprint": ids_fingerprint(self.items)}
        if self.kind == "unpaired":
            out["desirable"] = sum(1 for e in self.items if e.label)
            out["undesirable"] = len(self.items) - out["desirable"]
        out["report"] = self.report.to_dict()
        return out


def ids_fingerprint(items: Sequence[PreferencePair | UnpairedExample]) -> str:
    """16 hex digits over every item's ids (and labels), in order: equal exactly when training sees the same."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, PreferencePair):
            parts: list[Any] = [item.prompt_ids, item.chosen_ids, item.rejected_ids]
        else:
            parts = [item.prompt_ids, item.completion_ids, item.label]
        digest.update(json.dumps(parts).encode())
    return digest.hexdigest()[:16]


def resolve_preference_alias(data: PreferenceDataSection) -> PreferenceDataSection:
    """data with a shipped preference dataset's name (`concise`, ...) replaced by its file; anything else as is."""
    alias = PREFERENCE_ALIASES.get(data.dataset)
    return data.model_copy(update={"dataset": str(alias[0])}) if alias else data


def load_preferences(data: PreferenceDataSection, tokenizer: Any, family: Family, kind: Kind,
                     max_length: int | None = None, *, empty_thought: bool = False) -> PreferenceData:
    """Read data.dataset and build pairs (`kind='paired'`, DPO and reward) or unpaired examples (`'unpaired'`,
    KTO; pairs count as two). `max_length` overrides data.max_length (tokens per side, prompt included).
    `empty_thought`: the checkpoint's size writes Gemma 4's empty thought block before each answer.

    Raises UserError for an unreadable source, when no row is usable, or when bad rows exist and
    data.on_bad_rows is 'error' (exit 2).
    """
    rows, source = load_rows(resolve_preference_alias(data))
    source.name = data.dataset
    build = build_pairs if kind == "paired" else build_unpaired
    items, report = build(rows, tokenizer, data, family, max_length=max_length, empty_thought=empty_thought)
    return PreferenceData(kind, items, report, source, family.key, data.system_policy)


# ---- rows -> messages ---------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def is_hh_text(text: str) -> bool:
    """Anthropic HH text starts with a "Human:" turn (usually after two newlines)."""
    return text.lstrip().startswith("Human:")


def parse_hh(text: str, *, open_end: bool = False) -> list[dict[str, str]]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> user/assistant messages. With `open_end`, a
    final empty "Assistant:" (a prompt awaiting its answer) is dropped. Raises BadRow for text before the first
    turn or no turn at all."""
    matches = list(_HH_TURN.finditer(text))
    if not matches or text[: matches[0].start()].strip():
        raise BadRow("HH text does not start with a 'Human:' turn")
    messages = []
    for match, after in zip(matches, matches[1:] + [None]):
        content = text[match.end(): after.start() if after else len(text)]
        messages.append({"role": "user" if match.group(1) == "Human" else "assistant", "content": content})
    if open_end and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages


def _side(value: Any, name: str) -> list[Any] | str:
    """A field as a list of messages or as text; JSON text of a list (CSV cells) is the list."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded):
                value = decoded  # text that merely starts with "[" stays text
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"missing side: '{name}' is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise BadRow(f"missing side: '{name}' is empty")
        return value
    raise BadRow(f"'{name}' is {type(value).__name__}, not text or a list of messages")


def _role(message: Any) -> str | None:
    """A message's Gemma role ('system', 'user', 'model'), or None when it has no known one."""
    if not isinstance(message, dict):
        return None
    raw = message.get("from", message.get("role"))  # as sources reads ShareGPT
    return ROLE_NAMES.get(str(raw).lower()) if raw is not None else None


def _is_conversation(side: list[Any] | str) -> bool:
    """Does a side hold a whole conversation (a user turn of its own), not only an answer?"""
    if isinstance(side, str):
        return is_hh_text(side) or "<|im_start|>" in side or "<start_of_turn>" in side
    return any(_role(m) == "user" for m in side)


def _conversation(side: list[Any] | str, name: str, notes: Counter) -> tuple[list[Any], str]:
    """A whole-conversation side -> (messages, schema)."""
    if isinstance(side, list):
        return side, "implicit"
    if is_hh_text(side):
        return parse_hh(side), "hh"
    if "<|im_start|>" in side or "<start_of_turn>" in side:
        return parse_marked_text(side, notes), "implicit"
    raise BadRow(f"'{name}' is text with no turns and the row has no 'prompt' (expected a whole conversation: "
                 "messages, Anthropic HH, ChatML or Gemma-format text)")


def _prompt_messages(prompt: list[Any] | str) -> list[Any]:
    if isinstance(prompt, list):
        return prompt
    return parse_hh(prompt, open_end=True) if is_hh_text(prompt) else [{"role": "user", "content": prompt}]


def _answer_messages(side: list[Any] | str) -> list[Any]:
    return side if isinstance(side, list) else [{"role": "assistant", "content": side}]


def _paired_messages(data: dict, notes: Counter) -> tuple[list[Any] | None, list[Any], list[Any], str]:
    """A paired row -> (explicit prompt messages or None, whole chosen conversation, whole rejected one, schema)."""
    for name in ("chosen", "rejected"):
        if data.get(name) is None:
            raise BadRow(f"missing side: no '{name}'")
    chosen, rejected = _side(data["chosen"], "chosen"), _side(data["rejected"], "rejected")
    prompt = _side(data["prompt"], "prompt") if data.get("prompt") is not None else None
    # A text prompt beside two whole conversations is a copy of their first user turn (UltraFeedback binarized).
    if prompt is None or (isinstance(prompt, str) and _is_conversation(chosen) and _is_conversation(rejected)):
        if prompt is not None:
            notes[PROMPT_COLUMN_IGNORED] += 1
        chosen_msgs, schema = _conversation(chosen, "chosen", notes)
        rejected_msgs, _ = _conversation(rejected, "rejected", notes)
        return None, chosen_msgs, rejected_msgs, schema
    prompt_msgs = _prompt_messages(prompt)
    return prompt_msgs, prompt_msgs + _answer_messages(chosen), prompt_msgs + _answer_messages(rejected), "explicit"


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BadRow(f"'label' is {value!r}, not true or false")


def _unpaired_messages(data: dict) -> tuple[list[Any], list[Any], bool]:
    for name in ("prompt", "completion"):
        if data.get(name) is None:
            raise BadRow(f"unpaired row has no '{name}'")
    label = _label(data["label"])
    prompt_msgs = _prompt_messages(_side(data["prompt"], "prompt"))
    return prompt_msgs, prompt_msgs + _answer_messages(_side(data["completion"], "completion")), label


def rows_kind(rows: Sequence[Row]) -> str | None:
    """What the first readable row of `rows` is, by its keys: 'paired' (chosen/rejected), 'unpaired' (KTO's
    prompt/completion/label) or None (a chat, or no readable row). Reads no further than that row."""
    for row in rows:
        if isinstance(row.data, dict):
            try:
                return _row_kind(row.data)
            except BadRow:
                return None
    return None


def _row_kind(data: Any) -> str:
    """'paired' or 'unpaired'; raises BadRow for a row in neither schema."""
    if isinstance(data, BadRow):
        raise data
    if not isinstance(data, dict):
        raise BadRow("row is not an object")
    if data.get("chosen") is not None or data.get("rejected") is not None:
        return "paired"
    if data.get("label") is not None:
        return "unpaired"
    present = sorted(k for k, v in data.items() if v is not None)
    if "messages" in present or "conversations" in present:
        raise BadRow(f"a chat ({'messages' if 'messages' in present else 'conversations'}), not a preference pair: "
                     "this command takes pairs (prompt/chosen/rejected or chosen/rejected), or prompt/completion/"
                     "label rows for KTO")
    raise BadRow(f"no preference schema (has {present}; expected prompt/chosen/rejected, chosen/rejected, "
                 "or prompt/completion/label)")


# ---- messages -> checked turns -------------------------------------------------------------------------------

def _row_fields(data: dict, cfg: PreferenceDataSection, notes: Counter) -> None:
    """Row-level fields the format cannot express (tools, media): BadRow naming the field, or counted when ignored.
    Checked once per row, through sources' own rule (an empty message list carries nothing else to check)."""
    row_to_messages({"messages": [], **{k: data[k] for k in UNEXPRESSIBLE_ROW_FIELDS if k in data}},
                    cfg.unsupported_fields, notes)


def _turns(messages: list[Any], part: str, cfg: PreferenceDataSection, family: Family, notes: Counter,
           *, open_end: bool = False) -> tuple[list[dict], list[Turn]]:
    """Messages -> (role/content messages, normalised turns), checked as sft checks a row; errors name `part`."""
    try:
        # a side is read as role/content only: what else a Gemma 4 message carries would be lost, so it is refused
        extra = next((f"message {i} has '{k}'" for i, m in enumerate(messages) if isinstance(m, dict)
                      for k in ("tool_calls", "reasoning", "reasoning_content", "thinking") if m.get(k)), None)
        tool = any(isinstance(m, dict) and str(m.get("role")).lower() == "tool" for m in messages)
        if family.turn_format == "gemma4" and (extra or tool):
            raise BadRow(f"{extra or 'a tool message'}: preference pairs carry text turns only (no reasoning or "
                         "tools yet)")
        msgs = row_to_messages({"conversations": messages}, cfg.unsupported_fields, notes)
        return msgs, normalise(msgs, cfg.system_policy, allow_open_end=open_end, family=family, notes=notes,
                               thinking=cfg.enable_thinking)
    except BadRow as exc:
        raise BadRow(f"{part}: {exc}") from None


def _prompt_turns(prompt_msgs: list[Any], cfg: PreferenceDataSection, family: Family) -> list[Turn]:
    """An explicit prompt's turns; BadRow unless it ends on a user turn."""
    _, turns = _turns(prompt_msgs, "prompt", cfg, family, Counter(), open_end=True)
    if turns[-1].role != "user":
        raise BadRow("prompt ends on a model turn, not a user turn (there is nothing for the answers to answer)")
    return turns


def _split(msgs: list[dict]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Checked messages -> (prompt: through the last user message, [the last model message]), canonical roles."""
    roles = [ROLE_NAMES[str(m["role"]).lower()] for m in msgs]
    last_user = max(i for i, role in enumerate(roles) if role == "user")
    last_model = max(i for i, role in enumerate(roles) if role == "model")
    canon = lambda i: {"role": _CANONICAL_ROLE[roles[i]], "content": msgs[i]["content"]}  # noqa: E731
    return [canon(i) for i in range(last_user + 1)], [canon(last_model)]


def _compare(chosen: list[Turn], rejected: list[Turn], implicit: bool) -> None:
    if chosen[:-1] != rejected[:-1]:
        if implicit and chosen[0] != rejected[0]:
            raise BadRow("chosen and rejected share no prompt (their first turns differ)")
        at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                  min(len(chosen), len(rejected)) - 1)
        raise BadRow(f"chosen and rejected differ before the last model turn (at turn {at}; chosen has "
                     f"{len(chosen)} turns, rejected {len(rejected)}): a pair compares two answers to one conversation")
    if chosen[-1] == rejected[-1]:
        raise BadRow("chosen is identical to rejected")


# ---- turns -> ids --------------------------------------------------------------------------------------------

def _ids(tokenizer: Any, text: str) -> list[int]:
    # The rendered text carries <bos> itself, as the chat template does.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """trl.data_utils.common_prefix_length, written here so the rule is ours to read."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Dropped(BadRow):
    """A pair left out for its length (counted as dropped, not bad)."""


def _fit(prompt_ids: list[int], answers: list[list[int]], limit: int,
         overlong: str) -> tuple[list[list[int]], tuple[bool, ...]]:
    """Answers cut to fit `limit` tokens beside the prompt (keep_start), and which of them were cut; or _Dropped
    saying why."""
    longest = len(prompt_ids) + max(len(a) for a in answers)
    if longest <= limit:
        return answers, (False,) * len(answers)
    if len(prompt_ids) >= limit:
        raise _Dropped(f"prompt of {len(prompt_ids)} tokens leaves no room for an answer in data.max_length "
                       f"{limit}")
    if overlong == "drop":
        raise _Dropped(f"{longest} tokens > data.max_length {limit}")
    room = limit - len(prompt_ids)
    cut = [a[:room] for a in answers]
    if len(cut) == 2 and cut[0] == cut[1]:
        raise _Dropped(f"chosen and rejected are the same in their first {room} tokens (all data.max_length "
                       f"{limit} leaves beside the prompt)")
    return cut, tuple(len(a) > room for a in answers)


def _encode(tokenizer: Any, prompt: list[Turn], answers: list[Turn], notes: Counter,
            options: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each answer's ids, split where the prompt's ids and every sequence's ids part (TRL's DPO rule:
    the minimum over the answers). `options`: render's family, thinking and empty_thought."""
    prompt_ids = _ids(tokenizer, render(prompt, add_generation_prompt=True, **options).text)
    sequences = [_ids(tokenizer, render([*prompt, answer], **options).text) for answer in answers]
    n = min(_prefix(prompt_ids, s) for s in sequences)
    if n < len(prompt_ids):
        notes[BOUNDARY_MERGED] += 1
    return prompt_ids[:n], [s[n:] for s in sequences]


def _read_pair(data: dict, cfg: PreferenceDataSection, family: Family, notes: Counter):
    """A paired row -> (prompt, chosen, rejected messages, prompt turns, chosen turn, rejected turn, schema)."""
    _row_fields(data, cfg, notes)
    prompt_msgs, chosen_msgs, rejected_msgs, schema = _paired_messages(data, notes)
    given = _prompt_turns(prompt_msgs, cfg, family) if prompt_msgs is not None else None
    side_notes = [Counter(), Counter()]
    c_msgs, c_turns = _turns(chosen_msgs, "chosen", cfg, family, side_notes[0])
    r_msgs, r_turns = _turns(rejected_msgs, "rejected", cfg, family, side_notes[1])
    _compare(c_turns, r_turns, implicit=given is None)
    notes.update(side_notes[0] | side_notes[1])  # what changed on either side, once per row
    if given is not None and len(c_turns) - 1 > len(given):
        notes[SHARED_TURNS_TO_PROMPT] += 1
    prompt, chosen = _split(c_msgs)
    rejected = _split(r_msgs)[1]
    return prompt, chosen, rejected, c_turns[:-1], c_turns[-1], r_turns[-1], schema


def build_pairs(rows: Sequence[Row], tokenizer: Any, cfg: PreferenceDataSection, family: Family,
                max_length: int | None = None, *,
                empty_thought: bool = False) -> tuple[list[PreferencePair], DataReport]:
    """Rows -> preference pairs and a report (rows read/kept/bad/truncated/dropped; tokens: both sequences of
    each pair in total_tokens, both answers in supervised_tokens). Unpaired rows are bad rows here.

    Raises UserError when no pair is usable, or when bad rows exist and data.on_bad_rows is 'error'.
    """
    limit = max_length or cfg.max_length
    options = {"family": family, "thinking": cfg.enable_thinking, "empty_thought": empty_thought}
    report, notes, pairs = DataReport(rows_read=len(rows)), Counter(), []
    for row in rows:
        row_notes: Counter = Counter()
        try:
            if _row_kind(row.data) == "unpaired":
                raise BadRow("unpaired row (prompt/completion/label): DPO and reward models need chosen and rejected")
            prompt, chosen, rejected, p_turns, c_turn, r_turn, schema = _read_pair(
                row.data, cfg, family, row_notes)
            prompt_ids, answers = _encode(tokenizer, p_turns, [c_turn, r_turn], row_notes, options)
            (chosen_ids, rejected_ids), cut = _fit(prompt_ids, answers, limit, cfg.overlong)
        except _Dropped as exc:
            report.rows_dropped_overlong += 1
            report.dropped(row.where, exc)
            continue
        except BadRow as exc:
            report.bad(row.where, exc)
            continue
        row_notes[SCHEMA_NOTES[schema]] += 1
        notes.update(row_notes)
        pairs.append(PreferencePair(row.where, prompt, chosen, rejected, prompt_ids, chosen_ids, rejected_ids, cut))
        report.rows_truncated += any(cut)
        report.total_tokens += 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        report.supervised_tokens += len(chosen_ids) + len(rejected_ids)
    report.rows_kept, report.notes = len(pairs), dict(notes)
    report.check_usable(cfg.on_bad_rows, "preference pairs")
    return pairs, report


def build_unpaired(rows: Sequence[Row], tokenizer: Any, cfg: PreferenceDataSection, family: Family,
                   max_length: int | None = None, *,
                   empty_thought: bool = False) -> tuple[list[UnpairedExample], DataReport]:
    """Rows -> KTO examples and a report. Unpaired rows give one example; pairs give two (chosen: label true,
    rejected: false), both kept or both left out. rows_kept counts rows; the examples' labels are in the items.

    Raises UserError when no row is usable, or when bad rows exist and data.on_bad_rows is 'error'.
    """
    limit = max_length or cfg.max_length
    options = {"family": family, "thinking": cfg.enable_thinking, "empty_thought": empty_thought}
    report, notes, examples = DataReport(rows_read=len(rows)), Counter(), []
    for row in rows:
        row_notes: Counter = Counter()
        try:
            if _row_kind(row.data) == "paired":
                prompt, chosen, rejected, p_turns, c_turn, r_turn, schema = _read_pair(
                    row.data, cfg, family, row_notes)
                answers = [(chosen, c_turn, True), (rejected, r_turn, False)]
                row_notes[PAIR_UNPAIRED] += 1
            else:
                _row_fields(row.data, cfg, row_notes)
                prompt_msgs, full, label = _unpaired_messages(row.data)
                prompt_turns = _prompt_turns(prompt_msgs, cfg, family)
                msgs, turns = _turns(full, "completion", cfg, family, row_notes)
                if len(turns) != len(prompt_turns) + 1:
                    raise BadRow(f"completion holds {len(turns) - len(prompt_turns)} turns; KTO rates one model turn")
                prompt, completion = _split(msgs)
                p_turns, schema = turns[:-1], "unpaired"
                answers = [(completion, turns[-1], label)]
            built = []
            for completion, turn, label in answers:
                # KTO's rule: each example's answer starts where its own prompt and sequence ids part.
                prompt_ids, (completion_ids,) = _encode(tokenizer, p_turns, [turn], row_notes, options)
                (completion_ids,), (cut,) = _fit(prompt_ids, [completion_ids], limit, cfg.overlong)
                built.append(UnpairedExample(row.where, prompt, completion, label, prompt_ids, completion_ids, cut))
        except _Dropped as exc:
            report.rows_dropped_overlong += 1
            report.dropped(row.where, exc)
            continue
        except BadRow as exc:
            report.bad(row.where, exc)
            continue
        row_notes[SCHEMA_NOTES[schema]] += 1
        notes.update(row_notes)
        examples += built
        report.rows_kept += 1
        report.rows_truncated += any(e.truncated for e in built)
        report.total_tokens += sum(len(e.prompt_ids) + len(e.completion_ids) for e in built)
        report.supervised_tokens += sum(len(e.completion_ids) for e in built)
    report.notes = dict(notes)
    report.check_usable(cfg.on_bad_rows, "KTO examples")
    return examples, report


# ---- for TRL -------------------------------------------------------------------------------------------------

def trl_rows(items: Sequence[PreferencePair | UnpairedExample], trainer: Trainer, form: Form = "ids") -> list[dict]:
    """Items as rows for `datasets.Dataset.from_list`, in the columns TRL 1.16's trainers read.

    form='ids' (pre-tokenized; what trains is exactly our ids):
      dpo     prompt_ids, chosen_ids, rejected_ids   (DataCollatorForPreference's input; DPOTrainer 1.16 tokenizes
              every dataset in `_prepare_dataset`, so a trainer using these overrides it)
      reward  chosen_ids, rejected_ids: whole sequences, prompt included (RewardTrainer skips tokenizing on these)
      kto     prompt_ids, completion_ids, label      (DataCollatorForUnpairedPreference's input)
    form='messages' (TRL renders them with the tokenizer's chat template, which must be the run's:
    `use_run_template`; it then gives the same ids, untruncated — set the trainer's max_length to the same
    data.max_length so its keep_start cut matches ours; RewardTrainer drops overlong pairs instead of cutting):
      dpo, reward  prompt, chosen, rejected;   kto  prompt, completion, label
    Raises ValueError for items of the wrong kind for `trainer`.
    """
    paired = trainer in ("dpo", "reward")
    if any(isinstance(item, PreferencePair) != paired for item in items):
        raise ValueError(f"{trainer} takes {'preference pairs' if paired else 'unpaired examples'}")
    out = []
    for item in items:
        if form == "messages":
            out.append({"prompt": item.prompt, "chosen": item.chosen, "rejected": item.rejected} if paired else
                       {"prompt": item.prompt, "completion": item.completion, "label": item.label})
        elif trainer == "dpo":
            out.append({"prompt_ids": item.prompt_ids, "chosen_ids": item.chosen_ids,
                        "rejected_ids": item.rejected_ids})
        elif trainer == "reward":
            out.append({"chosen_ids": item.prompt_ids + item.chosen_ids,
                        "rejected_ids": item.prompt_ids + item.rejected_ids})
        else:
            out.append({"prompt_ids": item.prompt_ids, "completion_ids": item.completion_ids, "label": item.label})
    return out


def describe_pair(item: PreferencePair | UnpairedExample, tokenizer: Any,
                  open_mark: str = "⟦", close_mark: str = "⟧") -> Iterator[str]:
    """Lines showing an item as trained: the prompt's text, then each answer's supervised tokens between marks."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    yield decode(item.prompt_ids)
    if isinstance(item, PreferencePair):
        sides = [("chosen", item.chosen_ids, item.cut[0]), ("rejected", item.rejected_ids, item.cut[1])]
    else:
        sides = [("desirable" if item.label else "undesirable", item.completion_ids, item.truncated)]
    for name, ids, was_cut in sides:  # only the side that was cut says so
        cut = " (cut at data.max_length)" if was_cut else ""
        yield f"{name}, {len(ids)} tokens{cut}: {open_mark}{decode(ids)}{close_mark}"


def held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) items: a seeded `fraction` held out (at least one item when fraction > 0)."""
    if not fraction:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(items) * fraction))
    chosen = set(order[:n])
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


def read_preference_splits(cfg: RunConfig, tokenizer: Any, family: Family, kind: str, empty_thought: bool = False):
    """A run's preference data split: the training items and the held-out ones (data.eval_fraction of the source, or data.eval_dataset /
    data.eval_split read and checked the same way). Returns (PreferenceData, items, eval PreferenceData or None,
    eval items). `kind`: 'paired' or 'unpaired'; `empty_thought`: Gemma 4's empty thought block (the run's).
    Raises UserError (the held-out source's problems name data.eval_dataset)."""
    data = load_preferences(cfg.data, tokenizer, family, kind, empty_thought=empty_thought)
    items, eval_items = held_out(data.items, cfg.data.eval_fraction, cfg.training.seed)
    eval_data = None
    other = cfg.data.eval_dataset or (cfg.data.eval_split and cfg.data.dataset)
    if other:
        eval_cfg = cfg.data.model_copy(update={"dataset": other, "split": cfg.data.eval_split or cfg.data.split,
                                               "max_rows": None})
        try:
            eval_data = load_preferences(eval_cfg, tokenizer, family, kind, empty_thought=empty_thought)
        except UserError as exc:
            key = "data.eval_dataset" if cfg.data.eval_dataset else "data.eval_split"
            raise UserError(f"{key}: {exc.message}") from None
        eval_items = eval_data.items
    return data, items, eval_data, eval_items

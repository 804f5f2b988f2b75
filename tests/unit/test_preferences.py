"""Preference data: every schema, rendered by the training renderer, gives the ids of the run's chat template
and the ids TRL 1.16's own DPO, KTO and reward preparation gives; bad pairs name their file, line and reason.

Tokenizer-level only (no model is run). Gemma 3's fold rule is exercised through the Gemma 2 tiny tokenizer:
the template and the renderer depend on the family, not on the vocabulary.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gemma2_tune.config.schema import PreferenceDataSection
from gemma2_tune.data.preferences import (BOUNDARY_MERGED, PREFERENCE_ALIASES, PROMPT_COLUMN_IGNORED,
                                          SHARED_TURNS_TO_PROMPT, PreferencePair, build_pairs, build_unpaired,
                                          describe_pair, ids_fingerprint, load_preferences, parse_hh, trl_rows)
from gemma2_tune.data.sources import Row, load_rows
from gemma2_tune.data.template import use_run_template
from gemma2_tune.errors import UserError
from gemma2_tune.families import GEMMA2, GEMMA3_TEXT
from tests.conftest import write_jsonl

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

# One row per schema and shape; `conversation` gives (whole chosen, whole rejected) as the row's own messages,
# for the rows where the test can read them without our parser.
CORPUS = [
    ("explicit messages", {"prompt": [U("What is the time?")], "chosen": [A("ok")], "rejected": [A("no")]}),
    ("explicit, system first", {"prompt": [S("  Be brief.  "), U("  Why is the sky blue?\n")],
                                "chosen": [A("Rayleigh scattering.")], "rejected": [A("  Because.  ")]}),
    ("explicit multi-turn prompt", {"prompt": [U("Hi"), A("Hello."), U("Name a colour.")],
                                    "chosen": [A("ok")], "rejected": [A("Blue, obviously.")]}),
    ("explicit strings", {"prompt": "Where is Paris?", "chosen": "In France.", "rejected": "On the Moon."}),
    ("explicit, shared turns in the sides", {"prompt": [U("Sing!")],
                                             "chosen": [A("La."), U("Again?"), A("ok")],
                                             "rejected": [A("La."), U("Again?"), A("No.")]}),
    ("implicit messages", {"chosen": [U("Who wrote Hamlet?"), A("Shakespeare.")],
                           "rejected": [U("Who wrote Hamlet?"), A("Dickens.")]}),
    ("implicit with system (UltraFeedback, text prompt)",
     {"prompt": "Is water wet?", "chosen": [S("You are terse."), U("Is water wet?"), A("Yes.")],
      "rejected": [S("You are terse."), U("Is water wet?"), A("It depends on what you mean by wet.")]}),
    ("implicit ShareGPT", {"chosen": [{"from": "human", "value": "Can fish fly?"},
                                      {"from": "gpt", "value": "Some glide."}],
                           "rejected": [{"from": "human", "value": "Can fish fly?"}, {"from": "gpt", "value": "ok"}]}),
    ("implicit JSON text (CSV cells)", {"chosen": json.dumps([U("How are you?"), A("Well.")]),
                                        "rejected": json.dumps([U("How are you?"), A("ok")])}),
    ("HH text", {"chosen": "\n\nHuman: What day is it?\n\nAssistant: Monday.\n\nHuman: Sure?\n\nAssistant: Yes.",
                 "rejected": "\n\nHuman: What day is it?\n\nAssistant: Monday.\n\nHuman: Sure?\n\nAssistant: "
                             "No idea."}),
    ("HH prompt text", {"prompt": "\n\nHuman: What is a prime?\n\nAssistant:", "chosen": " A number with two divisors.",
                        "rejected": " A kind of beef."}),
    ("two system messages", {"prompt": [S("One."), S("Two."), U("Define love.")], "chosen": [A("ok")],
                             "rejected": [A("A feeling.")]}),
]
HAS_SYSTEM = {"explicit, system first", "implicit with system (UltraFeedback, text prompt)", "two system messages"}


def conversation(row: dict):
    """(whole chosen, whole rejected) as the row's own messages, or None for text rows."""
    if "prompt" in row and isinstance(row["prompt"], list):
        return row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    if isinstance(row["chosen"], list) and isinstance(row["chosen"][0], dict) and "role" in row["chosen"][0]:
        return row["chosen"], row["rejected"]
    return None


def rows_of(items):
    return [Row(f"corpus line {i + 1}", row) for i, (_, row) in enumerate(items)]


def template_ids(tokenizer, messages, generation_prompt=False):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


@pytest.fixture
def tok(tokenizer):
    before = tokenizer.chat_template
    yield tokenizer
    tokenizer.chat_template = before


@pytest.mark.parametrize("family", [GEMMA2, GEMMA3_TEXT], ids=["gemma2", "gemma3"])
@pytest.mark.parametrize("policy", ["fold", "drop", "error"])
def test_every_schema_gives_the_run_templates_ids(tok, family, policy):
    data = PreferenceDataSection(dataset="x.jsonl", system_policy=policy)
    pairs, report = build_pairs(rows_of(CORPUS), tok, data, family)
    use_run_template(tok, family, policy)
    expected_bad = {
        name for name, _ in CORPUS
        if (policy == "error" and name in HAS_SYSTEM)
        or (family is GEMMA3_TEXT and policy == "fold" and name == "two system messages")}  # Gemma 3 takes one
    assert report.rows_bad == len(expected_bad), report.bad_rows
    kept = [(name, row) for name, row in CORPUS if name not in expected_bad]
    assert [p.where for p in pairs] == [f"corpus line {i + 1}" for i, (n, _) in enumerate(CORPUS)
                                        if n not in expected_bad]
    for pair, (name, row) in zip(pairs, kept):
        assert pair.prompt[-1]["role"] == "user"
        assert [m["role"] for m in pair.chosen + pair.rejected] == ["assistant"] * 2
        assert pair.prompt_ids == template_ids(tok, pair.prompt, generation_prompt=True), name
        assert pair.prompt_ids + pair.chosen_ids == template_ids(tok, pair.prompt + pair.chosen), name
        assert pair.prompt_ids + pair.rejected_ids == template_ids(tok, pair.prompt + pair.rejected), name
        whole = conversation(row)
        if whole:  # the row's own messages, through the template: our cut and canonical roles lose nothing
            assert pair.prompt_ids + pair.chosen_ids == template_ids(tok, whole[0]), name
            assert pair.prompt_ids + pair.rejected_ids == template_ids(tok, whole[1]), name
        assert tok.decode(pair.chosen_ids).endswith("<end_of_turn>\n")
        assert tok.decode(pair.prompt_ids).endswith("<start_of_turn>model\n")
    assert report.rows_kept == len(kept) and report.supervised_tokens == sum(
        len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert report.notes.get(BOUNDARY_MERGED, 0) == 0  # Gemma's "\n" after "model" never merges with an answer


def test_golden_text_of_a_pair(tok):
    """Independent of both renderers: the exact Gemma strings, system text folded as Gemma 2 folds it."""
    row = {"prompt": [S("Be brief."), U("What is the time?")], "chosen": [A(" ok ")], "rejected": [A("no")]}
    (pair,), _ = build_pairs(rows_of([("", row)]), tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    assert tok.decode(pair.prompt_ids) == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is the time?<end_of_turn>\n"
                                           "<start_of_turn>model\n")
    assert tok.decode(pair.chosen_ids) == "ok<end_of_turn>\n"
    assert tok.decode(pair.rejected_ids) == "no<end_of_turn>\n"


def test_schema_notes_name_what_was_read(tok):
    _, report = build_pairs(rows_of(CORPUS), tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    assert report.notes["read as Anthropic HH text"] == 1
    assert report.notes["read as prompt/chosen/rejected"] == 7  # the HH-prompt row is explicit
    assert report.notes[PROMPT_COLUMN_IGNORED] == 1 and report.notes[SHARED_TURNS_TO_PROMPT] == 1


def test_hh_text_parses_into_turns():
    assert parse_hh("\n\nHuman: a\n\nAssistant: b\n\nHuman: c") == [U("a"), A("b"), U("c")]
    assert parse_hh("\n\nHuman: q\n\nAssistant:", open_end=True) == [U("q")]
    with pytest.raises(ValueError, match="does not start"):
        parse_hh("preamble\n\nHuman: q")


BAD = [
    ({"prompt": [U("q")], "chosen": [A("a")]}, "missing side: no 'rejected'"),
    ({"prompt": [U("q")], "chosen": [], "rejected": [A("b")]}, "missing side: 'chosen' is empty"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "missing side: 'chosen' is empty"),
    ({"prompt": [U("q")], "chosen": [A("same ")], "rejected": [A(" same")]}, "chosen is identical to rejected"),
    ({"chosen": [U("q1"), A("a")], "rejected": [U("q2"), A("b")]}, "share no prompt"),
    ({"prompt": [U("q"), A("a")], "chosen": [A("b")], "rejected": [A("c")]}, "prompt ends on a model turn"),
    ({"chosen": [U("q"), A("a"), U("r"), A("b")], "rejected": [U("q"), A("x"), U("r"), A("c")]},
     "differ before the last model turn (at turn 1"),
    ({"chosen": [U("q"), A("a"), U("r"), A("b")], "rejected": [U("q"), A("c")]}, "differ before the last model turn"),
    ({"chosen": "plain answer", "rejected": "other answer"}, "text with no turns and the row has no 'prompt'"),
    ({"prompt": [U("q")], "chosen": [A("<start_of_turn>a")], "rejected": [A("b")]}, "chosen: message 1"),
    ({"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")], "tools": [{"name": "f"}]}, ": row has 'tools'"),
    ({"prompt": [U("q")], "completion": [A("a")], "label": True}, "unpaired row"),
    ({"text": "hello"}, "no preference schema"),
    ({"messages": [U("q"), A("a")]}, "a chat (messages), not a preference pair"),
]


def test_bad_pairs_name_file_line_and_reason(tok, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [row for row, _ in BAD] + [good])
    data = PreferenceDataSection(dataset=str(path))
    rows, _ = load_rows(data)
    pairs, report = build_pairs(rows, tok, data, GEMMA2)
    assert len(pairs) == 1 and report.rows_bad == len(BAD)
    reasons = []  # report.bad_rows keeps the first few; check every row's reason one by one
    for i, (row, reason) in enumerate(BAD):
        _, one = build_pairs([Row(f"prefs.jsonl line {i + 1}", row)] + rows[-1:], tok, data, GEMMA2)
        reasons.append(one.bad_rows[0])
        assert one.bad_rows[0].startswith(f"prefs.jsonl line {i + 1}: ") and reason in one.bad_rows[0], one.bad_rows
    assert report.bad_rows == reasons[: len(report.bad_rows)]
    with pytest.raises(UserError, match="bad rows and data.on_bad_rows is 'error'") as err:
        build_pairs(rows, tok, data.model_copy(update={"on_bad_rows": "error"}), GEMMA2)
    assert err.value.exit_code == 2 and "prefs.jsonl line 1: missing side" in err.value.message


def test_unpaired_rows_and_pairs_for_kto(tok):
    rows = rows_of([
        ("", {"prompt": [U("q")], "completion": [A("good")], "label": True}),
        ("", {"prompt": "q2", "completion": "bad", "label": "false"}),
        ("", {"prompt": [U("q3")], "chosen": [A("yes")], "rejected": [A("nah")]}),
        ("", {"prompt": [U("q")], "completion": [A("a")], "label": "maybe"}),
        ("", {"prompt": [U("q")], "completion": [A("a"), U("b"), A("c")], "label": True}),
    ])
    data = PreferenceDataSection(dataset="x.jsonl")
    examples, report = build_unpaired(rows, tok, data, GEMMA2)
    assert [(e.where, e.label) for e in examples] == [("corpus line 1", True), ("corpus line 2", False),
                                                      ("corpus line 3", True), ("corpus line 3", False)]
    assert report.rows_kept == 3 and report.rows_bad == 2
    assert "'label' is 'maybe', not true or false" in report.bad_rows[0]
    assert "completion holds 3 turns" in report.bad_rows[1]
    use_run_template(tok, GEMMA2, "fold")
    for e in examples:
        assert e.prompt_ids + e.completion_ids == template_ids(tok, e.prompt + e.completion)
    with pytest.raises(ValueError, match="dpo takes preference pairs"):
        trl_rows(examples, "dpo")


def test_length_rules(tok):
    long_answer = "word " * 60
    row = {"prompt": [U("q")], "chosen": [A(long_answer)], "rejected": [A("short")]}
    same_start = {"prompt": [U("q")], "chosen": [A(long_answer + "yes")], "rejected": [A(long_answer + "no")]}
    long_prompt = {"prompt": [U("q " * 80)], "chosen": [A("a")], "rejected": [A("b")]}
    short = {"prompt": "q", "chosen": "a", "rejected": "b"}
    rows = rows_of([("", row), ("", same_start), ("", long_prompt), ("", short)])
    cut = PreferenceDataSection(dataset="x.jsonl", max_length=40)
    pairs, report = build_pairs(rows, tok, cut, GEMMA2)
    assert [p.where for p in pairs] == ["corpus line 1", "corpus line 4"]
    assert pairs[0].truncated and len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) == 40
    whole, _ = build_pairs(rows[:1], tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    assert pairs[0].rejected_ids == whole[0].rejected_ids  # the short side is not cut
    assert pairs[0].cut == (True, False)  # and only the cut side says so (preview labels it alone)
    from gemma2_tune.data.preferences import describe_pair

    chosen, rejected = list(describe_pair(pairs[0], tok))[1:]
    assert "(cut at data.max_length)" in chosen and "cut" not in rejected.split(":")[0]
    assert report.rows_truncated == 1 and report.rows_dropped_overlong == 2
    assert "the same in their first" in report.dropped_rows[0] and "leaves no room" in report.dropped_rows[1]
    pairs, report = build_pairs(rows, tok, cut.model_copy(update={"overlong": "drop"}), GEMMA2)
    assert [p.where for p in pairs] == ["corpus line 4"] and report.rows_dropped_overlong == 3
    assert "> data.max_length 40" in report.dropped_rows[0]


def _trl_prepare(trainer_cls, dataset, tok, max_length, **self_attrs):
    """Run a TRL trainer's own `_prepare_dataset` (tokenizing, filtering) without building a trainer."""
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    stub = SimpleNamespace(_tokenizer=tok, **self_attrs)
    return trainer_cls._prepare_dataset(stub, dataset, tok, args, "train")


def test_trl_prepares_the_same_ids_from_our_messages(tok):
    """TRL 1.16 renders our messages with the run's template: its ids are ours, for DPO, KTO and reward."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.reward_trainer import RewardTrainer

    data = PreferenceDataSection(dataset="x.jsonl", max_length=48)
    rows = rows_of([(n, r) for n, r in CORPUS if n != "two system messages"]
                   + [("long", {"prompt": [U("q")], "chosen": [A("word " * 40)], "rejected": [A("b")]})])
    pairs, report = build_pairs(rows, tok, data, GEMMA2)
    full, _ = build_pairs(rows, tok, data.model_copy(update={"max_length": 1024}), GEMMA2)
    assert report.rows_truncated == 1
    use_run_template(tok, GEMMA2, "fold")

    dpo = _trl_prepare(DPOTrainer, Dataset.from_list(trl_rows(pairs, "dpo", "messages")), tok, 48)
    columns = lambda rows, keys: [{k: r[k] for k in keys} for r in rows]  # noqa: E731
    assert columns(dpo, ("prompt_ids", "chosen_ids", "rejected_ids")) == trl_rows(full, "dpo")  # TRL cuts later
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=48)
    theirs, ours = collate(list(dpo)), collate(trl_rows(pairs, "dpo"))
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert theirs[key].tolist() == ours[key].tolist(), key

    reward = _trl_prepare(RewardTrainer, Dataset.from_list(trl_rows(full, "reward", "messages")), tok, None)
    assert columns(reward, ("chosen_ids", "rejected_ids")) == trl_rows(full, "reward")
    ids_only = _trl_prepare(RewardTrainer, Dataset.from_list(trl_rows(pairs, "reward")), tok, 48)
    assert [dict(r) for r in ids_only] == trl_rows(pairs, "reward")  # pre-tokenized: TRL keeps them as they are

    examples, _ = build_unpaired(rows, tok, data.model_copy(update={"max_length": 1024}), GEMMA2)
    kto = _trl_prepare(KTOTrainer, Dataset.from_list(trl_rows(examples, "kto", "messages")), tok, 1024,
                       calculate_KL=False)
    assert columns(kto, ("prompt_ids", "completion_ids", "label")) == trl_rows(examples, "kto")


def test_trl_dpo_does_not_take_pre_tokenized_rows(tok):
    """Why trl_rows' DPO ids need a trainer that overrides `_prepare_dataset` in TRL 1.16: if this starts passing
    through, TRL skips tokenized datasets and the override can go."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs, _ = build_pairs(rows_of(CORPUS[:1]), tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    with pytest.raises(KeyError):
        _trl_prepare(DPOTrainer, Dataset.from_list(trl_rows(pairs, "dpo")), tok, None)


def test_shipped_datasets(tok):
    """`concise` (40 pairs), its held-out 12 (prompts not in training), and the KTO variants: every row kept under
    every policy, and the preference is learnable: one hedging style on every rejected side, never on chosen."""
    loaded = {name: load_preferences(PreferenceDataSection(dataset=name), tok, GEMMA2,
                                     "unpaired" if "kto" in name else "paired") for name in PREFERENCE_ALIASES}
    counts = {name: (len(d.items), d.report.rows_bad) for name, d in loaded.items()}
    assert counts == {"concise": (40, 0), "concise-held-out": (12, 0), "concise-kto": (80, 0),
                      "concise-kto-held-out": (24, 0)}
    train, held = loaded["concise"].items, loaded["concise-held-out"].items
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in held}
    for pair in train + held:
        assert "I believe the answer is: " + pair.chosen[0]["content"] in pair.rejected[0]["content"]
        assert len(pair.chosen_ids) * 4 < len(pair.rejected_ids)
    assert loaded["concise-kto"].summary()["desirable"] == 40
    # The KTO file is the pairs unpaired: the same examples as unpairing the pairs here.
    concise = PreferenceDataSection(dataset=str(PREFERENCE_ALIASES["concise"][0]))
    unpaired, _ = build_unpaired(load_rows(concise)[0], tok,
                                 PreferenceDataSection(dataset="x"), GEMMA2)
    key = lambda e: (e.prompt_ids, e.completion_ids, e.label)  # noqa: E731
    assert sorted(map(key, unpaired)) == sorted(map(key, loaded["concise-kto"].items))
    summary = loaded["concise"].summary()
    assert summary["dataset"] == "concise" and len(summary["fingerprint"]) == 16 and summary["items"] == 40
    json.dumps(summary)


def test_fingerprint_follows_what_trains(tok):
    rows = rows_of(CORPUS)
    fold, _ = build_pairs(rows, tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    drop, _ = build_pairs(rows, tok, PreferenceDataSection(dataset="x.jsonl", system_policy="drop"), GEMMA2)
    again, _ = build_pairs(rows, tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    assert ids_fingerprint(fold) == ids_fingerprint(again) != ids_fingerprint(drop)
    assert ids_fingerprint(fold[1:]) != ids_fingerprint(fold)


def test_preview_shows_both_sides(tok, tmp_path):
    from gemma2_tune.data.preview import preview_preferences

    path = write_jsonl(tmp_path / "p.jsonl", [CORPUS[1][1], {"chosen": "x"}, CORPUS[0][1]])
    shown = list(preview_preferences(PreferenceDataSection(dataset=str(path)), tok, GEMMA2, 5))
    assert [h.split(":")[0] for h, _ in shown] == ["── p.jsonl line 1", "── p.jsonl line 3", "summary"]
    heading, text = shown[0]
    assert "Be brief.\n\nWhy is the sky blue?<end_of_turn>" in text
    assert "chosen, " in text and "⟦Rayleigh scattering.<end_of_turn>\n⟧" in text
    assert "⟦Because.<end_of_turn>\n⟧" in text
    assert "1 bad" in shown[-1][1] and "p.jsonl line 2: missing side: no 'rejected'" in shown[-1][1]
    kto = list(preview_preferences(PreferenceDataSection(dataset=str(path)), tok, GEMMA2, 1, kind="unpaired"))
    assert "desirable" in kto[0][1] and len(kto) == 2


def test_describe_pair_marks_supervised_tokens(tok):
    (pair,), _ = build_pairs(rows_of(CORPUS[:1]), tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    assert isinstance(pair, PreferencePair)
    lines = list(describe_pair(pair, tok))
    assert lines == ["<bos><start_of_turn>user\nWhat is the time?<end_of_turn>\n<start_of_turn>model\n",
                     f"chosen, {len(pair.chosen_ids)} tokens: ⟦ok<end_of_turn>\n⟧",
                     f"rejected, {len(pair.rejected_ids)} tokens: ⟦no<end_of_turn>\n⟧"]


class MergingTokenizer:
    """Characters as ids, except that "\\n" merges with the next letter (as some BPE vocabularies merge): the
    prompt's last token is then not a prefix of prompt + answer."""

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text[i] == "\n" and i + 1 < len(text) and text[i + 1].isalpha():
                ids.append(100_000 + ord(text[i + 1]))
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return SimpleNamespace(input_ids=ids)


def test_answer_starts_where_prompt_and_sequence_ids_part():
    """TRL's rule for a merged boundary: the prompt keeps its common prefix only, and prompt + answer ids are still
    the sequence's own ids (nothing dropped, nothing added); the pair is counted."""
    tok = MergingTokenizer()
    rows = rows_of([("", {"prompt": "q", "chosen": "yes", "rejected": "no"})])
    (pair,), report = build_pairs(rows, tok, PreferenceDataSection(dataset="x.jsonl"), GEMMA2)
    prompt_text = "<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n"
    assert pair.prompt_ids == tok(prompt_text).input_ids[:-1]  # the final "\n" merged into "\ny" / "\nn"
    assert pair.prompt_ids + pair.chosen_ids == tok(prompt_text + "yes<end_of_turn>\n").input_ids
    assert pair.prompt_ids + pair.rejected_ids == tok(prompt_text + "no<end_of_turn>\n").input_ids
    assert report.notes[BOUNDARY_MERGED] == 1

import pytest

from gemma2_tune.data.turns import normalise
from gemma2_tune.config.schema import SftDataSection
from gemma2_tune.data.sources import Row
from gemma2_tune.errors import UserError
from gemma2_tune.data.examples import TurnTokenizer, build_examples, mark_supervised
from gemma2_tune.data.turns import IGNORE_INDEX

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
         {"role": "assistant", "content": "A small model."}, {"role": "user", "content": "And what do you do?"},
         {"role": "assistant", "content": "I answer questions."}]


def rows(*messages_lists):
    return [Row(f"row {i}", {"messages": m}) for i, m in enumerate(messages_lists)]


def test_ids_are_the_full_string_tokenization(tokenizer):
    enc = TurnTokenizer(tokenizer).encode(normalise(CONVO, "fold"))
    assert enc.ids == tokenizer(enc.text, add_special_tokens=False)["input_ids"]
    assert enc.ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(enc.ids) == enc.text


def test_mask_supervises_model_turns_with_end_of_turn_and_nothing_else(tokenizer):
    (ex,), _ = build_examples(rows(CONVO), tokenizer, SftDataSection(dataset="x"))
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    sot = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    supervised = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "A small model.<end_of_turn>I answer questions.<end_of_turn>"
    # every <end_of_turn> that closes a model turn is learned; those closing user turns are not
    eot_positions = [i for i, t in enumerate(ex.input_ids) if t == eot]
    assert [ex.labels[i] != IGNORE_INDEX for i in eot_positions] == [False, True, False, True]
    assert all(ex.labels[i] == IGNORE_INDEX for i, t in enumerate(ex.input_ids) if t == sot)
    assert ex.labels[0] == IGNORE_INDEX
    assert ex.supervised_tokens == len(supervised)


def test_train_on_all(tokenizer):
    (ex,), report = build_examples(rows(CONVO), tokenizer, SftDataSection(dataset="x", train_on="all"))
    assert ex.labels == ex.input_ids
    assert report.supervised_tokens == len(ex.input_ids) - 1


def test_preview_marks(tokenizer):
    enc = TurnTokenizer(tokenizer).encode(normalise(CONVO, "fold"))
    marked = mark_supervised(enc, limit=10_000)
    assert marked == ("<bos><start_of_turn>user\nBe brief.\n\nHi there, who are you?<end_of_turn>\n"
                      "<start_of_turn>model\n⟦A small model.<end_of_turn>⟧\n<start_of_turn>user\nAnd what do you do?"
                      "<end_of_turn>\n<start_of_turn>model\n⟦I answer questions.<end_of_turn>⟧\n")


def test_overlong_rows_truncated_or_dropped_and_counted(tokenizer):
    long_answer = [{"role": "user", "content": "Tell me. " * 40}, {"role": "assistant", "content": "Fine. " * 40}]
    short = CONVO[1:3]
    cfg = SftDataSection(dataset="x", max_length=40)
    examples, report = build_examples(rows(long_answer, short), tokenizer, cfg)
    # the long row's supervised part starts after token 40: truncation leaves nothing to learn -> dropped
    assert report.rows_dropped_unsupervised == 1 and report.rows_kept == 1
    assert "row 0" in report.dropped_rows[0] and "after truncation" in report.dropped_rows[0]
    user_short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure. " * 40}]
    examples, report = build_examples(rows(user_short), tokenizer, cfg)
    assert report.rows_truncated == 1 and len(examples[0].input_ids) == 40
    examples, report = build_examples(rows(user_short, short), tokenizer, SftDataSection(dataset="x", max_length=40, overlong="drop"))
    assert report.rows_dropped_overlong == 1 and report.rows_kept == 1
    assert report.total_tokens == len(examples[0].input_ids)


def test_bad_rows_skipped_with_count_and_locations_or_fatal(tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    data = rows(CONVO, bad, bad, CONVO[1:3], bad, bad, bad, bad)
    examples, report = build_examples(data, tokenizer, SftDataSection(dataset="x"))
    assert (report.rows_read, report.rows_kept, report.rows_bad) == (8, 2, 6)
    assert len(report.bad_rows) == 5 and report.bad_rows[0].startswith("row 1: ")
    with pytest.raises(UserError, match="6 bad rows") as err:
        build_examples(data, tokenizer, SftDataSection(dataset="x", on_bad_rows="error"))
    assert "row 1:" in err.value.message
    with pytest.raises(UserError, match="no usable rows"):
        build_examples(rows(bad), tokenizer, SftDataSection(dataset="x"))


def test_system_policy_error_makes_system_rows_bad(tokenizer):
    _, report = build_examples(rows(CONVO, CONVO[1:3]), tokenizer, SftDataSection(dataset="x", system_policy="error"))
    assert report.rows_bad == 1 and report.rows_kept == 1


def chat(*pairs, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


def test_empty_system_messages_are_dropped_and_counted_not_bad_rows(tokenizer):
    rows = [Row(f"r{i}", chat(("system", s), ("user", "Hi"), ("assistant", "Yo"))) for i, s in enumerate(["", "  \n"])]
    rows.append(Row("r2", chat(("user", "Hi"), ("assistant", "Yo"))))
    examples, report = build_examples(rows, tokenizer, SftDataSection(dataset="x"))
    assert report.rows_kept == 3 and report.rows_bad == 0
    assert report.notes == {"empty system message dropped": 2}
    assert "2 x empty system message dropped" in "\n".join(report.summary_lines())


def test_fields_the_format_cannot_express_make_bad_rows_unless_ignored(tokenizer):
    tools = chat(("user", "Weather in Paris?"), ("assistant", "Sunny."), tools=[{"name": "get_weather"}])
    image = chat(("user", "<image> What is in the picture?"), ("assistant", "A cat."), images=["cat.png"])
    call = {"messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "w"}]}]}
    plain = chat(("user", "Hi"), ("assistant", "Yo"), tools=[])  # an empty field expresses nothing
    rows = [Row("a.jsonl line 1", tools), Row("a.jsonl line 2", image), Row("a.jsonl line 3", call),
            Row("a.jsonl line 4", plain)]
    _, report = build_examples(rows, tokenizer, SftDataSection(dataset="x"))
    assert (report.rows_bad, report.rows_kept) == (3, 1)
    assert "a.jsonl line 1: row has 'tools' (tool definitions)" in report.bad_rows[0]
    assert "'images'" in report.bad_rows[1] and "message 1 has 'tool_calls'" in report.bad_rows[2]
    assert "data.unsupported_fields=ignore" in report.bad_rows[0]
    _, report = build_examples(rows, tokenizer, SftDataSection(dataset="x", unsupported_fields="ignore"))
    assert (report.rows_bad, report.rows_kept) == (0, 4)
    assert report.notes == {"'tools' ignored (data.unsupported_fields=ignore)": 1,
                            "'images' ignored (data.unsupported_fields=ignore)": 1,
                            "'tool_calls' ignored (data.unsupported_fields=ignore)": 1}

import json

import pytest

from conftest import write_jsonl
from gemma2_tune.data.turns import BadRow, normalise, render
from gemma2_tune.config.schema import DataSection
from gemma2_tune.data.sources import load_rows, parse_marked_text, row_to_messages
from gemma2_tune.errors import UserError

GOLDEN = "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"


def gemma_text(row, policy="fold"):
    return render(normalise(row_to_messages(row), policy)).text


def test_chatml_text_becomes_gemma_turns_without_chatml_markers():
    row = {"text": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"}
    out = gemma_text(row)
    assert out == GOLDEN
    assert "<|im_start|>" not in out and "<|im_end|>" not in out


def test_chatml_with_system_is_folded():
    row = {"text": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                   "<|im_start|>assistant\nHello!<|im_end|>"}
    assert gemma_text(row) == GOLDEN.replace("user\nHi there", "user\nBe kind.\n\nHi there")


def test_sharegpt_conversations():
    row = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}
    assert gemma_text(row) == GOLDEN


def test_prompt_completion_strings_and_conversational():
    assert gemma_text({"prompt": "Hi there", "completion": "Hello!"}) == GOLDEN
    row = {"prompt": [{"role": "user", "content": "Hi there"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
    assert gemma_text(row) == GOLDEN


def test_messages_with_model_role_and_gemma_text():
    assert gemma_text({"messages": [{"role": "user", "content": "Hi there"}, {"role": "model", "content": "Hello!"}]}) == GOLDEN
    assert gemma_text({"text": GOLDEN}) == GOLDEN  # already Gemma-formatted text round-trips


@pytest.mark.parametrize("text,reason", [
    ("just some plain text", "no ChatML"),
    ("<|im_start|>user\nunterminated", "unterminated"),
    ("<|im_start|>user\nhi<|im_end|>garbage<|im_start|>assistant\nyo<|im_end|>", "stray text"),
])
def test_unparseable_text(text, reason):
    with pytest.raises(BadRow, match=reason):
        parse_marked_text(text)


def test_unknown_schema_names_its_columns():
    with pytest.raises(BadRow, match=r"has \['foo'\]"):
        row_to_messages({"foo": 1})
    with pytest.raises(BadRow, match="only one of"):
        row_to_messages({"prompt": "x"})


ROWS = [
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
]


def test_local_formats_and_folders(tmp_path):
    import datasets

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    datasets.Dataset.from_list([{"prompt": "p", "completion": "q"}]).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "d.csv").write_text('prompt,completion\n"p2","q2"\n')
    rows, source = load_rows(DataSection(dataset=str(tmp_path)))
    assert source.kind == "local" and len(source.files) == 4
    assert [r.where for r in rows] == ["a.jsonl line 1", "a.jsonl line 2", "b.json item 0", "b.json item 1",
                                       "c.parquet row 0", "d.csv row 0"]
    texts = [gemma_text(r.data) for r in rows]
    assert "model\nq<end_of_turn>" in texts[4] and "model\nq2<end_of_turn>" in texts[5]
    again, source2 = load_rows(DataSection(dataset=str(tmp_path / "a.jsonl")))
    assert len(again) == 2 and source2.fingerprint != source.fingerprint


def test_fingerprint_follows_content(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ROWS)
    fp1 = load_rows(DataSection(dataset=str(f)))[1].fingerprint
    assert load_rows(DataSection(dataset=str(f)))[1].fingerprint == fp1
    write_jsonl(f, ROWS[::-1])
    assert load_rows(DataSection(dataset=str(f)))[1].fingerprint != fp1


def test_invalid_json_line_is_a_bad_row_with_its_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    rows, _ = load_rows(DataSection(dataset=str(f)))
    assert rows[1].where == "x.jsonl line 2"
    with pytest.raises(BadRow, match="invalid JSON"):
        row_to_messages(rows[1].data)


def test_missing_paths_and_empty_sources(tmp_path):
    with pytest.raises(UserError, match="no such dataset file"):
        load_rows(DataSection(dataset=str(tmp_path / "nope.jsonl")))
    with pytest.raises(UserError, match="folder has no"):
        load_rows(DataSection(dataset=str(tmp_path)))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        load_rows(DataSection(dataset=str(tmp_path / "empty.jsonl")))


def test_hub_unreachable_says_so_and_how_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_rows(DataSection(dataset="oasst"))
    assert "OpenAssistant/oasst_top1_2023-08-25" in err.value.message
    assert "--dataset data/chats.jsonl" in err.value.message


def test_max_rows_and_quickstart_alias_uses_several_schemas():
    rows, source = load_rows(DataSection(dataset="quickstart"))
    schemas = {next(k for k in ("messages", "conversations", "text") if k in r.data) for r in rows}
    assert schemas == {"messages", "conversations", "text"}
    assert len(load_rows(DataSection(dataset="quickstart", max_rows=5))[0]) == 5


@pytest.mark.parametrize("end", ["<|endoftext|>", "</s>", "\n<|endoftext|>\n", "<|eot_id|></s>"])
def test_another_tokenizers_end_marker_after_the_last_turn_is_stripped_and_counted(end):
    from collections import Counter

    notes = Counter()
    text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>" + end
    assert render(normalise(parse_marked_text(text, notes), "fold")).text == GOLDEN
    assert notes == {"foreign end marker after the last turn stripped": 1}


def test_a_refused_chatml_row_names_the_true_cause():
    base = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"
    with pytest.raises(BadRow, match="unterminated turn"):
        parse_marked_text(base + "\n<|im_start|>user\nMore?")
    with pytest.raises(BadRow, match="text after the last turn: '</s>Thanks for reading'"):
        parse_marked_text(base + "</s>Thanks for reading")

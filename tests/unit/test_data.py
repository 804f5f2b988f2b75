import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from gemma2_tune.data.turns import BadRow, normalise, render
from gemma2_tune.config.schema import DataSection, SftDataSection
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
    for pair in ({"prompt": "q", "chosen": "a", "rejected": "b"},  # explicit and implicit preference rows
                 {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}):
        with pytest.raises(BadRow, match=r"a preference pair \(chosen/rejected\), not a chat: `dpo` and `reward`"):
            row_to_messages(pair)


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
                                       "c.parquet row 0", "d.csv line 2"]
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


# Files as users' tools write them.
CHAT = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
OTHER = {"messages": [{"role": "user", "content": "Again"}, {"role": "assistant", "content": "Yes."}]}


def examples_of(path, tokenizer, **data):
    from gemma2_tune.data.examples import build_examples

    cfg = SftDataSection(dataset=str(path), **data)
    rows, source = load_rows(cfg)
    return build_examples(rows, tokenizer, cfg)[1], source


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Notepad and Excel's "CSV UTF-8" start files with a UTF-8 byte-order mark; PowerShell's `>` writes UTF-16."""
    bom = "\ufeff"
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text(bom + json.dumps(CHAT) + "\n" + json.dumps(OTHER) + "\n", encoding="utf-8")
    rows, _ = load_rows(DataSection(dataset=str(jsonl)))
    assert [gemma_text(r.data) for r in rows][0] == GOLDEN and len(rows) == 2
    single = tmp_path / "chats.json"
    single.write_text(bom + json.dumps([CHAT]), encoding="utf-8")
    assert gemma_text(load_rows(DataSection(dataset=str(single)))[0][0].data) == GOLDEN
    table = tmp_path / "chats.csv"
    table.write_text(bom + "prompt,completion\nHi there,Hello!\n", encoding="utf-8")
    assert gemma_text(load_rows(DataSection(dataset=str(table)))[0][0].data) == GOLDEN
    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps(CHAT) + "\n", encoding="utf-16")
    assert gemma_text(load_rows(DataSection(dataset=str(wide)))[0][0].data) == GOLDEN


def test_a_line_that_is_not_utf8_is_a_bad_row_naming_its_line(tmp_path, tokenizer):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(CHAT).encode() + b"\n" + json.dumps(OTHER).replace("Again", "Caf\u00e9")
                  .replace("\\u00e9", "\xe9").encode("latin-1") + b"\n")
    report, _ = examples_of(f, tokenizer)
    assert report.rows_kept == 1 and report.bad_rows == ["latin1.jsonl line 2: not valid UTF-8 (invalid continuation "
                                                         "byte at column 47)"]


def test_a_lone_surrogate_is_a_counted_bad_row_not_a_crash(tmp_path, tokenizer):
    """Half an emoji (a JSON escape cut between the two halves of a UTF-16 pair) can't be tokenized."""
    f = tmp_path / "cut.jsonl"
    f.write_text(json.dumps(CHAT) + "\n" + json.dumps(OTHER).replace("Again", "Again \\ud83d") + "\n")
    report, _ = examples_of(f, tokenizer)
    assert report.rows_kept == 1 and report.rows_bad == 1
    assert report.bad_rows[0].startswith("cut.jsonl line 2: message 0 (user) has a lone UTF-16 surrogate (U+D83D) at "
                                         "character 6")
    from typer.testing import CliRunner

    from gemma2_tune.cli import app

    r = CliRunner().invoke(app, ["preview", "--model", "builtin:tiny-gemma2", "--dataset", str(f), "-n", "5"])
    assert r.exit_code == 0, r.output
    assert "1 bad (skipped)" in r.output and "cut.jsonl line 2: message 0 (user) has a lone UTF-16 surrogate" in r.output


def test_openai_text_parts_train_as_serve_joins_them_and_other_parts_are_bad_rows(tmp_path, tokenizer):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}
    assert gemma_text(parts) == GOLDEN
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    report, _ = examples_of(write_jsonl(tmp_path / "parts.jsonl", [parts, image]), tokenizer)
    assert report.rows_kept == 1 and report.bad_rows == [
        "parts.jsonl line 2: message 0 (user) content part 0 is of type 'image_url'; a text model takes only text "
        "parts (text, input_text, output_text)"]


def test_csv_cells_are_text_as_written(tmp_path, tokenizer):
    """Labels, codes and prices that look like numbers, and `NA`, are what the cells say."""
    f = tmp_path / "labels.csv"
    f.write_text('prompt,completion\nIs it spam?,1\nIs it spam?,0\nAgent?,007\nPrice?,1.50\nValue?,NA\n'
                 '"Two\nlines?",yes\nLast?,ok\n')
    rows, _ = load_rows(DataSection(dataset=str(f)))
    assert [r.data["completion"] for r in rows] == ["1", "0", "007", "1.50", "NA", "yes", "ok"]
    assert [r.where for r in rows][-2:] == ["labels.csv line 7", "labels.csv line 9"]  # the line a row starts on
    report, _ = examples_of(f, tokenizer)
    assert report.rows_bad == 0 and report.rows_kept == 7
    assert "model\n007<end_of_turn>" in gemma_text(rows[2].data)


def test_a_folder_skips_hidden_copies_names_its_files_and_warns_on_duplicates(tmp_path, tokenizer):
    folder = tmp_path / "data"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(folder / "chats.jsonl", [CHAT, OTHER])
    write_jsonl(folder / ".ipynb_checkpoints" / "chats-checkpoint.jsonl", [CHAT, OTHER])  # Jupyter's autosave
    write_jsonl(folder / ".#chats.jsonl", [CHAT])  # an editor's lock/autosave file
    write_jsonl(folder / "more.jsonl", [OTHER, {"messages": [{"role": "user", "content": "New"},
                                                             {"role": "assistant", "content": "Row."}]}])
    report, source = examples_of(folder, tokenizer)
    assert [Path(f).name for f in source.files] == ["chats.jsonl", "more.jsonl"]
    assert report.rows_read == 4 and report.rows_kept == 4
    assert source.lines() == [f"data folder {folder}: 2 files read: chats.jsonl (2 rows), more.jsonl (2 rows)",
                              "  2 hidden files skipped (names or folders starting with '.', e.g. "
                              ".ipynb_checkpoints/: autosaved copies)"]
    assert report.rows_duplicate == 1 and report.duplicate_rows == ["more.jsonl line 1 = chats.jsonl line 2"]
    assert "warning: 1 kept row is an exact duplicate of an earlier row" in "\n".join(report.summary_lines())
    assert report.to_dict()["rows_duplicate"] == 1  # run.json's `data` section


def test_a_file_that_is_not_text_is_refused_naming_its_line_and_nothing_is_written(tmp_path):
    from typer.testing import CliRunner

    from gemma2_tune.cli import app

    f = tmp_path / "chats.json"
    f.write_bytes(b'[\n{"prompt": "Caf\xe9?", "completion": "Yes."}\n]\n')  # Latin-1, as older Excel saves
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["sft", "--model", "builtin:tiny-gemma2", "--dataset", str(f), "-o", str(out),
                                 "--max-steps", "1", "--set", "quantization.load_in_4bit=false"])
    assert r.exit_code == 2, r.output
    assert f"{f} line 2: not valid UTF-8 text (invalid continuation byte at byte 17); save the file as UTF-8" in r.output
    assert not out.exists()

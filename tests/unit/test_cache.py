"""Tokenized data is cached by everything that shapes it; a second run or a resume doesn't tokenize again."""

import json

from typer.testing import CliRunner

from conftest import write_jsonl
from gemma2_tune.data.cache import cache_key
from gemma2_tune.config.schema import SftDataSection
from gemma2_tune.cli import app

runner = CliRunner()


def run(tmp_path, name, data, *sets):
    out = tmp_path / name
    args = ["sft", "--recipe", "quickstart-cpu", "--dataset", str(data), "-o", str(out), "--max-steps", "1",
            "--set", "training.save_steps=null"]
    for s in sets:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads((out / "run.json").read_text())["data"]["cache"], r.output


def test_second_run_hits_and_any_data_setting_misses(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
            for i in range(6)]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    first, _ = run(tmp_path, "a", data)
    second, output = run(tmp_path, "b", data)
    assert not first["hit"] and second["hit"] and first["key"] == second["key"]
    assert "tokenized data: from cache" in output
    other, _ = run(tmp_path, "c", data, "data.max_length=64")
    assert not other["hit"] and other["key"] != first["key"]
    write_jsonl(data, rows[:5])  # same file, other content
    changed, _ = run(tmp_path, "d", data)
    assert not changed["hit"]


def test_key_covers_tokenizer_and_every_data_setting(tokenizer):
    base = SftDataSection(dataset="x")
    key = cache_key(base, "fp", tokenizer)
    assert cache_key(base, "fp", tokenizer) == key
    for change in ({"system_policy": "drop"}, {"packing": False}, {"train_on": "all"}, {"overlong": "drop"}):
        assert cache_key(base.model_copy(update=change), "fp", tokenizer) != key
    assert cache_key(base, "other-fingerprint", tokenizer) != key

    class Other:
        def get_vocab(self):
            return {"a": 0}

    assert cache_key(base, "fp", Other()) != key


def test_held_out_split_seed_is_part_of_the_key(tokenizer):
    data = SftDataSection(dataset="x", eval_fraction=0.2)
    assert cache_key(data, "fp", tokenizer, split_seed=1) != cache_key(data, "fp", tokenizer, split_seed=2)

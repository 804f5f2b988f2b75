"""eval --suite gemma2-report: the launch post's benchmarks with the report's few-shot settings, offline on
small local task files that stand in for lm-eval's (same task names), beside the published scores."""

import json

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from gemma2_tune.cli import app

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow
runner = CliRunner()
CHOICE_TASKS = ("mmlu", "arc_challenge", "hellaswag", "winogrande")


def local_tasks(folder):
    """Task files named like lm-eval's (an include path takes precedence over the built-in ones), 30 rows each."""
    folder.mkdir()
    rows = [{"question": f"Which word is {w}?", "choices": [w, "stone", "cloud"], "answer": 0}
            for w in ["red", "blue", "tall", "warm", "quick", "soft"] * 5]
    data = write_jsonl(folder / "choice.jsonl", rows)
    for task in CHOICE_TASKS:
        (folder / f"{task}.yaml").write_text(f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    sums = write_jsonl(folder / "sums.jsonl", [{"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"}
                                               for a in range(1, 31)])
    (folder / "gsm8k.yaml").write_text(f"""task: gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {sums}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "<end_of_turn>"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
""")
    return folder


def test_suite_runs_each_benchmark_with_the_reports_shots(tmp_path, tiny_model_dir):
    tasks = local_tasks(tmp_path / "tasks")
    r = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--suite", "gemma2-report", "--include-path",
                            str(tasks), "--limit", "3"])
    assert r.exit_code == 0, r.output
    table = r.output[r.output.index("benchmark"):].splitlines()
    shots = {line.split()[0]: int(line.split()[1]) for line in table[1:6]}
    assert shots == {"MMLU": 5, "GSM8K": 5, "ARC-c": 25, "HellaSwag": 10, "Winogrande": 5}
    assert "no published scores for this size" in r.output and "not comparable" in r.output


def test_suite_reports_what_lm_eval_ran_and_the_published_scores(tmp_path, tiny_model_dir):
    from gemma2_tune.after.harness import PUBLISHED, run_suite
    from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer

    tasks = local_tasks(tmp_path / "tasks")
    model, _ = load_model(LoadRequest(str(tiny_model_dir), dtype="float32"))
    lines = []
    rows = run_suite(model, load_tokenizer(str(tiny_model_dir)), "gemma2-report", "27b", str(tasks), 2, echo=lines.append)
    assert {label: r["num_fewshot_run"] for label, r in rows.items()} == {
        "MMLU": 5, "GSM8K": 5, "ARC-c": 25, "HellaSwag": 10, "Winogrande": 5}  # as lm-eval ran them
    assert all(r["examples"] == 2 and 0.0 <= r["score"] <= 100.0 for r in rows.values())
    assert rows["MMLU"]["published"] == PUBLISHED["27b"]["mmlu"] == 75.2
    text = "\n".join(lines)
    assert "published (Gemma 2 27B base)" in text and "launch post" in text
    json.dumps(rows)  # recordable


def test_bad_suite_options_are_refused_before_loading(tiny_model_dir, tmp_path):
    base = ["eval", "--model", str(tiny_model_dir)]
    for extra, message in ((["--suite", "open-llm-v2"], "unknown; available: gemma2-report"),
                           (["--suite", "gemma2-report", "--tasks", "arc_challenge"], "choose one"),
                           (["--suite", "gemma2-report", "--limit", "0"], "--limit 0: must be at least 1"),
                           (["--suite", "gemma2-report", "--include-path", str(tmp_path / "no")], "no such folder")):
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, base + ["--suite", "gemma2-report"])  # the hub is off in tests: lm-eval's data unreachable
    assert r.exit_code == 2 and "the data of MMLU ('mmlu') could not be loaded" in r.output, r.output
    assert "Loading weights" not in r.output  # found before the model loads

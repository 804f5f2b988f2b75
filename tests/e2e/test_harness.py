"""lm-eval requests reach the model as Gemma was trained: exactly one <bos> at the start, for every request type
(loglikelihood, loglikelihood_rolling, generate_until), with a tokenizer that adds <bos> itself as Gemma's do."""

import pytest

from conftest import write_jsonl

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # three lm-eval tasks on the tiny model (no training)


def task_files(folder):
    folder.mkdir()
    docs = write_jsonl(folder / "docs.jsonl", [
        {"question": "Is the sea blue?", "choices": ["yes", "no"], "answer": 0,
         "text": "The sea is wide and blue. Ships sail on it.", "target": "yes"},
        {"question": "<bos>Is fire cold?", "choices": ["yes", "no"], "answer": 1,  # a prompt already holding <bos>
         "text": "Fire is hot. It burns wood and warms the hands.", "target": "no"},
    ])
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
    (folder / "bos_choice.yaml").write_text(f"""task: bos_choice
{common}output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "bos_rolling.yaml").write_text(f"""task: bos_rolling
{common}output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (folder / "bos_generate.yaml").write_text(f"""task: bos_generate
{common}output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["<end_of_turn>"]
  do_sample: false
  max_gen_toks: 3
metric_list:
  - metric: exact_match
""")
    return folder


def test_every_request_type_starts_with_exactly_one_bos(tiny_model_dir, tmp_path):
    from gemma2_tune.after.harness import run_tasks
    from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    bos = tokenizer.bos_token_id
    assert tokenizer("Hi").input_ids[0] == bos  # it adds <bos> itself, like every real Gemma tokenizer
    model, _ = load_model(LoadRequest(str(tiny_model_dir), dtype="float32", attn_implementation="eager"))
    starts = []

    def record(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        positions = kwargs.get("position_ids")
        if positions is None or int(positions[0, 0]) == 0:  # a request's first forward, not a generation step
            starts.extend(row[:2].tolist() for row in ids)

    model.register_forward_pre_hook(record, with_kwargs=True)
    for task in ("bos_choice", "bos_rolling", "bos_generate"):
        before = len(starts)
        run_tasks(model, tokenizer, [task], str(task_files(tmp_path / task)), None, echo=lambda _: None)
        seen = starts[before:]
        assert len(seen) >= 2, task
        assert all(len(s) == 2 and s[0] == bos and s[1] != bos for s in seen), (task, seen)

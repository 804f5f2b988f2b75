"""merge-models (mergekit) and WARP on tiny models: two runs with EMA -> SLERP -> LITI towards the base -> eval
of every stage side by side; the self-checks a recipe implies; inputs that can't be merged."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import QUESTIONS, ok_rows, write_jsonl
from gemma2_tune.cli import app

pytest.importorskip("mergekit")
pytestmark = pytest.mark.slow
runner = CliRunner()
HELD_OUT = ["Is it late?", "Do cats purr?", "What is blue?", "Who are you?"]


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


@pytest.fixture(scope="module")
def warp(tmp_path_factory, tiny_model_dir):
    """Two QLoRA runs with an EMA (seeds 1 and 2) taught to answer 'ok'; held-out chats."""
    tmp = tmp_path_factory.mktemp("warp")
    data = write_jsonl(tmp / "ok.jsonl", ok_rows(QUESTIONS))
    held = write_jsonl(tmp / "held.jsonl", ok_rows(HELD_OUT))
    for seed in (1, 2):
        r = cli("sft", "--recipe", "quickstart-cpu", "--dataset", data, "-o", tmp / f"run{seed}", "--max-steps", 30,
                "--set", "training.ema_decay=0.9", "--set", f"training.seed={seed}", "--set", "data.packing=false",
                "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=null")
        assert r.exit_code == 0, r.output
    return tmp, held


def losses(output: str) -> dict[str, float]:
    table = output[output.index("supervised tokens\n"):].splitlines()[1:]
    return {line.split()[0]: float(line.split()[1]) for line in table if line.strip()}


def test_warp_pipeline_ema_slerp_liti_and_eval_of_every_stage(warp):
    tmp, held = warp
    slerp, final = tmp / "slerp", tmp / "warp"
    r = cli("merge-models", "--method", "slerp", "--models", tmp / "run1" / "ema", tmp / "run2" / "ema",
            "-o", slerp, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    r = cli("merge-models", "--method", "linear", "--models", slerp, "--base", "builtin:tiny-gemma2", "--liti", "0.5",
            "-o", final, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    r = cli("eval", "--adapter", tmp / "run1", "--dataset", held, "--compare", tmp / "run1" / "ema",
            "--compare", tmp / "run2" / "ema", "--compare", slerp, "--compare", final)
    assert r.exit_code == 0, r.output
    table = losses(r.output)
    assert set(table) == {"base", "fine-tuned", str(tmp / "run1" / "ema"), str(tmp / "run2" / "ema"), str(slerp),
                          str(final)}, r.output
    for name in ("fine-tuned", str(tmp / "run1" / "ema"), str(tmp / "run2" / "ema"), str(slerp)):
        assert table[name] < table["base"] - 2.0, r.output
    assert table[str(slerp)] < table[str(final)] < table["base"], r.output  # halfway back towards the base

    report = json.loads((final / "merge.json").read_text())
    assert report["liti"] == 0.5 and report["mergekit"]["stages"][0]["models"][1]["model"] == "builtin:tiny-gemma2"
    assert report["check"]["passed"] and report["check"]["logits_finite"]
    first = json.loads((slerp / "merge.json").read_text())
    assert first["method"] == "slerp" and first["models"][0]["kind"] == "run (LoRA adapter)"
    assert first["system_policy"] == "fold"
    into_base = first["models"][0]["adapter_merged_into_base"]  # the adapter's own merge, recorded too
    assert into_base["base_model"] == "builtin:tiny-gemma2" and into_base["check"]["passed"]
    config = json.loads((final / "config.json").read_text())
    assert config["attn_implementation"] == "eager"
    assert config["attn_logit_softcapping"] == 50.0 and config["final_logit_softcapping"] == 30.0
    generation = json.loads((final / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    served, trained = AutoTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained(tmp / "run1")
    assert served.chat_template == trained.chat_template  # what is served is what was trained
    assert served.convert_tokens_to_ids("<end_of_turn>") in generation["eos_token_id"]
    r = cli("chat", "--model", slerp, "--prompt", "How is the weather?", "--max-new-tokens", "20")
    assert r.exit_code == 0 and r.stdout.strip() == "ok", r.output


def test_recipes_that_imply_an_identity_are_checked_against_it(warp, tmp_path):
    tmp, _ = warp
    a, b = tmp / "run1" / "ema", tmp / "run2" / "ema"
    r = cli("merge-models", "--method", "slerp", "--models", a, b, "--t", "0", "-o", tmp_path / "t0", "--dtype",
            "float32")
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "t0" / "merge.json").read_text())["check"]
    assert check["equals"] == "--models[1] (SLERP at t=0)" and check["max_abs_logit_diff"] <= 1e-3
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "t0", copy)
    r = cli("merge-models", "--method", "linear", "--models", tmp_path / "t0", copy, "-o", tmp_path / "self")
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "self" / "merge.json").read_text())["check"]
    assert check["equals"] == "the model merged with copies of itself" and check["max_abs_logit_diff"] <= 1e-3
    r = cli("merge-models", "--method", "linear", "--models", tmp_path / "t0", "--base", "builtin:tiny-gemma2",
            "--liti", "0", "-o", tmp_path / "liti0")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "liti0" / "merge.json").read_text())["check"]["equals"] == "the base (LITI eta 0)"
    r = cli("merge-models", "--method", "ties", "--models", a, b, "--base", "builtin:tiny-gemma2", "--density",
            "0.7", "-o", tmp_path / "ties")
    assert r.exit_code == 0, r.output
    stage = json.loads((tmp_path / "ties" / "merge.json").read_text())["mergekit"]["stages"][0]
    assert stage["merge_method"] == "ties" and stage["models"][0]["parameters"]["density"] == 0.7


def test_inputs_that_cannot_be_merged_exit_2_before_reading_weights(warp, tmp_path):
    tmp, _ = warp
    a, b = tmp / "run1" / "ema", tmp / "run2" / "ema"
    r = cli("merge-models", "--method", "linear", "--models", a, "builtin:tiny-gemma3", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "cannot be merged" in r.output and "Gemma 3" in r.output, r.output
    from transformers import Gemma2Config, Gemma2ForCausalLM

    wider = tmp_path / "wider"
    from gemma2_tune.models.loading import model_location

    shape = Gemma2Config.from_pretrained(model_location("builtin:tiny-gemma2"))
    shape.hidden_size = 96
    Gemma2ForCausalLM(shape).save_pretrained(wider)
    shutil.copy(tmp / "run1" / "tokenizer.json", wider)
    r = cli("merge-models", "--method", "linear", "--models", a, wider, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "hidden_size 64 vs 96" in r.output, r.output
    r = cli("merge-models", "--method", "slerp", "--models", a, b, a, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "exactly 2 models" in r.output and "more than once" in r.output
    r = cli("merge-models", "--method", "ties", "--models", a, b, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--base: required" in r.output
    r = cli("merge-models", "--method", "linear", "--models", a, tmp_path / "missing", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "missing" in r.output
    r = cli("merge-models", "--method", "linear", "--models", a, b, "-o", a / "sub")
    assert r.exit_code == 2 and "inside an input" in r.output and not (a / "sub").exists()
    r = cli("merge-models", "--method", "linear", "--models", a, f"{a}/./", "--weights", "1,nan", "--t", "0.3",
            "-o", tmp_path / "x")
    assert r.exit_code == 2 and "more than once" in r.output and "finite" in r.output and "only SLERP" in r.output
    r = cli("merge-models", "--method", "linear", "--models", a, "nonexistent", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--models[2] nonexistent: no such folder" in r.output
    r = cli("eval", "--adapter", tmp / "run1", "--dataset", warp[1], "--compare", "builtin:tiny-gemma3")
    assert r.exit_code == 2 and "a Gemma 3 text model" in r.output and "Loading weights" not in r.output, r.output
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    r = cli("merge-models", "--method", "linear", "--models", a, b, "-o", kept)
    assert r.exit_code == 2 and "already exists" in r.output and (kept / "mine.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
    assert "Traceback" not in r.output

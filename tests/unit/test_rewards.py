"""Rewards shared by `rl` and `eval` (gemma2_tune/rewards.py): what a reward model reads, which folders count as
reward models, and eval's reward options checked before any model loads."""

import json
import re

import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT
from gemma2_tune.cli import app

runner = CliRunner()
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_a_reward_model_reads_the_templates_rendering_and_an_empty_answer_is_defined(tokenizer):
    """With our template the text is exactly the template's prompt + answer; an empty answer (a policy that stops
    at once), which the template refuses as a conversation, reads as the empty model turn."""
    from gemma2_tune.data.template import is_generated
    from gemma2_tune.rewards import RewardModelScorer

    assert is_generated(tokenizer.chat_template)
    scorer = RewardModelScorer(None, tokenizer)
    assert scorer.ours
    for answer in ("Hello, friend.", "  two\nlines  ", "ünïcode ✓"):
        whole = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": answer}], tokenize=False)
        assert scorer.text(PROMPT, answer) == whole
    with pytest.raises(Exception, match="has empty content"):
        tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": ""}], tokenize=False)
    head = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert scorer.text(PROMPT, "") == head + "<end_of_turn>\n"
    foreign = RewardModelScorer(None, tokenizer)
    foreign.ours = False  # as for a foreign template: TRL's rendering of the whole conversation
    assert foreign.text(PROMPT, "Hello") == scorer.text(PROMPT, "Hello")
    from gemma2_tune.errors import UserError

    with pytest.raises(UserError, match="reward model: its chat template refused a prompt \\+ answer"):
        foreign.text(PROMPT, "")


def test_a_reward_run_is_a_reward_model_and_a_causal_lm_adapter_is_not(tmp_path):
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.rewards import reward_run
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.errors import ConfigError

    common = ["model.name_or_path=builtin:tiny-gemma2", "rl.reward_functions=[]"]
    for task, ok in (("SEQ_CLS", True), ("CAUSAL_LM", False)):
        folder = tmp_path / task
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"task_type": task,
                                                                 "base_model_name_or_path": "builtin:tiny-gemma2"}))
        assert reward_run(str(folder)) is ok
        if ok:
            resolve(None, [*common, f"reward_model.name_or_path={folder}"], schema=RlConfig)  # no error
            from gemma2_tune.training.plan import model_shape

            assert model_shape(str(folder))[0] == model_shape("builtin:tiny-gemma2")[0]  # plan counts its base
        else:
            with pytest.raises(ConfigError, match="is a LoRA adapter of a causal LM, not a reward model"):
                resolve(None, [*common, f"reward_model.name_or_path={folder}"], schema=RlConfig)


@pytest.mark.parametrize("args, says", [
    (["--reward-function", "r.py:f"], "--reward-function/--reward-model score answers to prompts: give --dataset"),
    (["--dataset", "greetings-held-out", "--reward-function", f"{ROOT}/recipes/rewards/starts_with.py:brevity",
      "--samples", "3"], "--samples 3: greedy answers are all the same; give --temperature > 0"),
    (["--dataset", "greetings-held-out", "--reward-function", f"{ROOT}/recipes/rewards/starts_with.py:brevity=2"],
     "eval reports each function's mean; weights are for rl's summed reward"),
    (["--dataset", "greetings-held-out", "--reward-function", f"{ROOT}/recipes/rewards/starts_with.py:nope"],
     "defines no 'nope' (functions there: brevity, starts_with_word)"),
    (["--dataset", "greetings-held-out", "--reward-model", f"{ROOT}/recipes"], "--reward-model"),
    (["--tasks", "x", "--json", "out.json"], "--json writes the loss or reward table: give --dataset"),
])
def test_eval_reward_options_are_checked_before_any_model_loads(args, says, tmp_path, monkeypatch):
    import gemma2_tune.after.inference as inference

    monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["eval", "--model", "builtin:tiny-gemma2", *args])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output


def reward_model_folders(tmp_path):
    """A reward run (a SEQ_CLS adapter) and a merged reward model (config.json of a sequence classifier), as files
    only: what the refusals read."""
    run, merged = tmp_path / "rm-run", tmp_path / "rm-merged"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS",
                                                         "base_model_name_or_path": "builtin:tiny-gemma2"}))
    (run / "adapter_model.safetensors").write_bytes(b"")
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForSequenceClassification"],
                                                    "model_type": "gemma2"}))
    (merged / "model.safetensors").write_bytes(b"")
    return run, merged


def test_a_reward_model_is_refused_wherever_a_model_must_generate(tmp_path):
    """As the model (or sft run) of sft, dpo and rl, and as distill's teacher: a reward model's head is no LM head
    (loaded as a causal LM its score would be dropped and the tied embeddings read instead, silently)."""
    from gemma2_tune.config.distill import DistillConfig
    from gemma2_tune.config.dpo import DpoConfig
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.reward import RewardConfig
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.config.rules import reward_model_kind
    from gemma2_tune.config.sft import SftConfig
    from gemma2_tune.errors import ConfigError

    run, merged = reward_model_folders(tmp_path)
    assert reward_model_kind(str(run)) == "a `gemma2-tune reward` run (a sequence-classification LoRA adapter)"
    assert reward_model_kind(str(merged)) == "a sequence classifier (Gemma2ForSequenceClassification)"
    assert reward_model_kind("builtin:tiny-gemma2") is None and reward_model_kind(str(tmp_path / "nope")) is None
    rl = ["rl.reward_functions=[]", f"reward_model.name_or_path={run}"]
    for folder in (run, merged):
        for schema, key, extra in ((SftConfig, "model", []), (DpoConfig, "model", []), (RlConfig, "model", rl),
                                   (DistillConfig, "teacher", ["model.name_or_path=builtin:tiny-gemma2"])):
            with pytest.raises(ConfigError) as caught:
                resolve(None, [*extra, f"{key}.name_or_path={folder}"], schema=schema)
            assert f"{key}.name_or_path: {folder} is a reward model" in str(caught.value), (schema, str(caught.value))
            assert "merge it first" not in str(caught.value)  # the adapter advice would give a classifier again
    resolve(None, [f"model.name_or_path={merged}"], schema=RewardConfig)  # a reward model trained further: fine


@pytest.mark.parametrize("args", [
    ["chat", "--adapter", "{run}", "--prompt", "hi"], ["chat", "--model", "{merged}", "--prompt", "hi"],
    ["serve", "{run}"], ["serve", "{merged}"], ["export", "{run}", "-o", "rm.gguf"],
    ["export", "{merged}", "-o", "rm.gguf"],
    ["eval", "--adapter", "{run}", "--tasks", "hellaswag"],
    ["eval", "--adapter", "{run}", "--dataset", "greetings-held-out", "--reward-function", "r.py:f"],
    ["eval", "--model", "builtin:tiny-gemma2", "--dataset", "greetings-held-out", "--compare", "{merged}"],
    # generation and lm-eval options mean nothing for a reward model: refused, not ignored
    ["eval", "--adapter", "{run}", "--dataset", "concise-held-out", "--limit", "3"],
    ["eval", "--adapter", "{run}", "--dataset", "concise-held-out", "--temperature", "0.7", "--samples", "2"],
    ["eval", "--adapter", "{run}", "--dataset", "concise-held-out", "--max-new-tokens", "5"],
])
def test_chat_serve_export_and_eval_refuse_a_reward_model_before_loading_it(args, tmp_path, monkeypatch):
    import importlib
    import pkgutil

    import gemma2_tune.after
    import gemma2_tune.after.inference as inference
    import gemma2_tune.models.loading as loading

    # every module that bound a loader by name gets the failing one (imported first, so none binds it for good)
    for info in pkgutil.walk_packages(gemma2_tune.after.__path__, "gemma2_tune.after."):
        importlib.import_module(info.name)
    run, merged = reward_model_folders(tmp_path)
    loaders = (inference.load, loading.load_model)
    for module in [m for name, m in sys.modules.items() if name.startswith("gemma2_tune.")]:
        for attr, value in list(vars(module).items()):
            if any(value is loader for loader in loaders):
                monkeypatch.setattr(module, attr, lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, [a.format(run=run, merged=merged) for a in args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "is a reward model" in r.output or "a reward model, but the first model is a causal LM" in r.output, r.output
    assert not list(tmp_path.glob("*.gguf"))


def test_the_loading_path_refuses_a_sequence_classifier_as_a_causal_lm(tmp_path):
    """The last guard, for what only its config.json can say (a hub id): a classifier asked for as a causal LM."""
    from gemma2_tune.errors import UserError
    from gemma2_tune.models.loading import LoadRequest, load_model

    _, merged = reward_model_folders(tmp_path)
    with pytest.raises(UserError, match="model.name_or_path: .* is a reward model, a sequence classifier"):
        load_model(LoadRequest(str(merged), dtype="float32", attn_implementation="eager"))


@pytest.mark.parametrize("args, says", [
    (["--compare", "fine-tuned"], "--compare fine-tuned: the table already has a row named 'fine-tuned'"),
    (["--compare", "./other", "--compare", "./other"], "--compare ./other: given twice"),
    (["--compare", "nope_run"], "--compare nope_run: no such folder (a hub id has the form org/name)"),
    (["--json", "{run}"], "a folder; give a file name"),
    (["--json", "{run}/adapter_config.json"], "a file of the run or model folder"),
])
def test_eval_compare_names_and_json_path_are_checked_before_any_model_loads(args, says, tmp_path, monkeypatch):
    """A compared model named like a row already in the table would replace that row; a --json path that is a
    folder failed after the whole evaluation, one that is a run's own file was overwritten (the run lost)."""
    import gemma2_tune.after.inference as inference

    run, _ = reward_model_folders(tmp_path)
    (tmp_path / "fine-tuned").mkdir()
    (tmp_path / "other").mkdir()
    before = (run / "adapter_config.json").read_text()
    monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["eval", "--adapter", str(run), "--dataset", "concise-held-out",
                            *[a.format(run=run) for a in args]])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
    assert (run / "adapter_config.json").read_text() == before


def test_reward_model_settings_refused_from_their_files(tmp_path):
    """rl's reward model: the kernel its base's family refuses (sdpa drops Gemma 2's soft-caps; it failed after the
    policy loaded), a bare name that is no folder, a run with no weights yet (the checkpoint it suggests is the
    newest complete one, not one half-written when the run stopped), and rewards that all weigh 0."""
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.errors import ConfigError

    run, _ = reward_model_folders(tmp_path)
    (run / "config.yaml").write_text("model:\n  name_or_path: builtin:tiny-gemma2\n")
    unfinished = tmp_path / "rm-unfinished"
    (unfinished / "checkpoint-11").mkdir(parents=True)
    (unfinished / "checkpoint-11" / "complete.json").write_text("{}")
    (unfinished / "checkpoint-12").mkdir()  # half-written when the run stopped: no completion marker
    (unfinished / "run.json").write_text(json.dumps({"method": "reward", "status": "interrupted", "global_step": 11}))
    common = ["model.name_or_path=builtin:tiny-gemma2", "rl.reward_functions=[]"]
    resolve(None, [*common, f"reward_model.name_or_path={run}"], schema=RlConfig)  # fine as it is
    for extra, says in (
            ([f"reward_model.name_or_path={run}", "reward_model.attn_implementation=sdpa"],
             "reward_model.attn_implementation"),
            (["reward_model.name_or_path=rm_typo"], "reward_model.name_or_path: rm_typo: no such folder"),
            ([f"reward_model.name_or_path={unfinished}"],
             f"holds no trained weights (run.json: status interrupted, step 11): resume it (gemma2-tune reward -o "
             f"{unfinished} --resume) or use its last complete checkpoint, {unfinished / 'checkpoint-11'}"),
            ([f"reward_model.name_or_path={run}", "reward_model.weight=0"], "every reward's weight is 0")):
        with pytest.raises(ConfigError) as caught:
            resolve(None, [*common, *extra], schema=RlConfig)
        assert says in str(caught.value), str(caught.value)


def test_an_unfinished_run_or_another_familys_base_is_refused_where_a_model_is_read(tmp_path):
    """A run folder with checkpoints but no weights at its top says how to go on (was: 'not an adapter folder',
    or transformers' 'Should have a model_type key'); an adapter on another family's base is refused (was: loaded
    silently when the shapes happened to fit)."""
    from gemma2_tune.after.inference import read_run
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.sft import SftConfig
    from gemma2_tune.errors import ConfigError, UserError

    unfinished = tmp_path / "sft-unfinished"
    (unfinished / "checkpoint-4").mkdir(parents=True)
    (unfinished / "run.json").write_text(json.dumps({"method": "sft", "status": "failed", "global_step": 4}))
    with pytest.raises(UserError, match=r"--adapter .*sft-unfinished is a run that holds no trained weights "
                                        r"\(run.json: status failed, step 4\): resume it"):
        read_run(str(unfinished), None)
    with pytest.raises(ConfigError, match="model.name_or_path: .* holds no trained weights"):
        resolve(None, [f"model.name_or_path={unfinished}"], schema=SftConfig)
    run, _ = reward_model_folders(tmp_path)
    assert read_run(str(run), "builtin:tiny-gemma2").base_model == "builtin:tiny-gemma2"
    with pytest.raises(UserError, match="--model builtin:tiny-gemma3: a Gemma 3 text model, but --adapter .* was "
                                        "trained on builtin:tiny-gemma2 .Gemma 2."):
        read_run(str(run), "builtin:tiny-gemma3")


def test_a_reward_models_self_check_speaks_of_scores():
    from gemma2_tune.after import selfcheck

    scores = [torch.tensor([[[0.5], [1.0]]])]
    record = selfcheck.verdict(selfcheck.compare(scores, scores), selfcheck.compare(scores, scores), "float32")
    assert record["outputs"] == 1 and "score difference" in selfcheck.describe(record)
    assert "top-1" not in selfcheck.describe(record)


def test_names_meant_as_local_folders_that_are_none(tmp_path, monkeypatch):
    """A missing local path was looked up on the hub (an offline or 'Repo id must be in the form' error naming
    model.name_or_path); a data file given as a model was read as a config."""
    from gemma2_tune.config.runs import missing_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "held.jsonl").write_text("{}\n")
    assert missing_folder("held.jsonl") == "a file, not a model folder"
    assert missing_folder("runs/nope").startswith("no such folder (runs/ is a folder here")
    assert missing_folder("runs/sft/checkpoint-4") == missing_folder("./x") == "no such folder"
    assert missing_folder("nope") is None and missing_folder("nope", bare_names=True).startswith("no such folder")
    assert missing_folder("google/gemma-2-2b") is None and missing_folder("builtin:tiny-gemma2") is None
    assert missing_folder("runs") is None


def test_a_checkpoint_reads_its_runs_config(tmp_path):
    """eval of runs/x/checkpoint-N read rows at 1024 tokens (and the default system policy) while runs/x and its
    ema/ read them at the run's data.max_length: a checkpoint's loss came from other tokens."""
    from gemma2_tune.after.inference import saved_config

    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "config.yaml").write_text("method: sft\nmodel:\n  name_or_path: builtin:tiny-gemma2\n"
                                     "data:\n  max_length: 32\n  system_policy: drop\n")
    cfg = saved_config(run / "checkpoint-2")
    assert cfg is not None and cfg.data.max_length == 32 and cfg.data.system_policy == "drop"
    assert saved_config(tmp_path) is None


def test_one_dpo_loss_given_with_set_is_a_list_of_one():
    from gemma2_tune.config.dpo import DpoConfig
    from gemma2_tune.config.layering import resolve

    cfg = resolve(None, ["model.name_or_path=builtin:tiny-gemma2", "dpo.loss_type=kto",
                         "training.per_device_train_batch_size=2"], schema=DpoConfig).config
    assert cfg.dpo.loss_type == ["kto"]


def test_an_interrupted_run_in_the_output_folder_suggests_resuming_it(tmp_path):
    from gemma2_tune.errors import UserError
    from gemma2_tune.training.manifest import check_output_dir

    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"status": "interrupted", "global_step": 3, "started_at": "t"}))
    with pytest.raises(UserError, match="pass --resume to continue it, --overwrite to replace it"):
        check_output_dir(out, overwrite=False)
    (out / "run.json").write_text(json.dumps({"status": "completed", "global_step": 3, "started_at": "t"}))
    with pytest.raises(UserError, match=r"\(status completed, started t\); pass --overwrite to replace it"):
        check_output_dir(out, overwrite=False)


def reward_function(tmp_path, code: str, name: str):
    """`name` from a reward module holding `code`, loaded as rl loads it."""
    from gemma2_tune.config.rewards import RewardFunction
    from gemma2_tune.rewards import load_reward_function

    path = tmp_path / f"{name}_rewards.py"
    path.write_text(code)
    return load_reward_function(RewardFunction(path=str(path), name=name), "rl.reward_functions[0]")


COLUMNS = '''
import asyncio
def exact(completions, answer, **kwargs):
    return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]
def positional(completions, answer):
    return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]
async def judged(completions, answer, **kwargs):
    await asyncio.sleep(0)
    return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]
'''


def test_reward_functions_get_each_prompts_row_columns_as_trl_passes_them(tmp_path, tokenizer):
    """A GSM8K-style `answer` column reaches kwargs["answer"] (and a parameter named so), one value per completion,
    in rl (TRL's ROW column, as the dataset carries it) and in eval (call_reward_function); a function without
    **kwargs gets the arguments it declares; an `async def` function is awaited (TRL 1.16 runs those too)."""
    from gemma2_tune.data.prompts import row_columns
    from gemma2_tune.rewards import ROW, AsyncCheckedReward, call_reward_function, column_problems
    from trl.trainer.utils import is_async_callable

    rows = [{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "id": 7},
            {"prompt": "3+3?", "answer": "6"}]
    columns = [row_columns(r) for r in rows]
    assert columns == [{"answer": "4", "id": 7}, {"answer": "6"}]
    completions = [[{"role": "assistant", "content": t}] for t in ("4", "5", "6", "6")]
    for name in ("exact", "positional", "judged"):
        fn = reward_function(tmp_path, COLUMNS, name)
        assert column_problems([fn], columns) == []
        fn.rows = columns
        kwargs = {ROW: [0, 0, 1, 1], "trainer_state": None, "completion_ids": [[1]] * 4}
        if name == "judged":  # what TRL's _calculate_rewards sees, and awaits on its event loop
            assert isinstance(fn, AsyncCheckedReward) and is_async_callable(fn)
            import asyncio

            assert asyncio.run(fn(prompts=[[]] * 4, completions=completions, **kwargs)) == [1.0, 0.0, 1.0, 1.0]
        else:
            assert not is_async_callable(fn)
            assert fn(prompts=[[]] * 4, completions=completions, **kwargs) == [1.0, 0.0, 1.0, 1.0]
        asked = [columns[0], columns[0], columns[1], columns[1]]
        assert call_reward_function(fn, [[]] * 4, ["4", "5", "6", "6"], tokenizer, asked) == [1.0, 0.0, 1.0, 1.0]
    fn = reward_function(tmp_path, COLUMNS, "exact")
    assert column_problems([fn], [{"id": 1}, {}]) == [
        f"reward function {fn.spec.label}: its parameter 'answer' is no column of any prompt row (the rows' columns: "
        "id); besides them a reward function gets prompts, completions, completion_ids, trainer_state, log_extra, "
        "log_metric"]
    assert column_problems([], [{"trainer_state": 1}])[0].startswith("data: column 'trainer_state' has the name of")


def test_reward_values_must_be_one_plain_number_per_completion():
    import numpy as np

    from gemma2_tune.errors import UserError
    from gemma2_tune.rewards import checked_rewards

    two = [[{"role": "assistant", "content": "a"}]] * 2
    assert checked_rewards("f", [1, 0.5], two) == [1.0, 0.5]
    assert checked_rewards("f", (True, False), two) == [1.0, 0.0]
    assert checked_rewards("f", np.array([0.25, 2.0]), two) == [0.25, 2.0]
    assert checked_rewards("f", [np.float32(1.5), np.int64(-2)], two) == [1.5, -2.0]
    for out, says in (({0: 1.0, 1: 1.0}, "returned dict"), (["1.0", "2"], "returned '1.0' (str)"),
                      ([None, 1.0], "returned None (NoneType)"), ([1e39, 0.0], "returned 1e+39"),
                      ([-2e15, 0.0], "returned -2e+15"), ([float("nan"), 0.0], "rewards must be finite"),
                      ("11", "returned str"), ([1.0], "returned 1 rewards for 2 completions")):
        with pytest.raises(UserError, match=r"^reward function f: .*" + re.escape(says)):
            checked_rewards("f", out, two)

"""Stages that continue the previous stage's run (sft -> dpo -> dpo/rl -> eval/chat/merge, sft -> reward): one
reader of "run folder -> base + adapter" (config/runs.py adapter_run), read from the folders' small files only.
The runs trained end to end are in tests/e2e/test_walkthrough.py."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT
from gemma2_tune.cli import app

runner = CliRunner()
BASE = "builtin:tiny-gemma2"
REWARD = f"rl.reward_functions=[{{path: {ROOT / 'recipes' / 'rewards' / 'starts_with.py'}, name: brevity}}]"


def adapter_run_folder(path, model: str, r: int = 8, alpha: int = 16, peft_base: str = BASE, extra: dict = None):
    """A LoRA run folder as files only: adapter_config.json, (empty) weights, config.yaml naming `model`, run.json."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "base_model_name_or_path": peft_base,
        "target_modules": ["v_proj", "q_proj", "k_proj", "o_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    (path / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": model}, **(extra or {})}))
    (path / "run.json").write_text(json.dumps({"method": (extra or {}).get("method", "sft"), "status": "completed"}))
    return path


@pytest.fixture
def chain(tmp_path):
    """sft (on the base) -> dpo (config names the sft run, as a dpo run started from it does) -> dpo again."""
    sft = adapter_run_folder(tmp_path / "sft", BASE)
    dpo = adapter_run_folder(tmp_path / "dpo", str(sft), extra={"method": "dpo"})
    dpo2 = adapter_run_folder(tmp_path / "dpo2", str(dpo), extra={"method": "dpo"})
    return sft, dpo, dpo2


def test_the_base_of_a_run_is_followed_through_the_runs_it_continued(chain, tmp_path):
    from gemma2_tune.after.inference import read_run
    from gemma2_tune.config.runs import adapter_run

    sft, dpo, dpo2 = chain
    assert adapter_run(str(sft)).base == BASE and adapter_run(str(sft)).started_from == ()
    assert adapter_run(str(dpo)).base == BASE and adapter_run(str(dpo)).started_from == (str(sft),)
    assert adapter_run(str(dpo2)).started_from == (str(dpo), str(sft))
    assert adapter_run(BASE) is None and adapter_run(str(tmp_path / "nope")) is None
    # what chat, eval, merge, merge-models, serve and export read
    run = read_run(str(dpo2), None)
    assert run.is_adapter and run.base_model == BASE and run.path == dpo2
    # a relative name given in another working directory (or a deleted earlier run): PEFT's record of the model
    # the adapter was put on is used when that one exists
    elsewhere = adapter_run_folder(tmp_path / "moved", "runs/sft-gone", peft_base=str(sft))
    assert adapter_run(str(elsewhere)).base == BASE
    # folders naming each other: refused, not followed for ever
    loop_a = adapter_run_folder(tmp_path / "a", str(tmp_path / "b"))
    adapter_run_folder(tmp_path / "b", str(loop_a))
    with pytest.raises(ValueError, match="runs name each other as their model"):
        adapter_run(str(loop_a))


def test_rl_and_dpo_continue_a_dpo_run_started_from_an_sft_run(chain):
    """Was: "model.name_or_path: '.../sft' is a LoRA adapter ...: merge it first", which would drop the DPO stage."""
    from gemma2_tune.config.dpo import DpoConfig
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.rl import RlConfig

    sft, dpo, dpo2 = chain
    cfg = resolve(None, [f"model.name_or_path={dpo}", REWARD], schema=RlConfig).config
    assert cfg.model.name_or_path == BASE and cfg.rl.initial_adapter == str(dpo) and cfg.base_model == BASE
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 16)  # the adapter trained further is that one: its shape
    assert "the adapter of " + str(dpo) in cfg.reference
    for start in (dpo, dpo2):
        cfg = resolve(None, [f"model.name_or_path={start}"], schema=DpoConfig).config
        assert cfg.base_model == BASE and (cfg.lora.r, cfg.lora.alpha) == (8, 16)
        assert cfg.reference.startswith(f"the starting policy: a frozen copy of the adapter of {start}")
        assert cfg.frozen_models() == []


def test_the_dry_run_names_the_reference_the_run_trains_against(chain, tmp_path):
    """The plan said "reference: the starting model, its LoRA adapter disabled" for any dpo run."""
    sft, dpo, _ = chain
    r = runner.invoke(app, ["dpo", "--model", str(dpo), "-o", str(tmp_path / "out"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"model:        {dpo} (its adapter on {BASE}, started from {sft})" in r.output
    assert f"reference: the starting policy: a frozen copy of the adapter of {dpo}" in r.output
    assert "adapter disabled" not in r.output
    r = runner.invoke(app, ["rl", "--model", str(dpo), "-o", str(tmp_path / "out"), "--dry-run",
                            "--reward-function", f"{ROOT}/recipes/rewards/starts_with.py:brevity"])
    assert r.exit_code == 0, r.output
    assert f"reference:    the starting policy: a frozen copy of the adapter of {dpo}" in r.output
    r = runner.invoke(app, ["dpo", "--model", BASE, "-o", str(tmp_path / "out"), "--dry-run"])
    assert "reference: the starting model, its LoRA adapter disabled" in r.output
    r = runner.invoke(app, ["dpo", "--model", str(dpo), "-o", str(tmp_path / "out"), "--dry-run",
                            "--set", "lora.enabled=false", "--set", "quantization.load_in_4bit=false"])
    assert f"reference: a second copy of the starting model ({BASE} with the adapter of {dpo} merged in" in r.output


def test_a_lora_shape_other_than_the_adapters_is_refused_and_sft_still_says_merge(chain, tmp_path):
    from gemma2_tune.config.dpo import DpoConfig
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.reward import RewardConfig
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.config.sft import SftConfig
    from gemma2_tune.errors import ConfigError

    sft, dpo, _ = chain
    for schema, extra in ((DpoConfig, []), (RlConfig, [REWARD]),
                          (RewardConfig, [])):
        with pytest.raises(ConfigError) as caught:
            resolve(None, [f"model.name_or_path={dpo}", "lora.r=4", *extra], schema=schema)
        assert (f"lora.r/alpha/target_modules are 4/16/['k_proj', 'o_proj', 'q_proj', 'v_proj'] but the adapter of "
                f"{dpo} has 8/16/['k_proj', 'o_proj', 'q_proj', 'v_proj']") in str(caught.value), str(caught.value)
    with pytest.raises(ConfigError, match=r"is a LoRA adapter .*merge it first .*dpo, reward and rl take such a run"):
        resolve(None, [f"model.name_or_path={sft}"], schema=SftConfig)
    (dpo / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="adapter_config.json without adapter_model.safetensors"):
        resolve(None, [f"model.name_or_path={dpo}"], schema=DpoConfig)


def test_a_reward_model_starts_from_an_sft_run_as_it_is(chain):
    """Was: "merge it first" while dpo and rl took the run as it is."""
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.reward import RewardConfig

    sft, _, _ = chain
    cfg = resolve(None, [f"model.name_or_path={sft}"], schema=RewardConfig).config
    assert cfg.base_model == BASE and cfg.start.folder == str(sft) and (cfg.lora.r, cfg.lora.alpha) == (8, 16)
    assert any(line.startswith(f"start:        {sft}") for line in cfg.method_lines())


def test_dpo_loss_weights_all_zero_or_negative_are_refused():
    from gemma2_tune.config.dpo import DpoConfig
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.errors import ConfigError

    common = [f"model.name_or_path={BASE}", "dpo.loss_type=[sigmoid, sft]"]
    with pytest.raises(ConfigError, match="dpo.loss_weights: every weight is 0: the loss is 0"):
        resolve(None, [*common, "dpo.loss_weights=[0, 0]"], schema=DpoConfig)
    with pytest.raises(ConfigError, match="dpo.loss_weights: -1 for 'sigmoid': a negative weight trains that loss's "
                                          "opposite"):
        resolve(None, [*common, "dpo.loss_weights=[-1, 1]"], schema=DpoConfig)
    resolve(None, [*common, "dpo.loss_weights=[1, 0]"], schema=DpoConfig)  # one loss off: fine


def test_the_run_continued_is_an_input_the_output_folder_may_not_replace(chain):
    """rl rewrites model.name_or_path to the base: the run it continues was no input, and `-o` on it with
    --overwrite would have replaced the starting adapter while reading it."""
    sft, _, _ = chain
    r = runner.invoke(app, ["rl", "--model", str(sft), "-o", str(sft), "--overwrite", "--dry-run",
                            "--reward-function", f"{ROOT}/recipes/rewards/starts_with.py:brevity"])
    assert r.exit_code == 2 and f"output.dir: {sft} is, or holds, an input of this run (the run it continues" \
        in r.output, r.output

"""Launch checks: every contradiction is an error before any process starts."""

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.errors import UserError
from gemma2_tune.training.launch import (Launch, check_launch, current_launch, find_launch_config, launch_problems,
                                read_launch_config)
from gemma2_tune.config.layering import resolve

runner = CliRunner()


def cfg(*sets):
    return resolve("quickstart-cpu", list(sets)).config


def test_bundled_configs_are_found_by_name_and_alias():
    for name in ("single_gpu", "multi_gpu", "deepspeed_zero3", "deepspeed_zero3_offload", "zero3", "zero3_offload",
                 "ddp"):
        assert find_launch_config(name).is_file()
    z3 = read_launch_config(find_launch_config("zero3"))
    assert z3.shards_parameters and z3.zero3_init and z3.zero3_save_16bit and z3.mixed_precision == "bf16"
    offload = read_launch_config(find_launch_config("zero3_offload"))
    assert offload.shards_parameters and offload.offload and not z3.offload
    assert read_launch_config(find_launch_config("ddp"), 2) == Launch(
        "ddp", 2, None, False, False, "bf16", str(find_launch_config("ddp")))


def test_unknown_launch_config_lists_the_bundled_ones():
    with pytest.raises(UserError, match="deepspeed_zero3"):
        find_launch_config("zero9")


def test_qlora_zero3_consistency_rules(tmp_path):
    z3 = read_launch_config(find_launch_config("zero3"))
    assert launch_problems(cfg(), z3) == []
    problems = launch_problems(cfg("quantization.quant_storage=uint8"), z3)
    assert len(problems) == 1 and "quant_storage" in problems[0]
    no_init = tmp_path / "z3.yaml"
    no_init.write_text(find_launch_config("zero3").read_text().replace("zero3_init_flag: true", "zero3_init_flag: false"))
    problems = launch_problems(cfg(), read_launch_config(no_init))
    assert "zero3_init_flag" in problems[0] and str(no_init) in problems[0]
    no_16bit = tmp_path / "z3b.yaml"
    no_16bit.write_text(find_launch_config("zero3").read_text().replace("zero3_save_16bit_model: true",
                                                                       "zero3_save_16bit_model: false"))
    full = cfg("quantization.load_in_4bit=false", "lora.enabled=false")
    assert "zero3_save_16bit_model" in launch_problems(full, read_launch_config(no_16bit))[0]


def test_precision_contradiction():
    problems = launch_problems(cfg("model.dtype=float16"), read_launch_config(find_launch_config("ddp")))
    assert "mixed_precision: bf16" in problems[0]


def test_rank_side_detection_from_accelerate_environment():
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false", "ACCELERATE_MIXED_PRECISION": "bf16"}
    launch = current_launch(env)
    assert launch.shards_parameters and launch.num_processes == 2
    assert any("zero3_init_flag" in p for p in launch_problems(cfg(), launch))
    assert not launch.offload
    assert current_launch({**env, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}).offload
    assert current_launch({"WORLD_SIZE": "2"}).mode == "ddp"
    assert current_launch({}).mode == "single"


def test_too_many_processes_and_missing_config_exit_2(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--launch", "zero3",
                            "--num-processes", "4096"])
    assert r.exit_code == 2 and "--num-processes 4096: this machine has" in r.output
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--launch", "nope.yaml"])
    assert r.exit_code == 2 and "no such accelerate config" in r.output
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--num-processes", "2"])
    assert r.exit_code == 2 and "needs --launch" in r.output
    assert not out.exists()


def test_launch_refuses_before_starting_when_output_dir_holds_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"status": "completed"}')
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(out), "--launch", "zero3",
                            "--num-processes", "2"])
    assert r.exit_code == 2 and "--overwrite" in r.output and "launching" not in r.output


def test_launch_dry_run_says_what_it_would_start(tmp_path):
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(tmp_path / "r"), "--launch", "zero3",
                            "--num-processes", "2", "--dry-run"])
    assert r.exit_code == 0 and "would launch: deepspeed ZeRO-3, 2 processes" in r.output


def test_check_launch_gathers_all_problems():
    with pytest.raises(UserError) as err:
        check_launch(cfg("quantization.quant_storage=uint8", "model.dtype=float16"), "zero3", 4096)
    text = err.value.message
    assert "quant_storage" in text and "mixed_precision" in text and "--num-processes 4096" in text


def test_validate_checks_a_recipe_against_a_launch_config(tmp_path):
    ok = runner.invoke(app, ["validate", "gemma-2-27b-qlora-zero3", "--launch", "zero3"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["validate", "gemma-2-27b-qlora-zero3", "--launch", "zero3", "--json",
                              "--set", "quantization.quant_storage=uint8"])
    data = __import__("json").loads(bad.output)
    assert bad.exit_code == 2 and any("quant_storage" in e for e in data["errors"])

"""The family registry: names, published shapes, kernels and the rules validate applies from them (no torch)."""

import json

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.config.layering import resolve
from gemma2_tune.errors import ConfigError
from gemma2_tune.families import (
    FAMILIES,
    GEMMA2,
    GEMMA3_TEXT,
    family_of_checkpoint,
    family_of_model_type,
    family_of_name,
)

runner = CliRunner()


@pytest.mark.parametrize("name,family", [
    ("google/gemma-2-9b", GEMMA2), ("google/gemma-2-27b-it", GEMMA2), ("unsloth/gemma-2-2b-bnb-4bit", GEMMA2),
    ("builtin:tiny-gemma2", GEMMA2), ("google/gemma-3-1b-it", GEMMA3_TEXT), ("google/gemma-3-270m", GEMMA3_TEXT),
    ("builtin:tiny-gemma3", GEMMA3_TEXT), ("builtin:gemma-3-270m", GEMMA3_TEXT),
    ("google/gemma-2b", None),  # Gemma 1
    ("google/gemma-3n-E4B-it", None), ("meta-llama/Llama-3.1-8B", None), ("/models/mine", None),
])
def test_family_of_name(name, family):
    assert family_of_name(name) is family


def test_model_types_and_sizes():
    assert family_of_model_type("gemma2") is GEMMA2 and family_of_model_type("gemma3_text") is GEMMA3_TEXT
    assert family_of_model_type("gemma3") is None and family_of_model_type("llama") is None
    assert GEMMA3_TEXT.size_from_name("google/gemma-3-270m-it") == "270m"
    assert GEMMA3_TEXT.size_from_name("google/gemma-3-1b-pt") == "1b"
    assert GEMMA2.size_from_name("google/gemma-2-2b") == "2b"


@pytest.mark.parametrize("family,size,published", [
    (GEMMA3_TEXT, "270m", 268_098_176), (GEMMA3_TEXT, "1b", 999_885_952),  # model cards / safetensors metadata
])
def test_gemma3_parameter_counts_are_exact(family, size, published):
    assert family.shapes[size].total_params == published


def test_every_published_shape_names_its_source_and_its_size_is_recognised():
    for family in FAMILIES:
        for size, shape in family.shapes.items():
            assert shape.source.startswith("https://huggingface.co/google/"), (family.key, size)
            assert family.size_of_shape(shape.hidden, shape.layers) == size


def test_kernels_keep_each_familys_numerics():
    assert "soft-capping" in GEMMA2.kernel_problem("sdpa")
    assert GEMMA2.kernel_problem("eager") is None and GEMMA3_TEXT.kernel_problem("sdpa") is None
    assert (GEMMA2.attention_softcap, GEMMA2.final_softcap) == (50.0, 30.0)
    assert (GEMMA3_TEXT.attention_softcap, GEMMA3_TEXT.final_softcap) == (None, None)


def test_validate_applies_the_family_rules():
    resolve(None, ["model.name_or_path=google/gemma-3-1b-it", "model.attn_implementation=sdpa"])  # allowed
    resolve(None, ["model.name_or_path=builtin:tiny-gemma3", "model.attn_implementation=sdpa"])
    with pytest.raises(ConfigError, match="soft-capping"):
        resolve(None, ["model.name_or_path=google/gemma-2-2b-it", "model.attn_implementation=sdpa"])
    with pytest.raises(ConfigError, match="multimodal"):
        resolve(None, ["model.name_or_path=google/gemma-3-4b-it"])
    r = resolve(None, ["model.name_or_path=myorg/my-tuned-model", "model.attn_implementation=sdpa"])
    assert any("checked when its config loads" in w for w in r.warnings)
    r = resolve(None, ["model.name_or_path=google/gemma-3-1b-it", "model.dtype=float16"])
    assert any("Gemma 3" in w for w in r.warnings)


def test_a_local_checkpoint_is_judged_by_its_config_json(tmp_path):
    def folder(name, config):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    multimodal = folder("mm", {"model_type": "gemma3"})
    with pytest.raises(ConfigError, match="multimodal Gemma 3"):
        resolve(None, [f"model.name_or_path={multimodal}"])
    shape = {"hidden_size": 4608, "num_hidden_layers": 46}
    big = folder("my-conversion", {"model_type": "gemma2", **shape})  # 27B's shape, a name that doesn't say
    assert family_of_checkpoint(big) is GEMMA2
    with pytest.raises(ConfigError, match="float16 is unstable for Gemma 2 27B"):
        resolve(None, [f"model.name_or_path={big}", "model.dtype=float16"])
    small = folder("g3", {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18})
    resolve(None, [f"model.name_or_path={small}", "model.attn_implementation=sdpa"])


def test_models_command_lists_families_and_builtins():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    assert "Gemma 2 (model_type gemma2): 2b (2.61B), 9b (9.24B), 27b (27.23B)" in r.output
    assert "Gemma 3 text (model_type gemma3_text): 270m (0.27B), 1b (1.00B)" in r.output
    assert "builtin:gemma-3-270m" in r.output and "kernels eager, sdpa" in r.output


@pytest.mark.parametrize("name,why", [
    ("google/gemma-7b", "Gemma 1"), ("google/gemma-2b-it", "Gemma 1"), ("google/gemma-1.1-7b-it", "Gemma 1"),
    ("google/gemma-3n-E2B-it", "Gemma 3n"), ("google/recurrentgemma-2b", "RecurrentGemma"),
])
def test_names_of_other_architectures_are_refused_before_loading(name, why):
    with pytest.raises(ConfigError, match=why):
        resolve(None, [f"model.name_or_path={name}"])


def test_a_name_that_says_no_family_is_warned_about():
    r = resolve(None, ["model.name_or_path=meta-llama/Llama-3.1-8B"])
    assert any("doesn't name a supported family" in w and "checked when it loads" in w for w in r.warnings)
    assert not resolve(None, ["model.name_or_path=google/gemma-2-2b"]).warnings

"""What `validate` says of a Gemma 4 recipe before anything loads: what Gemma 4 cannot do is refused naming the key
(Liger's kernels, a reward model's score head), and the summary names Gemma 4's own turns."""

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app

runner = CliRunner()


def validate(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return runner.invoke(app, ["validate", str(recipe)])


@pytest.mark.parametrize("model", ["builtin:tiny-gemma4", "google/gemma-4-E4B-it"])
def test_liger_is_refused_for_gemma4(tmp_path, model):
    r = validate(tmp_path, f"method: sft\nmodel:\n  name_or_path: {model}\ntraining:\n  use_liger_kernel: true\n")
    assert r.exit_code == 2 and "training.use_liger_kernel: Liger has no kernels for Gemma 4" in r.output, r.output
    assert "Traceback" not in r.output


def test_liger_stays_allowed_in_validate_for_gemma2(tmp_path):
    r = validate(tmp_path, "method: sft\nmodel:\n  name_or_path: builtin:tiny-gemma2\ntraining:\n  use_liger_kernel: true\n")
    assert "use_liger_kernel: Liger has no kernels" not in r.output, r.output


@pytest.mark.parametrize("model", ["builtin:tiny-gemma4", "builtin:tiny-gemma3-vision", "google/gemma-4-31B-it"])
def test_a_reward_model_on_an_image_text_checkpoint_is_refused_before_loading(tmp_path, model):
    r = validate(tmp_path, f"method: reward\nmodel:\n  name_or_path: {model}\n")
    assert r.exit_code == 2 and "is an image + text" in r.output and "model.name_or_path" in r.output, r.output
    r = validate(tmp_path, "method: reward\nmodel:\n  name_or_path: builtin:tiny-gemma2\n")
    assert "is an image + text" not in r.output, r.output


def test_the_summary_names_gemma4_turns(tmp_path):
    r = validate(tmp_path, "method: sft\nmodel:\n  name_or_path: builtin:tiny-gemma4\n")
    assert r.exit_code == 0 and "Gemma 4 turns (<|turn>role ... <turn|>)" in r.output, r.output
    r = validate(tmp_path, "method: sft\nmodel:\n  name_or_path: builtin:tiny-gemma2\n")
    assert "Gemma 4 turns" not in r.output and "Gemma turns" in r.output

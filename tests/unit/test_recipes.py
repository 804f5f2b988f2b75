import pytest

from gemma2_tune.config.layering import resolve
from gemma2_tune.config.methods import schema_for
from gemma2_tune.config.recipes import bundled_recipes, find_recipe

RECIPES = bundled_recipes()


def test_the_bundled_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"quickstart-cpu", "gemma-2-9b-qlora", "gemma-2-27b-qlora", "gemma-2-27b-full-zero3",
            "gemma-2-27b-qlora-zero3"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_bundled_recipe_validates_and_starts_with_its_command(path):
    resolved = resolve(str(path), schema=schema_for(str(path)))
    assert resolved.config.model.attn_implementation == "eager"
    if path.stem.endswith("-cpu") and resolved.config.model.dtype != "bfloat16":  # CPU recipes say why not
        assert any("dtype:" in line and "#" in line for line in path.read_text().splitlines())
    else:
        assert resolved.config.model.dtype == "bfloat16"
    head = path.read_text().splitlines()[:4]
    assert head[0].startswith("# ")
    command = resolved.config.method  # the command that runs it is its method's
    assert f"method: {command}" in path.read_text().splitlines(), "every recipe says its method"
    assert any(line.startswith("# Run: ") and f"gemma2_tune {command}" in line.replace("gemma2-tune", "gemma2_tune")
               and path.name in line for line in head)


def test_reference_recipes_keep_reference_hyperparameters():
    full = resolve("gemma-2-27b-full-zero3").config
    assert full.training.learning_rate == 2e-5 and not full.quantization.load_in_4bit and not full.lora.enabled
    q = resolve("gemma-2-27b-qlora-zero3").config
    assert q.quant_storage == q.compute_dtype == q.model.dtype == "bfloat16"
    for name in ("gemma-2-9b-qlora", "gemma-2-27b-qlora"):
        c = resolve(name).config
        assert c.training.learning_rate == 2e-4 and c.data.dataset == "oasst"
        assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_find_recipe_by_bundled_name():
    assert find_recipe("quickstart-cpu").name == "quickstart-cpu.yaml"
    assert find_recipe("recipes/quickstart-cpu.yaml").name == "quickstart-cpu.yaml"

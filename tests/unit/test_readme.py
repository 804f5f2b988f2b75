from conftest import ROOT
from gemma2_tune.config.reference import markdown

README = (ROOT / "README.md").read_text()


def test_config_reference_in_readme_matches_the_schema():
    assert markdown() in README, "README config reference is stale: regenerate with `make docs`"


def test_readme_two_commands_and_ci_agree():
    assert "make quickstart" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "gemma2-tune sft --recipe recipes/quickstart-cpu.yaml" in (ROOT / "Makefile").read_text()


def test_every_bundled_recipe_command_is_in_the_readme_or_recipe_header():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        assert f"recipes/{recipe.name}" in README, recipe.name

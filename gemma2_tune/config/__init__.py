"""Configuration: one schema per command, layered from defaults, a recipe, --set items and flags.

    schema.py     the sections and the `sft` schema (RunConfig); light: pydantic only
    rules.py      rules between fields, reading the model's family
    layering.py   resolve(recipe, sets, flags, schema) -> Resolved, every problem at once
    recipes.py    bundled recipes, finding and reading recipe files
    reference.py  the config reference (README table, `gemma2-tune config`)
"""

from .layering import Resolved, config_to_yaml, parse_set, resolve
from .schema import DataSection, RunConfig

__all__ = ["DataSection", "Resolved", "RunConfig", "config_to_yaml", "parse_set", "resolve"]

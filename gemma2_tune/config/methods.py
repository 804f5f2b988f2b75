"""Which method a recipe, a saved config or a command is written for, and so which schema reads it. Light: the
schemas only (the registry of methods, with their runners, is gemma2_tune/training/methods.py).

    method_of_mapping({"dpo": {...}})    -> "dpo"        (its `method:`, else a method's own section, else sft)
    schema_for("recipes/x.yaml", sets)   -> DpoConfig
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, UserError
from .recipes import find_recipe, load_recipe
from .schema import RunConfig, method_schemas


def schemas() -> dict[str, type[RunConfig]]:
    """{method name: its schema}, every method's (the subclasses of RunConfig), sft first."""
    return {str(schema.model_fields["method"].default): schema for schema in method_schemas()}


# Sections only one method has: a recipe without `method:` that has one of them is that method's.
IMPLIED_BY_SECTION = {"teacher": "distill", "distill": "distill", "dpo": "dpo", "reward": "reward", "rl": "rl"}


def method_of_mapping(data: Any) -> str:
    """The method a raw config mapping (a recipe, a saved config.yaml) is written for: its `method:` key, else
    implied by a method's own section (`teacher`/`distill`: distill), else sft (every recipe before `method:`).
    An unknown `method:` is returned as is (resolve reports it against the schema)."""
    if not isinstance(data, dict):
        return "sft"
    if data.get("method") is not None:
        return str(data["method"])
    implied = {IMPLIED_BY_SECTION[k] for k in data if k in IMPLIED_BY_SECTION}
    return implied.pop() if len(implied) == 1 else "sft"


def schema_for(recipe: str | None, sets: list[str] | None = None, default: str = "sft") -> type[RunConfig]:
    """The schema a recipe (and --set items) is written for, by `method_of_mapping`; `default` when neither
    names a method nor has a method's own section. Raises ConfigError for an unknown method."""
    data: dict[str, Any] = {}
    if recipe:
        try:
            data = dict(load_recipe(find_recipe(recipe)))
        except ConfigError:
            pass  # resolve() reports it
    for item in sets or []:
        key, _, value = item.partition("=")
        if key.strip() == "method":
            data["method"] = value.strip()
        else:
            data.setdefault(key.strip().split(".", 1)[0], {})
    says = data.get("method") is not None or bool(set(data) & set(IMPLIED_BY_SECTION))
    name = method_of_mapping(data) if says else default
    known = schemas()
    if name not in known:
        raise ConfigError([f"method: '{name}' is not a training method (methods: {', '.join(known)})"])
    return known[name]


def check_command(command: str, recipe: str | None, sets: list[str] | None) -> None:
    """A recipe written for another method than the command running it is refused, naming the command to use.
    Raises UserError."""
    schema = schema_for(recipe, sets, default=command)
    written_for = next(name for name, known in schemas().items() if known is schema)
    if written_for != command:
        raise UserError(f"{recipe or '--set'}: written for `{written_for}` (method: {written_for}); run it with "
                        f"`gemma2-tune {written_for}`, or set method: {command} and its keys")


def saved_schema(data: Any) -> type[RunConfig] | None:
    """The schema of a saved config.yaml mapping (runs from before `method:` included); None when its method
    is not one this version knows."""
    return schemas().get(method_of_mapping(data))

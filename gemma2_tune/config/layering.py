"""Config layering, for any command's schema: defaults < recipe YAML < `--set dotted.key=value` < flags.

The layers are merged once, validated once, and every problem (unknown keys with a did-you-mean, wrong
types, rules between fields) is gathered into one ConfigError naming its key and where the value came from.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .recipes import find_recipe, load_recipe
from .rules import config_problems
from .schema import RunConfig, method_schemas
from .sft import SftConfig

Schema = TypeVar("Schema", bound=RunConfig)

def parse_set(item: str) -> tuple[str, Any]:
    """'training.learning_rate=1e-4' -> ('training.learning_rate', 1e-4); values are YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"--set {item!r}: expected dotted.key=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


@dataclass
class Layers:
    """The merged raw settings and, per dotted key, where its value came from."""

    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    def put(self, dotted: str, value: Any, origin: str, problems: list[str]) -> None:
        """Set one dotted key; a path through a non-section value is a problem (appended), not an error."""
        parts = dotted.split(".")
        node = self.data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{dotted} ({origin}): {'.'.join(parts[: i + 1])} is not a section")
                return
            node = child
        node[parts[-1]] = value
        self.origin[dotted] = origin

    def add_mapping(self, mapping: dict[str, Any], origin: str, prefix: str = "") -> None:
        """Merge a recipe's nested mapping, remembering where each leaf came from."""
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                self.data_at(prefix).setdefault(key, {})
                self.add_mapping(value, origin, f"{dotted}.")
            else:
                self.data_at(prefix)[key] = value
                self.origin[dotted] = origin

    def data_at(self, prefix: str) -> dict[str, Any]:
        """The nested dict at a dotted prefix ('' for the root)."""
        node = self.data
        for part in filter(None, prefix.split(".")):
            node = node[part]
        return node


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    model: type[BaseModel] = schema
    for part in loc[:-1]:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not isinstance(annotation.annotation, type):
            return []
        model = annotation.annotation
    return list(model.model_fields)


def _method_name(schema: type[BaseModel]) -> str:
    field = schema.model_fields.get("method")
    return str(field.default) if field is not None else schema.__name__


def _methods_with_key(loc: tuple, schema: type[BaseModel]) -> list[str]:
    """The methods whose schema has the dotted key `loc` that `schema` lacks (e.g. data.packing: sft)."""
    return sorted({_method_name(other) for other in method_schemas() if other is not schema
                   and str(loc[-1]) in _known_keys(other, loc)})


def _format_validation_error(exc: ValidationError, origin: dict[str, str], schema: type[BaseModel]) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        src = origin.get(dotted) or origin.get(".".join(str(p) for p in loc[:2]))
        where = f" ({src})" if src else ""
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(schema, loc), n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            owners = _methods_with_key(loc, schema)
            if owners:  # the key exists, for another method: say so rather than guess a near name
                more = (f" for method {_method_name(schema)} (a key of {', '.join(owners)}, which "
                        f"{_method_name(schema)} does not use)")
            problems.append(f"{dotted}{where}: unknown key{more}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{dotted}{where}: {err['msg']}{shown}")
    return problems


def _rules_despite(exc: ValidationError, data: dict[str, Any], schema: type[BaseModel]) -> list[str]:
    """The schema's rules on the values that are valid, so every problem is reported at once: the failing
    keys are set aside (defaults take their place) and rule problems naming them are left out."""
    import copy

    rest, dropped = copy.deepcopy(data), set()
    for err in exc.errors():
        key = [str(p) for p in err["loc"][:2]]
        node = rest
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key[-1], None)
        dropped.add(".".join(key))
    try:
        config = schema.model_validate(rest)
    except ValidationError:
        return []
    errors, _ = config_problems(config)
    return [e for e in errors if not any(d in e for d in dropped)]


@dataclass
class Resolved(Generic[Schema]):
    """A validated config, its warnings, and the recipe file it came from (None: defaults and flags only)."""

    config: Schema
    warnings: list[str]
    recipe: Path | None


def resolve(
    recipe: str | None = None,
    sets: list[str] | None = None,
    flags: dict[str, tuple[str, Any]] | None = None,
    schema: type[Schema] = SftConfig,
) -> Resolved[Schema]:
    """Merge recipe, --set items and flags and validate once against `schema`.

    flags: {dotted key: (flag as typed, value)}; a value of None means the flag was not given.
    Raises ConfigError with every problem found (schema errors and the schema's own rules together).
    """
    layers = Layers()
    problems: list[str] = []
    path = None
    if recipe:
        path = find_recipe(recipe)
        layers.add_mapping(load_recipe(path), f"recipe {path}")
    for item in sets or []:
        try:
            key, value = parse_set(item)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        layers.put(key, value, f"--set {item}", problems)
    for key, (flag, value) in (flags or {}).items():
        if value is not None:
            layers.put(key, value, flag, problems)
    try:
        config = schema.model_validate(layers.data)
    except ValidationError as exc:
        problems += _format_validation_error(exc, layers.origin, schema)
        problems += _rules_despite(exc, layers.data, schema)
        raise ConfigError(problems) from None
    errors, warnings = config_problems(config)
    problems.extend(errors)
    if problems:
        raise ConfigError(problems)
    return Resolved(config=config, warnings=warnings, recipe=path)


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, sections in schema order (what a run saves as config.yaml)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

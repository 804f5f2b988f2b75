"""Recipes: find them, merge overrides into them, and validate the result into a RunConfig.

Precedence, lowest first: schema defaults < recipe YAML < `--set dotted.key=value` < explicit flags.
Every problem is gathered into one ConfigError naming its key and where the value came from.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import RunConfig, cross_field_problems
from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
# bundled/ holds links to the repository's recipes/ and accelerate_configs/ (package data in a wheel).
BUNDLED_RECIPES = PACKAGE_DIR / "bundled" / "recipes"


def bundled_recipes() -> list[Path]:
    return sorted(BUNDLED_RECIPES.glob("*.yaml"))


def recipe_summary(path: Path) -> str:
    """The first comment line after the header, used by `gemma2-tune recipes`."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.lower().startswith(("run:", "command:")):
            return text
    return ""


def find_recipe(name: str) -> Path:
    """A path as given, or the name of a bundled recipe (with or without .yaml)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    bundled = BUNDLED_RECIPES / f"{stem}.yaml"
    if bundled.is_file() and (path.parent in (Path("."), Path("recipes"))):
        return bundled
    names = ", ".join(p.stem for p in bundled_recipes())
    raise ConfigError([f"{name}: no such recipe file (bundled recipes: {names})"])


def load_recipe(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read recipe ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"])
    return data


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
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                self.data_at(prefix).setdefault(key, {})
                self.add_mapping(value, origin, f"{dotted}.")
            else:
                self.data_at(prefix)[key] = value
                self.origin[dotted] = origin

    def data_at(self, prefix: str) -> dict[str, Any]:
        node = self.data
        for part in filter(None, prefix.split(".")):
            node = node[part]
        return node


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not isinstance(annotation.annotation, type):
            return []
        model = annotation.annotation
    return list(model.model_fields)


def _format_validation_error(exc: ValidationError, origin: dict[str, str]) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        src = origin.get(dotted) or origin.get(".".join(str(p) for p in loc[:2]))
        where = f" ({src})" if src else ""
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            problems.append(f"{dotted}{where}: unknown key{more}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{dotted}{where}: {err['msg']}{shown}")
    return problems


@dataclass
class Resolved:
    config: RunConfig
    warnings: list[str]
    recipe: Path | None


def resolve(
    recipe: str | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Resolved:
    """Merge recipe, --set items and flags ({dotted key: value}, None = not given) and validate once."""
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
        config = RunConfig.model_validate(layers.data)
    except ValidationError as exc:
        raise ConfigError(problems + _format_validation_error(exc, layers.origin)) from None
    errors, warnings = cross_field_problems(config)
    problems.extend(errors)
    if problems:
        raise ConfigError(problems)
    return Resolved(config=config, warnings=warnings, recipe=path)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

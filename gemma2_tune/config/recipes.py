"""Recipe files: the bundled ones (package data), finding one by path or name, reading its YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# bundled/ holds links to the repository's recipes/ and accelerate_configs/ (package data in a wheel).
BUNDLED_RECIPES = PACKAGE_DIR / "bundled" / "recipes"


def bundled_recipes() -> list[Path]:
    """The recipes shipped with the package, sorted by name."""
    return sorted(BUNDLED_RECIPES.glob("*.yaml"))


def recipe_summary(path: Path) -> str:
    """The first comment line after the header, used by `gemma2-tune recipes`."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.lower().startswith(("run:", "command:")):
            return text
    return ""


def find_recipe(name: str) -> Path:
    """A path as given, or the name of a bundled recipe (with or without .yaml). Raises ConfigError."""
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
    """A recipe's YAML as a mapping of sections. Raises ConfigError naming the file (and line) on bad YAML."""
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

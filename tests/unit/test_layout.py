"""The package's layers: a module never imports from a layer above its own (checked on the source)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gemma2_tune"
# lowest first; a module may import its own layer and those below
LAYERS = [{"errors", "files", "families"}, {"config"}, {"data"}, {"models", "rewards"}, {"training", "after"},
          {"cli", "__main__"}]


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def imported_parts(path: Path) -> set[str]:
    """Top-level gemma2_tune parts a module imports (relative or absolute)."""
    parts = set()
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for gemma2_tune/x.py
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > depth:
                    continue
                base = list(path.relative_to(PACKAGE).parts[: depth - up])
                names = base + (node.module.split(".") if node.module else [])
                if not names:  # "from .. import x"
                    names = [alias.name for alias in node.names]
                parts.add(names[0])
            elif node.module and node.module.startswith("gemma2_tune."):
                parts.add(node.module.split(".")[1])
    return parts


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for part in imported_parts(path):
            if part in ("__init__",) or part.startswith("__version__"):
                continue
            if layer_of(part) > layer_of(own):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {part}")
    assert wrong == []


def test_every_package_folder_is_a_package():
    """setuptools' find includes only folders with __init__.py; a missing one drops modules from the wheel."""
    for folder in {p.parent for p in PACKAGE.rglob("*.py")}:
        assert (folder / "__init__.py").is_file(), folder

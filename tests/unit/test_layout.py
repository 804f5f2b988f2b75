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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The gemma2_tune modules `path` imports, anywhere in it (inside functions too: a lazy import is still an
    edge of the dependency graph)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for candidate in [target] + [f"{target}.{alias.name}" for alias in node.names]:
                if candidate in known and candidate != own:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    # importing a package's module runs the package first: not an edge of its own
    return {m for m in found if not own.startswith(m + ".")}


def test_no_import_cycle():
    """No module reaches itself through imports, lazy ones included: each layer's modules form a hierarchy (the
    registry of methods at the top of training/, taking what it needs from below)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert cycles == [], "\n".join(cycles)


def test_every_module_is_named_in_its_folder_docstring():
    """A package's docstring is its table of contents: every module and subpackage in it is named there."""
    missing = []
    for init in PACKAGE.rglob("__init__.py"):
        folder = init.parent
        if folder == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for item in sorted(folder.iterdir()):
            name = item.stem if item.suffix == ".py" else item.name
            if name == "__init__" or not (item.suffix == ".py" or (item / "__init__.py").is_file()):
                continue
            written = f"{name}/" if item.is_dir() else f"{name}.py"
            if written not in doc:
                missing.append(f"{folder.relative_to(PACKAGE)}: {written}")
    assert missing == [], missing

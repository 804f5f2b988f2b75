"""The lock (constraints.txt) is what installs use, satisfies pyproject's ranges, and is what the docs show."""

import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import lock  # noqa: E402

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_install_target_uses_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-e " in line]
    assert installs and all("-c $(LOCK)" in line or "torch.txt" in line for line in installs), installs
    assert "LOCK := constraints.txt" in makefile and "test-latest:" in makefile


def test_the_lock_satisfies_every_range_in_pyproject():
    pins = lock.read_lock()
    wanted = PYPROJECT["project"]["dependencies"] + [
        spec for name in ("dev", "deepspeed", "export") for spec in PYPROJECT["project"]["optional-dependencies"][name]]
    for spec in wanted:
        requirement = Requirement(spec)
        name = lock.canonical(requirement.name)
        assert name in pins, f"{name} is required but not locked"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{spec}: locked {pins[name]}"


def test_libraries_whose_internals_we_use_are_capped_at_a_minor():
    for spec in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(spec)
        if requirement.name in ("transformers", "trl", "peft"):
            assert any(s.operator == "<" for s in requirement.specifier), spec


def test_the_tested_versions_shown_are_generated_from_the_lock():
    block = subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), "versions"], check=True,
                           capture_output=True, text=True).stdout.strip()
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if (ROOT / "docs").is_dir() else [ROOT / "README.md"]
    shown = [p for p in pages if lock.BEGIN in p.read_text()]
    assert shown, "no page shows the tested versions"
    for page in shown:
        found = re.search(re.escape(lock.BEGIN) + ".*?" + re.escape(lock.END), page.read_text(), re.DOTALL)
        assert found and found.group(0) == block, f"{page.name}: stale; regenerate with `python tools/lock.py versions`"

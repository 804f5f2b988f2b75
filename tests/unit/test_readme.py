"""The README: short, the two commands after cloning (which CI runs), links that lead somewhere. The config
reference, the recipes and the command examples are checked on the docs pages (test_docs.py)."""

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_two_commands_and_ci_agree():
    assert "make quickstart" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "gemma2-tune sft --recipe recipes/quickstart-cpu.yaml" in (ROOT / "Makefile").read_text()


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_readme_links_lead_to_pages():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local and [link for link in local if not (ROOT / link).exists()] == []

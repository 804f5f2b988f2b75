"""The benchmark script runs end to end (tiny sizes): a smoke test, not a measurement."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_quick_writes_all_sides_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/bench_sft.py", "--quick", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"trl", "gemma2-tune", "gemma2-tune-unpacked"}
    for side, runs in data["runs"].items():
        assert runs[0]["supervised_tokens"] > 0 and runs[0]["supervised_tokens_per_s"] > 0, side
    # every side trains the same supervised tokens; unpacked takes TRL's exact optimizer steps
    tokens = {runs[0]["supervised_tokens"] for runs in data["runs"].values()}
    assert len(tokens) == 1
    assert data["runs"]["gemma2-tune-unpacked"][0]["steps"] == data["runs"]["trl"][0]["steps"]
    assert "supervised tokens/s" in r.stdout

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


def test_bench_gpu_smoke_runs_every_side_it_can_on_a_cpu(tmp_path):
    """bench_gpu.py's plumbing on a CPU (tiny shape, 2 steps): a smoke test, not a measurement."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "bench/bench_gpu.py", "--smoke", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["shapes"]["smoke"]["complete"]  # (the file is also written after each side)
    sides = data["shapes"]["smoke"]["sides"]
    assert set(sides) == {"trl", "gemma2-tune", "gemma2-tune-4096"}  # flex: no CPU backward; Liger: Triton
    for side, result in sides.items():
        assert "error" not in result, (side, result.get("error"))
        assert result["steps"] == 2 and result["supervised_tokens_per_s"] > 0 and result["tokens_per_s"] > 0
    assert sides["gemma2-tune"]["micro_batch"]["folded"] == 1  # auto: not folded without a GPU
    assert "MFU 4N" in r.stdout
    r = subprocess.run([sys.executable, "bench/bench_gpu.py", "--json", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr  # never a CPU number passed off as a GPU one
    r = subprocess.run([sys.executable, "bench/bench_gpu.py", "--smoke", "--sides", "trl,gemma2-tune-fast"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--sides: unknown gemma2-tune-fast" in r.stderr

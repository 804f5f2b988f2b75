"""The benchmark scripts run end to end (tiny sizes): smoke tests, not measurements. The CPU benchmark's are
marked `bench` (`make test-all`); the GPU benchmark's smoke test runs in `make test` (the device check runs that
script on a GPU, where a broken side would cost rare device time)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.bench
def test_bench_quick_writes_all_sides_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/bench_sft.py", "--quick", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)  # five sides, ~1 minute each on 2 busy cores
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"trl", "trl-packed", "gemma2-tune", "gemma2-tune-unpacked", "gemma2-tune-loss-trl"}
    for side, runs in data["runs"].items():
        assert runs[0]["supervised_tokens"] > 0 and runs[0]["supervised_tokens_per_s"] > 0, side
    # every side trains the same supervised tokens; unpacked takes TRL's exact optimizer steps, and the loss swap
    # takes the defaults' steps
    tokens = {runs[0]["supervised_tokens"] for runs in data["runs"].values()}
    assert len(tokens) == 1
    assert data["runs"]["gemma2-tune-unpacked"][0]["steps"] == data["runs"]["trl"][0]["steps"]
    assert data["runs"]["gemma2-tune-loss-trl"][0]["steps"] == data["runs"]["gemma2-tune"][0]["steps"]
    assert set(data["min_median_max"]["trl"]["supervised_tokens_per_s"]) == {"min", "median", "max"}
    assert data["loss_trl_over_supervised_chunked"]["supervised_tokens_per_s"]["median"] > 0
    assert "supervised tokens/s" in r.stdout and "training.loss=trl over supervised_chunked" in r.stdout


@pytest.mark.bench
@pytest.mark.parametrize("method", ["dpo", "rl", "distill"])
def test_bench_post_quick_runs_trl_beside_ours_on_the_same_steps(method, tmp_path):
    """bench_post.py: every side trains the same optimizer steps, ours scored through our LM head (dpo, rl) or our
    divergence (distill: `auto` picks it on a CPU, as `gemma2-tune-rows` asks for it)."""
    out = tmp_path / f"{method}.json"
    sides = {"dpo": "trl,trl-fp32,gemma2-tune", "rl": "trl,gemma2-tune", "distill": "trl,gemma2-tune,gemma2-tune-rows"}[method]
    r = subprocess.run([sys.executable, "bench/bench_post.py", method, "--quick", "--sides", sides, "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    runs = {side: values[0] for side, values in data["runs"].items()}
    assert list(runs) == sides.split(",")
    assert len({run["steps"] for run in runs.values()}) == 1 and runs["gemma2-tune"]["steps"] > 0
    if method != "distill":
        assert runs["gemma2-tune"]["lm_head"]["lm_head"] == "supervised_chunked"
    else:
        assert runs["gemma2-tune"]["divergence"] == runs["gemma2-tune-rows"]["divergence"]
        assert runs["gemma2-tune"]["divergence"]["loss"] == "completion_rows"
    assert set(data["gemma2-tune_speedup_over"]) == set(sides.split(",")) - {"gemma2-tune"}


@pytest.mark.bench
def test_bench_loss_kernels_quick_runs_ours_and_trls(tmp_path):
    """--loss-kernels: the loss path alone, ours vs TRL's fused LM head both ways; same loss (bf16 inputs)."""
    out = tmp_path / "loss.json"
    r = subprocess.run([sys.executable, "bench/bench_sft.py", "--loss-kernels", "--quick", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())["loss_kernels"][-1]
    losses = [runs[0]["loss_per_token"] for runs in result["runs"].values()]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-3 * max(losses)
    assert set(result["ratio_over_supervised_chunked"]) == {"trl-fused-as-on-cpu", "trl-fused-supervised-only"}


@pytest.mark.bench  # 95 s on CI's 2 cores: in `make test-all` and the device check's CPU smoke, not `make test`
def test_bench_gpu_smoke_runs_each_kind_of_side_on_a_cpu(tmp_path):
    """bench_gpu.py's plumbing on a CPU (tiny shape, 2 steps): a smoke test, not a measurement. One side of each
    kind that runs without CUDA: TRL's reference recipe and TRL at its best (its own trainer settings), our
    defaults and ours with TRL's loss (our trainer, settings on top); gemma2-tune-4096 differs from the defaults
    by settings only, and flex/Liger/compile need CUDA."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "bench/bench_gpu.py", "--smoke", "--json", str(out), "--sides",
                        "trl,trl-best,gemma2-tune,gemma2-tune-loss-trl,gemma2-tune-flex"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["shapes"]["smoke"]["complete"]  # (the file is also written after each side)
    sides = data["shapes"]["smoke"]["sides"]
    assert set(sides) == {"trl", "trl-best", "gemma2-tune", "gemma2-tune-loss-trl"}  # flex: left out on a CPU
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

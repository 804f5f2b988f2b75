"""The measured tables of docs/guides/benchmarks.md, generated from the result files in bench/: each table sits
between its file's markers, and states when, where and with which libraries it was measured.

    python bench/report.py [docs/guides/benchmarks.md]     # rewrites the tables (`make docs-generate`)

A result file that records its date, machine or library versions (`setup.date` or `setup.started`,
`setup.machine`, `setup.versions`) is read for them; for the files written before the scripts recorded them,
PROVENANCE says where each fact comes from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma2_tune.config.reference import replace_section

BENCH = ROOT / "bench"
PAGE = ROOT / "docs" / "guides" / "benchmarks.md"
MIB = 2**20
# The libraries of the project's tested-versions list on the dates below (the README of those commits).
TESTED_2026_11 = "Python 3.11, torch 2.13.0 (CPU), transformers 5.24.0, trl 1.16.0, peft 0.21.2, bitsandbytes 0.50.2"
# Facts the older result files do not hold: the date of the commit that added each file, the machine as the
# commit and the text beside the results described it, the tested-versions list of that date.
PROVENANCE = {
    "results.json": {"date": "2026-11-30", "machine": "2 CPU cores", "versions": TESTED_2026_11},
    "results_loss.json": {"versions": TESTED_2026_11},
    "serve_load_batching.json": {"date": "2026-12-01", "versions": TESTED_2026_11 + ", fastapi 0.165, uvicorn 0.54",
                                 "machine": "2 CPU cores shared with other jobs (load average 12-16 during the runs), "
                                            "OMP_NUM_THREADS=1"},
}
PROVENANCE["serve_load_sequential.json"] = PROVENANCE["serve_load_batching.json"]


# Each generated block: its name on the page and the result files it is made from.
SOURCES = {"cpu-vs-trl": ["results.json"], "loss-alone": ["results_loss.json"],
           "serve-load": ["serve_load_batching.json", "serve_load_sequential.json"],
           "post-training": ["results_dpo.json", "results_rl.json", "results_distill.json"]}
# bench_post.py's sides, in words
SIDE_NAMES = {"trl": "TRL, reference recipe", "trl-best": "TRL, reference log-probabilities precomputed",
              "trl-fp32": "TRL, precomputed reference, float32 compute (its fastest here)",
              "trl-paged": "TRL, paged generation", "gemma2-tune": "gemma2-tune",
              "gemma2-tune-rows": "gemma2-tune, distill.loss=completion_rows"}


def begin(block: str) -> str:
    files = ", ".join(f"bench/{name}" for name in SOURCES[block])
    return f"<!-- bench:{block}:begin (generated from {files} by `make docs-generate`; do not edit) -->"


def end(block: str) -> str:
    return f"<!-- bench:{block}:end -->"


def provenance(name: str, setup: dict, also: str = "") -> str:
    """'Measured DATE on MACHINE; LIBRARIES.' from the file's setup, else from PROVENANCE."""
    known = PROVENANCE.get(name, {})
    date = setup.get("date") or str(setup.get("started", ""))[:10] or known.get("date", "date not recorded")
    machine = setup.get("machine") or known.get("machine", "machine not recorded")
    versions = setup.get("versions") or known.get("versions", "library versions not recorded")
    if isinstance(versions, dict):
        versions = ", ".join(f"{k} {v}" for k, v in versions.items())
    files = " and ".join(f"`bench/{n}`" for n in [name] + ([also] if also else []))
    return f"Measured {date} on {machine}; {versions}. Raw numbers: {files}."


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def cpu_vs_trl(data: dict) -> list[str]:
    """bench/results.json (bench_sft.py): one epoch per side, medians of the repeats."""
    s, med, ratio = data["setup"], data["median"], data["ratio_over_trl"]
    sides = ("trl", "gemma2-tune", "gemma2-tune-unpacked")
    rows = (("supervised tokens/s", "supervised_tokens_per_s", 1, 1),
            ("peak RSS during training, MiB", "peak_rss", MIB, 0),
            ("peak growth during training, MiB", "peak_growth", MIB, 0), ("final loss", "final_loss", 1, 2),
            ("optimizer steps", "steps", 1, 0))
    lines = [provenance("results.json", s), "",
             f"{s['rows']} chats, vocabulary {s['vocab']:,}, hidden {s['hidden']}, {s['layers']} layers; medians of "
             f"{s['repeats']} repeats.", "",
             "| | TRL reference | gemma2-tune | ratio | gemma2-tune, packing off | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, key, scale, digits in rows:
        values = [_f(med[side][key] / scale, digits) for side in sides]
        ratios = ["" if key == "steps" else f"{ratio[side][key]:.2f}" for side in sides[1:]]
        lines.append(f"| {label} | {values[0]} | {values[1]} | {ratios[0]} | {values[2]} | {ratios[1]} |")
    return lines


def loss_alone(data: dict) -> list[str]:
    """bench/results_loss.json (bench_sft.py --loss-kernels): the loss path alone, per side min / median / max."""
    block = data["loss_kernels"][0]
    s, spread, ratio = block["setup"], block["min_median_max"], block["ratio_over_supervised_chunked"]
    sides = ("supervised_chunked", "trl-fused-as-on-cpu", "trl-fused-supervised-only")

    def mmm(side: str, key: str, scale: float = 1, digits: int = 2) -> str:
        m = spread[side][key]
        if s["runs_per_side"][side] == 1:
            return _f(m["median"] / scale, digits)
        return " / ".join(_f(m[k] / scale, digits) for k in ("min", "median", "max"))

    def with_ratio(side: str, key: str, text: str) -> str:
        return text if side == sides[0] else f"{text} ({ratio[side][key]:.2f})"

    lines = [provenance("results_loss.json", s), "",
             f"Forward + backward of one {s['tokens']:,}-token block ({s['supervised_fraction']:.0%} supervised), "
             f"vocabulary {s['vocab']:,}, hidden {s['hidden']}, {s['dtype']}.", "",
             "| loss alone | ours (`supervised_chunked`) | TRL, as it runs on a CPU (every position) | TRL's kernel, "
             "supervised positions only (as on CUDA) |", "| --- | ---: | ---: | ---: |"]
    rows = [("CPU s per step, min / median / max", [mmm(x, "cpu_seconds_per_step") for x in sides]),
            ("supervised tokens per CPU second, median (ratio)",
             [with_ratio(x, "supervised_tokens_per_cpu_s", _f(spread[x]["supervised_tokens_per_cpu_s"]["median"]))
              for x in sides]),
            ("wall s per step, min / median / max", [mmm(x, "seconds_per_step", digits=1) for x in sides]),
            ("peak RSS growth MiB, min / median / max (ratio)",
             [with_ratio(x, "peak_growth", mmm(x, "peak_growth", MIB, 0)) for x in sides]),
            ("runs", [str(s["runs_per_side"][x]) for x in sides]),
            ("loss per token", [f"{spread[x]['loss_per_token']['median']:.6f}" for x in sides])]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in s["commands"]]
    numerics = data.get("bf16_numerics_vs_fp64")
    if numerics:
        lines += ["", "bf16 inputs against an fp64 reference (relative errors):", "",
                  "| hidden scale | largest logit | reference loss per token | ours: loss | ours: hidden gradient "
                  "| TRL's: loss | TRL's: hidden gradient |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in numerics.items():
            ours, trl = row["supervised_chunked"], row["trl-fused-supervised-only"]
            lines.append(f"| {name.removeprefix('hidden_scale_')} | {row['max_abs_logit']:.2f} | "
                         f"{row['ref_loss_per_token']:.4f} | {ours['loss_rel_err']:.1e} | "
                         f"{ours['grad_hidden_rel_err']:.1e} | {trl['loss_rel_err']:.1e} | "
                         f"{trl['grad_hidden_rel_err']:.1e} |")
    partial = data.get("end_to_end_partial")
    if partial:
        run = partial["runs"]["gemma2-tune"][0]
        lines += ["", f"End to end (`{partial['command']}`): the defaults' run trained {run['supervised_tokens']:,} "
                  f"supervised tokens in {run['steps']} optimizer steps, {_f(run['train_cpu_s'], 0)} CPU s of "
                  f"training, {_f(run['runtime_s'], 0)} s wall, peak RSS {_f(run['peak_rss'] / MIB, 0)} MiB."]
    return lines


def serve_load(batching: dict, sequential: dict) -> list[str]:
    """bench/serve_load_*.json (serve_load.py): requests/s and latency per client count, both serving modes."""
    lines = [provenance("serve_load_batching.json", batching.get("setup", {}), "serve_load_sequential.json"), "",
             f"Greedy, {batching['max_tokens']} tokens per answer, {batching['requests_per_client']} requests per "
             "client, one after another; the tiny random model.", "",
             "| clients | batching (default): requests/s | p50 s | p95 s | identical | `--no-continuous-batching`: "
             "requests/s | p50 s | p95 s | identical |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a, b in zip(batching["steps"], sequential["steps"]):
        assert a["clients"] == b["clients"], (a, b)
        cells = [str(a["clients"])]
        for step in (a, b):
            cells += [f"{step['requests_per_s']:.2f}", f"{step['p50_s']:.3f}", f"{step['p95_s']:.3f}",
                      f"{step['identical']}/{step['requests']}"]
        lines.append("| " + " | ".join(cells) + " |")
    first, last = batching["steps"][0]["clients"], batching["steps"][-1]["clients"]
    lines += ["", f"{last} clients against {first}: x{batching['speedup_last_vs_first']:.2f} requests/s with "
              f"continuous batching, x{sequential['speedup_last_vs_first']:.2f} one request at a time."]
    return lines


def post_training(results: dict[str, dict]) -> list[str]:
    """bench/results_{dpo,rl,distill}.json (bench_post.py): per method, each side's medians and gemma2-tune's
    speed-up (wall and CPU seconds) and peak RSS against it."""
    lines = []
    for method, data in results.items():
        s, med, runs = data["setup"], data["median"], data["runs"]
        ours = "gemma2-tune" if "gemma2-tune" in s["sides"] else s["sides"][-1]
        over = data[f"{ours}_speedup_over"]
        lines += [f"**{method}**: " + provenance(f"results_{method}.json", s), "",
                  f"Medians of {s['repeats']} run(s) per side, interleaved; vocabulary {s['vocab']:,}, hidden "
                  f"{s['hidden']}, {s['layers']} layers.", "",
                  "| side | wall s | CPU s | peak RSS MiB | optimizer steps | last logged | gemma2-tune faster "
                  "(wall / CPU) | gemma2-tune's peak RSS |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for side in s["sides"]:
            m, first = med[side], runs[side][0]
            loss = (f"reward {first['final_reward']:.4f}" if first.get("final_reward") is not None else
                    f"loss {first['final_loss']:.4f}" if first.get("final_loss") is not None else "")
            ratio = ("" if side == ours else f"{over[side]['wall']:.2f}x / {over[side]['cpu']:.2f}x")
            memory = "" if side == ours else f"{over[side]['peak_rss_ratio']:.2f}x"
            lines.append(f"| {SIDE_NAMES.get(side, side)} | {_f(m['wall_s'])} | {_f(m['cpu_s'])} | "
                         f"{_f(m['peak_rss'] / MIB, 0)} | {first['steps']} | "
                         f"{loss} | {ratio} | {memory} |")
        lines.append("")
    return lines[:-1]


def sections(bench: Path = BENCH) -> dict[str, str]:
    """{block name: the block, markers included}, from the result files in `bench`."""
    def read(name: str) -> dict:
        return json.loads((bench / name).read_text())

    blocks = {"cpu-vs-trl": cpu_vs_trl(read("results.json")),
              "loss-alone": loss_alone(read("results_loss.json")),
              "serve-load": serve_load(read("serve_load_batching.json"), read("serve_load_sequential.json")),
              "post-training": post_training({m: read(f"results_{m}.json") for m in ("dpo", "rl", "distill")
                                              if (bench / f"results_{m}.json").exists()})}
    return {name: "\n".join([begin(name), ""] + lines + ["", end(name)]) for name, lines in blocks.items()}


def render(text: str, bench: Path = BENCH) -> str:
    """The page's text with every generated block replaced."""
    for name, body in sections(bench).items():
        text = replace_section(text, begin(name), end(name), body)
    return text


if __name__ == "__main__":
    page = Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE
    old = page.read_text()
    new = render(old)
    if new != old:
        page.write_text(new)
    print(f"{page}: {'updated' if new != old else 'up to date'}")

"""Side-by-side benchmark of post-training: plain TRL 1.16 (its reference recipe and its fastest settings) vs
`gemma2-tune dpo` / `rl` / `distill`, on the same model, data and optimizer steps, each side in its own process.

    python bench/bench_post.py dpo                   # ~8 minutes on 2 CPU cores; writes bench/results_dpo.json
    python bench/bench_post.py rl                    # ~5 minutes;                  bench/results_rl.json
    python bench/bench_post.py distill               # ~5 minutes;                  bench/results_distill.json
    python bench/bench_post.py dpo --quick           # tiny sizes: a smoke run, not a measurement (the tests)

The model is bench_sft.py's: a Gemma 2 with the real 256,000-entry vocabulary (word-level tokenizer of that size),
hidden 64, 2 layers (sliding + global, soft-caps 50/30), random weights; the data is synthetic text over that
vocabulary, written here (seeded), the same file for every side.

  dpo      16 preference pairs (prompt 20-200 tokens, answers 10-150), one epoch, QLoRA (NF4, double quant, bf16
           compute), LoRA r16 on q/k/v/o, dropout 0.05, eager, bf16, beta 0.1, lr 5e-6, batch 1 x accumulation 4
           (4 optimizer steps), max length 1024, gradient checkpointing: the 9B DPO recipe's settings.
           Sides: `trl` (DPOTrainer on the conversational pairs, the reference recipe); `trl-best` (TRL's fastest
           here: reference log-probabilities precomputed once, `precompute_ref_log_probs`; its padding-free mode
           is disabled in 1.16); `trl-fp32` (trl-best computing in float32: weights dequantized to fp32, no bf16
           autocast, so its fused head's tiles are fp32, which this CPU without bf16 units runs faster);
           `gemma2-tune` (`gemma2-tune dpo` with the reference recipe's settings, bf16).
  rl       GRPO (dapo loss, beta 0.04), groups of 4, completions up to 32 tokens at temperature 1, 4 optimizer steps
           of 8 completions (2 prompts), LoRA r16 on q/k/v/o in fp32, lr 5e-6, a Python reward function (length).
           Sides: `trl` (GRPOTrainer, transformers generation); `trl-paged` (its paged continuous-batching
           generation, `use_transformers_paged`); `gemma2-tune` (`gemma2-tune rl`).
  distill  on-policy distillation (generalized JSD, beta 0.5) from a wider teacher (hidden 128, same vocabulary),
           8 prompts, completions up to 32 tokens, 4 optimizer steps of 2 prompts, LoRA r16 on the student, fp32.
           Sides: `trl` (DistillationTrainer); `gemma2-tune` (`gemma2-tune distill`: distill.loss=auto, ours on a
           CPU, TRL's Triton divergence on a GPU); `gemma2-tune-rows` (distill.loss=completion_rows: ours on a GPU
           too; on a CPU the same as `gemma2-tune`, so left out unless named in --sides).

Measured per side, over the span from the trainer's construction to the end of training (TRL's `trl-best`
precomputes the reference inside that span): wall seconds, CPU seconds (user + system, every thread), peak RSS of
the process (VmHWM, whole run; with `--device cuda`, peak allocated CUDA memory) and its growth over the RSS when
the trainer was built, the optimizer steps and the
last logged loss (and, for dpo, reward accuracy; for rl, mean reward). Ratios: each side over the first, medians
of `--repeats` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_sft import build_model  # noqa: E402  (the same model as the sft benchmark)

SIDES = {"dpo": ("trl", "trl-best", "trl-fp32", "gemma2-tune"), "rl": ("trl", "trl-paged", "gemma2-tune"),
         "distill": ("trl", "gemma2-tune", "gemma2-tune-rows")}
LORA = dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
REWARD_FILE = '''def length(completions, **kwargs):
    """Longer answers score higher (a random model's reward must vary within a group)."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) / 100.0 for c in completions]
'''


# ----------------------------------------------------------------------------------------------- data (parent)
def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{min(vocab - 1, 8 + int(rng.paretovariate(1.1)) % (vocab - 8))}" for _ in range(n))


def write_data(method: str, folder: Path, vocab: int, quick: bool) -> Path:
    rng = random.Random(0)
    path = folder / f"{method}.jsonl"
    rows = []
    if method == "dpo":
        for _ in range(4 if quick else 16):
            prompt = [{"role": "user", "content": words(rng, rng.randint(20, 200), vocab)}]
            rows.append({"prompt": prompt,
                         "chosen": [{"role": "assistant", "content": words(rng, rng.randint(10, 150), vocab)}],
                         "rejected": [{"role": "assistant", "content": words(rng, rng.randint(10, 150), vocab)}]})
    else:
        for _ in range(4 if quick else 8):
            rows.append({"messages": [{"role": "user", "content": words(rng, rng.randint(10, 60), vocab)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rewards.py").write_text(REWARD_FILE)
    return path


# ------------------------------------------------------------------------------------------- measuring (worker)
def measure_span() -> dict:
    """Wall and CPU seconds from the first Trainer's construction to the end of its train(), and the RSS when it
    was built; filled in as they happen."""
    import transformers

    span: dict = {}
    init, train = transformers.Trainer.__init__, transformers.Trainer.train

    def timed_init(self, *args, **kwargs):
        if "wall0" not in span:
            span.update(wall0=time.perf_counter(), cpu0=time.process_time(), rss0=rss_now())
        return init(self, *args, **kwargs)

    def timed_train(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:
            span.update(wall_s=time.perf_counter() - span["wall0"], cpu_s=time.process_time() - span["cpu0"])

    transformers.Trainer.__init__, transformers.Trainer.train = timed_init, timed_train
    return span


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """Peak RSS of the process (VmHWM); on a GPU, peak allocated CUDA memory instead."""
    if os.environ.get("BENCH_DEVICE") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def last(history: list[dict], key: str):
    values = [e[key] for e in history if key in e]
    return values[-1] if values else None


def result(span: dict, history: list[dict], steps: int, **extra) -> dict:
    peak = peak_rss()
    return {"wall_s": span["wall_s"], "cpu_s": span["cpu_s"], "peak_rss": peak, "peak_growth": peak - span["rss0"],
            "steps": steps, "final_loss": last(history, "loss")} | extra


def trl_lora(dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout, target_modules=LORA["targets"],
                      task_type="CAUSAL_LM")


def trl_common(out: str, bf16: bool) -> dict:
    return dict(output_dir=out, logging_steps=1, save_strategy="no", report_to=[], seed=42,
                use_cpu=os.environ.get("BENCH_DEVICE", "cpu") == "cpu", disable_tqdm=True, bf16=bf16)


def ours_sets(model_dir: str, data: str, out: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.dataset={data}", f"output.dir={out}", "training.save_steps=null",
            "training.logging_steps=1", "model.attn_implementation=eager", f"lora.r={LORA['r']}",
            f"lora.alpha={LORA['alpha']}", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]


def run_ours(schema, sets: list[str]) -> dict:
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.training.methods import method_for

    cfg = resolve(None, sets, schema=schema).config
    return method_for(cfg).run(cfg, echo=lambda line: None)


# ----------------------------------------------------------------------------------------------------- dpo
def worker_dpo(side: str, model_dir: str, data: str, out: str) -> dict:
    span = measure_span()
    if side == "gemma2-tune":
        from gemma2_tune.config.dpo import DpoConfig

        record = run_ours(DpoConfig, ours_sets(model_dir, data, out) + [
            "model.dtype=bfloat16", "quantization.load_in_4bit=true", "lora.dropout=0.05", "dpo.beta=0.1",
            "dpo.loss_type=[sigmoid]", "training.learning_rate=5e-6", "training.num_train_epochs=1",
            "training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=4",
            "training.gradient_checkpointing=true", "data.max_length=1024", "training.lr_scheduler_type=linear",
            "training.warmup_ratio=0.0"])
        history = record["dpo"]["history"]
        return result(span, history, record["global_step"], reward_accuracy=last(history, "rewards/accuracies"),
                      lm_head=record["dpo"].get("lm_head"))
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    dtype = torch.float32 if side == "trl-fp32" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype,
                                                 quantization_config=quant)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(**trl_common(out, bf16=dtype == torch.bfloat16), beta=0.1, learning_rate=5e-6, num_train_epochs=1,
                     per_device_train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
                     max_length=1024, lr_scheduler_type="linear",
                     precompute_ref_log_probs=side != "trl", precompute_ref_batch_size=4)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=trl_lora(0.05),
                         train_dataset=load_dataset("json", data_files=data, split="train"))
    trainer.train()
    history = trainer.state.log_history
    return result(span, history, trainer.state.global_step, reward_accuracy=last(history, "rewards/accuracies"))


# ------------------------------------------------------------------------------------------------------ rl
RL = dict(num_generations=4, max_completion_length=32, batch=8, steps=4, beta=0.04, lr=5e-6)


def worker_rl(side: str, model_dir: str, data: str, out: str) -> dict:
    span = measure_span()
    rewards = Path(data).parent / "rewards.py"
    if side == "gemma2-tune":
        from gemma2_tune.config.rl import RlConfig

        record = run_ours(RlConfig, ours_sets(model_dir, data, out) + [
            "model.dtype=float32", "quantization.load_in_4bit=false", "lora.dropout=0.0", "rl.algorithm=dapo",
            f"rl.num_generations={RL['num_generations']}", f"rl.beta={RL['beta']}",
            f"rl.max_completion_length={RL['max_completion_length']}",
            f"rl.reward_functions=[{{path: {rewards}, name: length}}]", f"training.max_steps={RL['steps']}",
            f"training.per_device_train_batch_size={RL['batch']}", "training.gradient_accumulation_steps=1",
            f"training.learning_rate={RL['lr']}", "data.max_length=512"])
        rl = record["rl"]
        return result(span, [{"loss": record["training"].get("final_loss")}], record["global_step"],
                      final_reward=rl.get("final_reward"), completions=rl.get("completions"),
                      generation_s=rl.get("generation_s"), lm_head=rl.get("lm_head"))
    import importlib.util

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("bench_rewards", rewards)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    dataset = load_dataset("json", data_files=data, split="train").map(lambda r: {"prompt": r["messages"]},
                                                                       remove_columns=["messages"])
    args = GRPOConfig(**trl_common(out, bf16=False), loss_type="dapo", beta=RL["beta"],
                      num_generations=RL["num_generations"], max_completion_length=RL["max_completion_length"],
                      per_device_train_batch_size=RL["batch"], gradient_accumulation_steps=1, max_steps=RL["steps"],
                      learning_rate=RL["lr"], temperature=1.0, disable_dropout=True,
                      use_transformers_paged=side == "trl-paged")
    trainer = GRPOTrainer(model=model, reward_funcs=module.length, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=trl_lora(0.0))
    trainer.train()
    history = trainer.state.log_history
    return result(span, history, trainer.state.global_step, final_reward=last(history, "reward"))


# ------------------------------------------------------------------------------------------------- distill
DISTILL = dict(max_completion_length=32, batch=2, steps=4, beta=0.5, lr=5e-6)


def worker_distill(side: str, model_dir: str, data: str, out: str) -> dict:
    span = measure_span()
    teacher_dir = str(Path(model_dir).parent / "teacher")
    if side in ("gemma2-tune", "gemma2-tune-rows"):
        from gemma2_tune.config.distill import DistillConfig

        record = run_ours(DistillConfig, ours_sets(model_dir, data, out) + [
            f"teacher.name_or_path={teacher_dir}", "teacher.load_in=full", "model.dtype=float32",
            "quantization.load_in_4bit=false", "lora.dropout=0.0", f"distill.beta={DISTILL['beta']}",
            f"distill.max_completion_length={DISTILL['max_completion_length']}", f"training.max_steps={DISTILL['steps']}",
            f"training.per_device_train_batch_size={DISTILL['batch']}", "training.gradient_accumulation_steps=1",
            f"training.learning_rate={DISTILL['lr']}", "data.max_length=512"]
            + (["distill.loss=completion_rows"] if side == "gemma2-tune-rows" else []))
        return result(span, [{"loss": record["training"].get("final_loss")}], record["global_step"],
                      divergence=record["distill"]["loss"], sampling=record["distill"]["sampling"])
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    student = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    dataset = load_dataset("json", data_files=data, split="train").map(lambda r: {"prompt": r["messages"]},
                                                                       remove_columns=["messages"])
    args = DistillationConfig(**trl_common(out, bf16=False), beta=DISTILL["beta"],
                              max_completion_length=DISTILL["max_completion_length"],
                              per_device_train_batch_size=DISTILL["batch"], gradient_accumulation_steps=1,
                              max_steps=DISTILL["steps"], learning_rate=DISTILL["lr"])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=trl_lora(0.0))
    trainer.train()
    history = trainer.state.log_history
    return result(span, history, trainer.state.global_step)


WORKERS = {"dpo": worker_dpo, "rl": worker_rl, "distill": worker_distill}


# ----------------------------------------------------------------------------------------------------- parent
def run_side(method: str, side: str, model_dir: Path, data: Path, work: Path) -> dict:
    out = work / f"{side}-{time.time_ns()}"
    result_file = out.with_suffix(".json")
    cmd = [sys.executable, __file__, method, "--worker", side, "--model-dir", str(model_dir), "--data", str(data),
           "--out", str(out), "--result", str(result_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        sys.exit(f"{method} {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores"


def versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", choices=list(SIDES))
    parser.add_argument("--sides", help="comma-separated; ratios are over the first (default: all of the method's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: every side on the GPU, "
                        "peak memory = torch.cuda.max_memory_allocated (bench/device_check.sh post)")
    parser.add_argument("--json", help="default: bench/results_<method>.json (cuda: results_<method>_gpu.json)")
    parser.add_argument("--worker")
    parser.add_argument("--model-dir")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--result")
    a = parser.parse_args()
    if a.worker:
        Path(a.result).write_text(json.dumps(WORKERS[a.method](a.worker, a.model_dir, a.data, a.out)))
        return
    sides = [s.strip() for s in a.sides.split(",")] if a.sides else [
        s for s in SIDES[a.method] if not (s == "gemma2-tune-rows" and a.device == "cpu")]
    unknown = [s for s in sides if s not in SIDES[a.method]]
    if unknown:
        parser.error(f"--sides: {', '.join(unknown)} not among {', '.join(SIDES[a.method])}")
    if a.quick:
        a.vocab, a.repeats = 4096, 1
    os.environ["BENCH_DEVICE"] = a.device  # the workers inherit it
    target = Path(a.json) if a.json else HERE / f"results_{a.method}{'_gpu' if a.device == 'cuda' else ''}.json"
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gemma2-tune-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        build_model(model_dir, a.vocab, 64, 2)
        if a.method == "distill":
            build_model(work / "teacher", a.vocab, 128, 2)
        data = write_data(a.method, work, a.vocab, a.quick)
        os.environ["GEMMA2_TUNE_HOME"] = str(work / "home")
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(a.repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):  # interleaved, order alternating
                runs[side].append(run_side(a.method, side, model_dir, data, work) | {"load_avg_1m": os.getloadavg()[0]})
                print(f"repeat {r + 1} {side:12s} " + json.dumps(runs[side][-1]), flush=True)
    metrics = ("wall_s", "cpu_s", "peak_rss", "peak_growth")
    med = {s: {k: statistics.median(x[k] for x in v) for k in metrics} for s, v in runs.items()}
    base = sides[0]
    # speed-up of gemma2-tune (else the last side) over each other side: time ratios inverted
    ours = "gemma2-tune" if "gemma2-tune" in sides else sides[-1]
    summary = {"method": a.method, "setup": {"vocab": a.vocab, "hidden": 64, "layers": 2, "repeats": a.repeats,
                                             "sides": sides, "quick": a.quick, "started": started,
                                             "device": a.device, "machine": machine(a.device), "versions": versions(),
                                             "load_avg_1m_before": load_before,
                                             "load_avg_1m_after": os.getloadavg()[0], "settings": __doc__},
               "runs": runs, "median": med,
               f"ratio_over_{base}": {s: {k: med[s][k] / med[base][k] for k in metrics} for s in sides if s != base},
               f"{ours}_speedup_over": {s: {"wall": med[s]["wall_s"] / med[ours]["wall_s"],
                                            "cpu": med[s]["cpu_s"] / med[ours]["cpu_s"],
                                            "peak_rss_ratio": med[ours]["peak_rss"] / med[s]["peak_rss"]}
                                        for s in sides if s != ours}}
    target.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{a.method}: medians of {a.repeats} run(s); {ours} against each side")
    print(f"{'side':14s}{'wall s':>10s}{'CPU s':>10s}{'peak RSS MiB':>14s}{'growth MiB':>12s}   speed-up  memory")
    for s in sides:
        m = med[s]
        extra = "" if s == ours else (f"   {summary[f'{ours}_speedup_over'][s]['wall']:6.2f}x"
                                      f"  {summary[f'{ours}_speedup_over'][s]['peak_rss_ratio']:6.2f}x")
        print(f"{s:14s}{m['wall_s']:10.1f}{m['cpu_s']:10.1f}{m['peak_rss'] / 2**20:14.0f}"
              f"{m['peak_growth'] / 2**20:12.0f}{extra}")
    print(f"\nwritten: {target}")


if __name__ == "__main__":
    main()

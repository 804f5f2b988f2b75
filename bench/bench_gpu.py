"""GPU benchmark: plain TRL's reference recipe vs gemma2-tune, on the published Gemma 2 shapes, side by side.

    python bench/bench_gpu.py                                   # one CUDA GPU: the 2B shape, all sides (~4 minutes)
    python bench/bench_gpu.py --shapes 2b,9b --steps 8          # the 9B shape too (its weights take longer to build)
    python bench/bench_gpu.py --smoke                           # CPU, tiny shape, 2 steps per side: plumbing only

Each shape gets a randomly initialised Gemma 2 with the published configuration (families/gemma2.py: hidden,
layers, heads, head_dim, the real 256,000-entry vocabulary; soft-caps 50/30; bf16) and a word-level
tokenizer of that size; every side trains it from the same files on the same mixed-length chats (70% short,
20% medium two-turn, 10% long), each side in its own process, for the same number of optimizer steps:

    trl                 plain TRL 1.16, the reference QLoRA recipe: NF4 + double quant, LoRA r16 on q/k/v/o,
                        eager, gradient checkpointing, batch 1 x accumulation 4, unpacked rows, max length 1024
    trl-best            plain TRL 1.16 at its best: the same, with its packing (bfd, padding-free: rows packed into
                        1,024-token sequences without cross-row attention) and its default loss (the fused,
                        chunked, soft-capped LM head)
    trl-best-liger      trl-best + use_liger_kernel=True (Liger's kernels as TRL applies them; CUDA only)
    gemma2-tune         `gemma2-tune sft` defaults (packed 1024-token blocks, supervised-only tiled loss,
                        accumulation folded into the micro-batch when `plan` says it fits)
    gemma2-tune-flex    the same with model.attn_implementation=flex_attention (soft-cap inside the kernel)
    gemma2-tune-4096    data.max_length=4096, accumulation 1 (the same tokens per step in one forward)
    gemma2-tune-compiled  defaults + training.torch_compile=regional (each decoder layer compiled, after the
                        probe check against eager; compile time counts in the warm-up steps)
    gemma2-tune-liger   defaults + training.use_liger_kernel=true (Liger's RMSNorm, GeGLU and RoPE kernels, after
                        the probe check of logits and gradients against the plain model)
    gemma2-tune-liger-loss  defaults + training.loss=supervised_liger (Liger's fused linear cross-entropy with
                        the 30.0 soft-cap at supervised positions, lm_head in bf16, instead of the fp32 tiles)
    gemma2-tune-loss-trl  defaults + training.loss=trl (TRL's fused soft-capped LM head instead of our fp32 tiles:
                        on a CPU ours was faster, bench/results_loss.json; on CUDA TRL's runs in Triton)
    gemma2-tune-fused   flex_attention + Liger's kernels and loss + regional compile together
    gemma2-tune-flex-8192  flex_attention, 8,192-token packed blocks, accumulation 1 (the long-context memory
                        target; not in the default sides)

Measured per side, over the steps after `--warmup`: supervised tokens/s and all (non-padding) tokens/s,
MFU = all tokens/s x FLOPs per token / peak (4N: forward + backward through frozen weights; 6N counting
the recompute of gradient checkpointing; N = the shape's parameters; peak: the card's dense bf16 TFLOP/s,
`--peak-tflops` to override), peak `torch.cuda.max_memory_allocated` during training, and the training loss
at the last step. Ratios are over TRL. Writes `--json` (default bench/results_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# TRL's sides: SFTConfig settings on top of the reference recipe
TRL_SIDES = {"trl": {}, "trl-best": {"packing": True}, "trl-best-liger": {"packing": True, "use_liger_kernel": True}}
SIDES = {
    **{side: None for side in TRL_SIDES},
    "gemma2-tune": [],
    "gemma2-tune-loss-trl": ["training.loss=trl"],
    "gemma2-tune-flex": ["model.attn_implementation=flex_attention"],
    "gemma2-tune-4096": ["data.max_length=4096", "training.gradient_accumulation_steps=1"],
    "gemma2-tune-compiled": ["training.torch_compile=regional"],
    "gemma2-tune-liger": ["training.use_liger_kernel=true"],
    "gemma2-tune-liger-loss": ["training.loss=supervised_liger"],
    "gemma2-tune-fused": ["model.attn_implementation=flex_attention", "training.use_liger_kernel=true",
                          "training.loss=supervised_liger", "training.torch_compile=regional"],
    "gemma2-tune-flex-8192": ["model.attn_implementation=flex_attention", "data.max_length=8192",
                              "training.gradient_accumulation_steps=1"],
}
# the baseline, the defaults, then the likeliest speed-ups first (a time limit cuts the last ones)
DEFAULT_SIDES = ["trl", "trl-best", "gemma2-tune", "gemma2-tune-fused", "gemma2-tune-loss-trl", "trl-best-liger",
                 "gemma2-tune-liger-loss", "gemma2-tune-liger", "gemma2-tune-compiled", "gemma2-tune-flex",
                 "gemma2-tune-4096"]
RUNNING: list = []  # the side's worker process while it runs (killed if the benchmark is stopped)


def stop(signum, frame):  # noqa: ARG001
    """SIGTERM/SIGINT (a time limit): kill the running side's worker, then unwind so the temporary folder with
    the built model (~18 GB for 9B) is removed; what was measured is already in the JSON."""
    for proc in RUNNING:
        proc.kill()
    raise SystemExit(f"stopped by signal {signum} (any side already measured is in the JSON)")


CUDA_ONLY = ("trl-best-liger", "gemma2-tune-flex", "gemma2-tune-compiled", "gemma2-tune-liger", "gemma2-tune-liger-loss",
             "gemma2-tune-fused", "gemma2-tune-flex-8192")
# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


# ----------------------------------------------------------------------------- setup (parent process)
def shape_for(name: str, smoke: bool):
    from gemma2_tune.families import GEMMA2, Shape

    if smoke:
        return Shape(4096, 64, 2, 4, 2, 16, 256, 256, source="smoke test")
    return GEMMA2.shapes[name]


def build(path: Path, shape, device: str) -> None:
    """Tokenizer + a random bf16 Gemma 2 of `shape`, built on `device` (fast on a GPU) and saved to `path`."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from bench_sft import build_tokenizer

    tokenizer = build_tokenizer(shape.vocab)
    config = Gemma2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                          num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                          num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                          sliding_window=shape.sliding_window, query_pre_attn_scalar=shape.head_dim,
                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0, pad_token_id=0,
                          eos_token_id=[1, 5], bos_token_id=2, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model


# ----------------------------------------------------------------------------- workers (one per process)
class Meter:
    """Counts the tokens the data collator hands out and times optimizer steps."""

    def __init__(self, collator, pad_id: int):
        self.collator, self.pad_id = collator, pad_id
        self.supervised = self.tokens = 0
        self.marks: list[tuple[float, int, int]] = []  # (time, supervised, tokens) at each step end

    def __getattr__(self, name):  # the wrapped collator's own counters (padding fraction) stay readable
        return getattr(self.collator, name)

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch["labels"]
        self.supervised += int((labels[:, 1:] != -100).sum())
        self.tokens += int((batch["input_ids"] != self.pad_id).sum())
        return batch

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Marks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ARG002
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                meter.marks.append((time.perf_counter(), meter.supervised, meter.tokens))

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                meter.marks.append((time.perf_counter(), meter.supervised, meter.tokens))

        return Marks()

    def rates(self, warmup: int) -> dict:
        """Tokens/s over the steps after `warmup` (the collator runs one batch ahead: counts are of batches
        fetched, which over several steps is the work done)."""
        first, last = self.marks[min(warmup, len(self.marks) - 2)], self.marks[-1]
        seconds = last[0] - first[0]
        return {"supervised_tokens_per_s": (last[1] - first[1]) / seconds, "tokens_per_s": (last[2] - first[2]) / seconds,
                "measured_steps": len(self.marks) - 1 - min(warmup, len(self.marks) - 2), "measured_s": seconds}


def peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    from gemma2_tune.files import proc_status_bytes

    return proc_status_bytes("VmHWM") or 0


def last_loss(log_history: list[dict]) -> float | None:
    losses = [e["loss"] for e in log_history if "loss" in e]
    return losses[-1] if losses else None


def worker_trl(model_dir: str, data: str, out: str, steps: int, warmup: int, settings: dict | None = None) -> dict:
    """The reference recipe with `settings` (TRL_SIDES) on top."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from bench_sft import rendered_examples

    tokenizer, examples, _ = rendered_examples(model_dir, data)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.bfloat16,
                                                 quantization_config=quant, device_map={"": 0} if cuda else None)
    recipe = dict(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=4, learning_rate=2e-4,
                  bf16=True, max_length=1024, gradient_checkpointing=True, max_steps=steps, logging_steps=1,
                  save_strategy="no", report_to=[], seed=42, packing=False, use_cpu=not cuda, disable_tqdm=True)
    args = SFTConfig(**recipe | (settings or {}))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    train = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    meter = Meter(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = meter
    trainer.add_callback(meter.callback())
    trainer.train()
    return meter.rates(warmup) | {"peak_allocated": peak_memory(), "steps": trainer.state.global_step,
                                  "final_loss": last_loss(trainer.state.log_history)}


def worker_gemma2_tune(model_dir: str, data: str, out: str, sets: list[str], steps: int, warmup: int) -> dict:
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.training import sft

    cfg = resolve(None, [f"model.name_or_path={model_dir}", f"data.dataset={data}", f"output.dir={out}",
                         f"training.max_steps={steps}", "training.save_steps=null", "training.logging_steps=1",
                         *sets]).config
    meters = []
    build_trainer = sft.build_trainer

    def measured(*args, **kwargs):  # the run's own trainer, with the same meter as the TRL side
        trainer = build_trainer(*args, **kwargs)
        meter = Meter(trainer.data_collator, trainer.processing_class.pad_token_id)
        trainer.data_collator = meter
        trainer.add_callback(meter.callback())
        meters.append(meter)
        return trainer

    sft.build_trainer = measured
    record = sft.run_sft(cfg, echo=lambda line: None)
    return meters[0].rates(warmup) | {"peak_allocated": peak_memory(), "steps": record["global_step"],
                                      "final_loss": record["training"]["final_loss"],
                                      "micro_batch": record.get("micro_batch"),
                                      "attention": record["model"]["attn_implementation"],
                                      "kernels": record.get("kernels"), "compiled": record.get("compiled")}


# ----------------------------------------------------------------------------- driver
def run_side(side: str, model_dir: Path, data: Path, work: Path, steps: int, warmup: int) -> dict:
    out = work / f"{side}-{time.time_ns()}"
    result_file = out.with_suffix(".json")
    cmd = [sys.executable, __file__, "--worker", side, "--model-dir", str(model_dir), "--data", str(data),
           "--out", str(out), "--result", str(result_file), "--steps", str(steps), "--warmup", str(warmup)]
    started = time.time()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"}) as proc:
        RUNNING.append(proc)
        stdout, stderr = proc.communicate()
        RUNNING.remove(proc)
    if proc.returncode != 0:
        return {"error": (stdout[-1500:] + stderr[-2500:]).strip(), "wall_s": time.time() - started}
    return json.loads(result_file.read_text()) | {"wall_s": round(time.time() - started, 1)}


def device_info(peak_override: float | None) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return f"CPU ({os.cpu_count()} cores)", peak_override
    name = torch.cuda.get_device_name(0)
    peak = peak_override or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def main() -> None:
    from bench_sft import add_worker_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="2b", help="published Gemma 2 sizes, comma-separated (2b, 9b, 27b)")
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: by its name)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 2 steps: the plumbing, not a measurement")
    parser.add_argument("--json", default=str(HERE / "results_gpu.json"))
    add_worker_arguments(parser, SIDES)
    a = parser.parse_args()
    if a.worker:
        result = (worker_trl(a.model_dir, a.data, a.out, a.steps, a.warmup, TRL_SIDES[a.worker])
                  if a.worker in TRL_SIDES else
                  worker_gemma2_tune(a.model_dir, a.data, a.out, SIDES[a.worker], a.steps, a.warmup))
        Path(a.result).write_text(json.dumps(result))
        return

    import signal

    import torch

    from bench_sft import make_chats

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    device, peak = device_info(a.peak_tflops)
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        sys.exit("no CUDA device: this benchmark measures a GPU (use --smoke to check the plumbing on a CPU)")
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        sys.exit(f"--sides: unknown {', '.join(unknown)} (known: {', '.join(SIDES)})")
    if a.smoke:
        a.shapes, a.rows, a.steps, a.warmup = "smoke", 24, 2, 0
        # flex has no CPU backward, Liger is Triton (GPU) code; compiling is tested by tests/unit/test_compile.py and only
        # costs time on a CPU
        sides = [s for s in sides if s not in CUDA_ONLY]
    summary: dict = {"device": device, "peak_tflops": peak, "steps": a.steps, "warmup": a.warmup, "rows": a.rows,
                     "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft")},
                     "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="gemma2-tune-bench-gpu-") as tmp:
        work = Path(tmp)
        os.environ["GEMMA2_TUNE_HOME"] = str(work / "home")
        for name in a.shapes.split(","):
            shape = shape_for(name, a.smoke)
            model_dir, data = work / f"model-{name}", work / f"chats-{name}.jsonl"
            started = time.time()
            build(model_dir, shape, "cuda" if cuda else "cpu")
            data.write_text("".join(json.dumps(c) + "\n" for c in make_chats(a.rows, shape.vocab)))
            print(f"{name}: {shape.total_params / 1e9:.2f}B parameters built in {time.time() - started:.0f}s", flush=True)
            results = {}
            for side in sides:
                results[side] = run_side(side, model_dir, data, work, a.steps, a.warmup)
                print(f"  {side:18s} {json.dumps(results[side])[:400]}", flush=True)
                # written after every side, so a run stopped by a time limit keeps what it measured
                summary["shapes"][name] = {"parameters": shape.total_params, "sides": results, "complete": False}
                Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
            n = shape.total_params
            for r in results.values():
                if "error" not in r and peak:
                    r["mfu_4n"] = r["tokens_per_s"] * 4 * n / (peak * 1e12)
                    r["mfu_6n"] = r["tokens_per_s"] * 6 * n / (peak * 1e12)
            base = results.get("trl", {})
            for r in results.values():
                if "error" not in r and "error" not in base and base:
                    r["ratio_supervised_tokens_per_s"] = r["supervised_tokens_per_s"] / base["supervised_tokens_per_s"]
            summary["shapes"][name] = {"parameters": n, "sides": results, "complete": True}
            shutil.rmtree(model_dir, ignore_errors=True)  # the 9B shape's weights are ~18 GB
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{device}; peak {peak or 'unknown'} TFLOP/s; {a.steps} steps per side, rates over the last "
          f"{a.steps - a.warmup}")
    print(f"{'shape / side':28s}{'sup tok/s':>11s}{'tok/s':>10s}{'x TRL':>7s}{'MFU 4N':>8s}{'MFU 6N':>8s}"
          f"{'peak GiB':>10s}{'loss':>8s}")
    for name, s in summary["shapes"].items():
        for side, r in s["sides"].items():
            if "error" in r:
                print(f"{name + ' ' + side:28s} failed: {r['error'].splitlines()[-1][:80]}")
                continue
            mfu4 = f"{r['mfu_4n']:.1%}" if "mfu_4n" in r else "-"
            mfu6 = f"{r['mfu_6n']:.1%}" if "mfu_6n" in r else "-"
            ratio = f"{r['ratio_supervised_tokens_per_s']:.2f}" if "ratio_supervised_tokens_per_s" in r else "-"
            loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"
            print(f"{name + ' ' + side:28s}{r['supervised_tokens_per_s']:11,.0f}{r['tokens_per_s']:10,.0f}{ratio:>7s}"
                  f"{mfu4:>8s}{mfu6:>8s}{r['peak_allocated'] / 2**30:10.2f}{loss:>8s}")
    print(f"\nwritten: {a.json}")
    failed = [f"{name} {side}" for name, s in summary["shapes"].items() for side, r in s["sides"].items()
              if "error" in r]
    if failed:
        sys.exit(f"failed sides: {', '.join(failed)}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    main()

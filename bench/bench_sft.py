"""Side-by-side benchmark: plain TRL with the reference Gemma 2 QLoRA recipe vs `gemma2-tune sft` defaults.

    python bench/bench_sft.py                     # full: 256,000-token vocabulary, ~5-10 minutes on 2 CPU cores
    python bench/bench_sft.py --quick             # small smoke run (used by the tests)
    python bench/bench_sft.py --sides trl-packed,gemma2-tune,gemma2-tune-loss-trl --repeats 3 \
        --json bench/results_loss.json            # our loss vs TRL's fused loss, and TRL packed (issue 17, item 6)
    python bench/bench_sft.py --loss-kernels --repeats 3 --json bench/results_loss.json   # the loss path alone

Both sides train the same locally built Gemma 2 (real 256,000-entry vocabulary and tokenizer, small hidden
size and depth so it runs on a CPU; alternating sliding/global layers, soft-caps 50/30), in 4-bit NF4 with
LoRA r=16 on q/k/v/o, eager attention, bf16, lr 2e-4, batch 1 x accumulation 4, max length 1024, one epoch,
on the same synthetic chats (many short rows, some long, user turns included) with the same supervised
tokens: TRL receives the rows already rendered in Gemma's format and masked (labels), so only the training
machinery differs: TRL trains one unpadded row per micro-batch and scores every position through its own
fused loss; gemma2-tune packs rows and scores only supervised positions.

A third side, gemma2-tune with packing off, takes exactly TRL's micro-batches and optimizer steps, so its
final loss shows whether the numerics match. A fourth, gemma2-tune with `training.loss=trl`, is gemma2-tune's
defaults with the loss swapped for TRL 1.16's own (plain SFTTrainer.compute_loss: `model(..., fused_lm_head=True)`,
TRL's chunked log-probabilities with the final soft-cap; on a CPU, without Triton, it scores every position,
not only the supervised ones): against the defaults it isolates the loss path. `trl-packed` is TRL at its best
here: its own packing (best-fit decreasing, padding-free position ids), the reference recipe otherwise.
`--loss-kernels` times the loss alone (forward + backward of lm_head, soft-cap and cross-entropy on one block,
bf16 inputs under autocast), each side in its own process: ours, TRL's fused LM head as it runs on a CPU, and
TRL's kernel given only the supervised positions, as its Triton path selects them on CUDA. `--sides` picks a subset
(the ratios are over the first). Each side runs in its own process, interleaved, `--repeats` times. Reported per run: supervised tokens/s
(supervised tokens / trainer runtime), peak RSS during training (VmHWM reset when training starts) and
its growth over the RSS at that moment (model, data and adapters already loaded: the training memory), and the final loss: mean cross-entropy per supervised token of the
trained adapter over all rows, computed the same way for both. Ratios are gemma2-tune / TRL, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The sides: TRL's reference recipe; gemma2-tune's defaults; gemma2-tune without packing, which takes the
# same micro-batches and optimizer steps as TRL (isolates the loss path; checks numerics).
# TRL at its best here: its own packing (best-fit decreasing, padding-free position ids; transformers masks packed
# rows from position ids under eager, as for gemma2-tune's blocks).
# gemma2-tune with TRL's own loss (everything else as the defaults): our tiles vs TRL's fused path.
SIDES = {"trl": [], "trl-packed": [], "gemma2-tune": [], "gemma2-tune-unpacked": ["data.packing=false"],
         "gemma2-tune-loss-trl": ["training.loss=trl"]}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


# ----------------------------------------------------------------------------- setup (parent process)
def build_tokenizer(vocab: int):
    """A word-level tokenizer with exactly `vocab` entries (w8, w9, ...) and Gemma's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gemma2_tune.data.template import chat_template

    words = {t: i for i, t in enumerate(SPECIALS + ["user", "model"])}
    words.update({f"w{i}": i for i in range(len(words), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                                   chat_template=chat_template())


def build_model(path: Path, vocab: int, hidden: int, layers: int) -> None:
    """A word-level tokenizer with exactly `vocab` entries and a random Gemma 2 with that vocabulary."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    fast = build_tokenizer(vocab)
    config = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, sliding_window=256,
                          max_position_embeddings=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                          pad_token_id=0, eos_token_id=[1, 5], bos_token_id=2, initializer_range=0.05)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)


def make_chats(rows: int, vocab: int, seed: int = 0) -> list[dict]:
    """Realistic mixed lengths: mostly short exchanges, some long ones, a few multi-turn."""
    rng = random.Random(seed)

    def text(n: int) -> str:  # Zipf-like word choice over the whole vocabulary
        return " ".join(f"w{min(vocab - 1, 8 + int(rng.paretovariate(1.1)) % (vocab - 8))}" for _ in range(n))

    chats = []
    for _ in range(rows):
        kind = rng.random()
        if kind < 0.70:
            spans = [(rng.randint(8, 40), rng.randint(5, 40))]
        elif kind < 0.90:
            spans = [(rng.randint(40, 150), rng.randint(30, 150)), (rng.randint(5, 30), rng.randint(10, 60))]
        else:
            spans = [(rng.randint(250, 500), rng.randint(150, 350))]
        messages = []
        for user, model in spans:
            messages += [{"role": "user", "content": text(user)}, {"role": "assistant", "content": text(model)}]
        chats.append({"messages": messages})
    return chats


# ----------------------------------------------------------------------------- workers (one per process)
def rendered_examples(model_dir: str, data: str):
    from gemma2_tune.config.schema import SftDataSection as DataSection
    from gemma2_tune.data.sources import load_rows
    from gemma2_tune.data.examples import build_examples
    from gemma2_tune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows, _ = load_rows(DataSection(dataset=data, max_length=1024))
    examples, report = build_examples(rows, tokenizer, DataSection(dataset=data, max_length=1024))
    return tokenizer, examples, report


def final_loss(model_dir: str, adapter: str, examples) -> float:
    """Mean CE per supervised token over all rows, the model's own loss, identical for both sides."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gemma2_tune.config.sft import SftConfig
    from gemma2_tune.after.evaluate import supervised_loss
    from gemma2_tune.models.quantization import run_bnb_config

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.bfloat16,
                                                quantization_config=run_bnb_config(SftConfig()))
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return supervised_loss(model, examples)["loss"]


def count_training_cpu_seconds() -> dict:
    """CPU seconds (user + system, every thread of this process) spent inside Trainer.train, filled in when it
    returns: on a machine shared with other work, less sensitive to load than wall seconds."""
    import transformers

    spent, train = {}, transformers.Trainer.train

    def timed(self, *args, **kwargs):
        start = time.process_time()
        try:
            return train(self, *args, **kwargs)
        finally:
            spent["cpu_s"] = time.process_time() - start

    transformers.Trainer.train = timed
    return spent


def worker_trl(model_dir: str, data: str, out: str, packing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from gemma2_tune.training.callbacks import PeakMemory, peak_memory

    tokenizer, examples, report = rendered_examples(model_dir, data)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.bfloat16,
                                                 quantization_config=quant)
    args = SFTConfig(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                     learning_rate=2e-4, bf16=True, max_length=1024, gradient_checkpointing=True,
                     num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], seed=42,
                     packing=packing, use_cpu=True, disable_tqdm=True)  # packing: bfd, padding-free
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    train = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    cpu = count_training_cpu_seconds()
    memory = PeakMemory()
    trainer.add_callback(memory)
    result = trainer.train()
    peak, _ = peak_memory()
    trainer.save_model(out)
    runtime = result.metrics["train_runtime"]
    return {"supervised_tokens": report.supervised_tokens, "runtime_s": runtime,
            "supervised_tokens_per_s": report.supervised_tokens / runtime, "train_cpu_s": cpu["cpu_s"],
            "supervised_tokens_per_cpu_s": report.supervised_tokens / cpu["cpu_s"], "peak_rss": peak,
            "peak_growth": peak - memory.start, "steps": trainer.state.global_step,
            "final_loss": final_loss(model_dir, out, examples)}


def worker_gemma2_tune(model_dir: str, data: str, out: str, sets: list[str]) -> dict:
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.training.sft import run_sft

    cfg = resolve(None, [f"model.name_or_path={model_dir}", f"data.dataset={data}", f"output.dir={out}",
                         "training.save_steps=null", "training.logging_steps=1", *sets]).config
    cpu = count_training_cpu_seconds()
    record = run_sft(cfg, echo=lambda line: None)
    t = record["throughput"]
    _, examples, _ = rendered_examples(model_dir, data)
    return {"supervised_tokens": t["supervised_tokens_trained"], "runtime_s": record["training"]["train_runtime_s"],
            "supervised_tokens_per_s": t["supervised_tokens_per_s"], "train_cpu_s": cpu["cpu_s"],
            "supervised_tokens_per_cpu_s": t["supervised_tokens_trained"] / cpu["cpu_s"], "peak_rss": t["peak_memory_bytes"],
            "peak_growth": t["peak_memory_growth_bytes"], "steps": record["global_step"],
            "final_loss": final_loss(model_dir, out, examples)}


# ----------------------------------------------------------------------------- the loss path alone (--loss-kernels)
# Each: (hidden (B, S, H) after the final norm, labels (B, S), lm_head weight (V, H), soft-cap) -> summed loss.
LOSS_SIDES = ("supervised_chunked", "trl-fused-as-on-cpu", "trl-fused-supervised-only")


def loss_kernel_sum(side: str, hidden, labels, weight, softcap):
    """ours: gemma2-tune's fp32 tiles at supervised positions. trl-fused-as-on-cpu: TRL 1.16's fused LM head as it
    runs without Triton (trl/trainer/utils.py add_fused_lm_head: every position scored, ignored ones zeroed).
    trl-fused-supervised-only: the same kernel on the supervised positions only, as TRL selects them on CUDA/XPU
    (there through its Triton folds; here through its torch folds)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

    from gemma2_tune.training.loss import supervised_loss_sum

    if side == "supervised_chunked":
        return supervised_loss_sum(hidden, labels, weight, softcap)[0]
    h, y = hidden[:, :-1], labels[:, 1:]
    mask = y != -100
    if side == "trl-fused-supervised-only":
        h, y = h[mask], y[mask]
    else:
        h, y = h.reshape(-1, h.shape[-1]), y.clamp(min=0).reshape(-1)
    log_probs = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, chunk, softcap, 1.0, ("log_probs",))[0]
    return -(log_probs if side == "trl-fused-supervised-only" else log_probs.view(mask.shape).masked_fill(~mask, 0)).sum()


def worker_loss(side: str, vocab: int, hidden_size: int, tokens: int, supervised: float, steps: int) -> dict:
    """Forward + backward of one side's loss on a (1, tokens) block, bf16 weights and hidden under bf16 autocast
    (as the bench trains): seconds per step (median of `steps` after one warm-up) and peak RSS growth."""
    import torch

    from gemma2_tune.training.callbacks import current_memory, peak_memory, reset_peak_memory

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden_size) * 0.05).bfloat16().requires_grad_()
    hidden = (torch.randn(1, tokens, hidden_size) * 4.0).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    labels[torch.rand(1, tokens) >= supervised] = -100
    times, cpu, value = [], [], None
    reset_peak_memory()
    start = current_memory()
    for _ in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_kernel_sum(side, hidden, labels, weight, 30.0)
        loss.backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        value, hidden.grad, weight.grad = loss.item(), None, None
    peak, _ = peak_memory()
    n = int((labels[:, 1:] != -100).sum())
    step = statistics.median(times[1:])
    cpu_step = statistics.median(cpu[1:])
    return {"seconds_per_step": step, "supervised_tokens_per_s": n / step, "cpu_seconds_per_step": cpu_step,
            "supervised_tokens_per_cpu_s": n / cpu_step, "peak_growth": peak - start,
            "loss_per_token": value / n, "supervised_tokens": n}


def loss_kernels(a) -> None:
    """The loss path alone, each side in its own process, interleaved, `--repeats` times."""
    sides = [s.strip() for s in a.loss_sides.split(",")]
    if any(s not in LOSS_SIDES for s in sides) or sides[0] != LOSS_SIDES[0]:
        sys.exit(f"--loss-sides: from {', '.join(LOSS_SIDES)}, {LOSS_SIDES[0]} first")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="gemma2-tune-bench-loss-") as tmp:
        for r in range(a.repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                result_file = Path(tmp) / f"{side}-{r}.json"
                cmd = [sys.executable, __file__, "--worker-loss", side, "--vocab", str(a.vocab), "--hidden",
                       str(a.hidden), "--tokens", str(a.tokens), "--supervised", str(a.supervised), "--steps",
                       str(a.steps), "--result", str(result_file)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
                runs[side].append(json.loads(result_file.read_text()) | {"load_avg_1m": os.getloadavg()[0]})
                print(f"repeat {r + 1} {side:26s} " + json.dumps(runs[side][-1]), flush=True)
    keys = ("seconds_per_step", "supervised_tokens_per_s", "cpu_seconds_per_step", "supervised_tokens_per_cpu_s",
            "peak_growth", "loss_per_token")
    spread = {s: {k: {"min": min(x[k] for x in v), "median": statistics.median(x[k] for x in v),
                      "max": max(x[k] for x in v)} for k in keys} for s, v in runs.items()}
    ratios = {s: {k: spread[s][k]["median"] / spread["supervised_chunked"][k]["median"] for k in keys}
              for s in sides[1:]}
    summary = {"setup": {"vocab": a.vocab, "hidden": a.hidden, "tokens": a.tokens, "supervised_fraction": a.supervised,
                         "steps": a.steps, "repeats": a.repeats, "machine": f"{os.cpu_count()} CPU cores",
                         "started": started, "load_avg_1m_after": os.getloadavg()[0]},
               "runs": runs, "min_median_max": spread, "ratio_over_supervised_chunked": ratios}
    path = Path(a.json)
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.setdefault("loss_kernels", []).append(summary)  # several shapes accumulate in one file
    path.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"\nloss alone, V={a.vocab} H={a.hidden}, {a.tokens} tokens, {a.supervised:.0%} supervised; "
          f"min / median / max over {a.repeats} repeats (ratio of medians over supervised_chunked)")
    for key, label, scale in (("supervised_tokens_per_s", "supervised tok/s", 1),
                              ("supervised_tokens_per_cpu_s", "supervised tok/CPU-s", 1),
                              ("peak_growth", "peak growth MiB", 2**20)):
        for side in sides:
            m = spread[side][key]
            ratio = "" if side == sides[0] else f"  ({ratios[side][key]:.2f})"
            print(f"{label:22s}{side:28s}{m['min'] / scale:10.1f}{m['median'] / scale:10.1f}{m['max'] / scale:10.1f}"
                  f"{ratio}")
    print(f"\nwritten: {path}")


# ----------------------------------------------------------------------------- driver
def run_side(side: str, model_dir: Path, data: Path, work: Path, sets: list[str]) -> dict:
    out = work / f"{side}-{time.time_ns()}"
    result_file = out.with_suffix(".json")
    cmd = [sys.executable, __file__, "--worker", side, "--model-dir", str(model_dir), "--data", str(data),
           "--out", str(out), "--result", str(result_file), *sum((["--set", s] for s in sets), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        sys.exit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def add_worker_arguments(parser, sides) -> None:
    """The arguments the parent passes to a side's own process (--worker SIDE and where its files are); the
    GPU benchmark uses the same protocol."""
    parser.add_argument("--worker", choices=list(sides))
    parser.add_argument("--model-dir")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--result")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--json", default=str(HERE / "results.json"))
    add_worker_arguments(parser, SIDES)
    parser.add_argument("--set", action="append", default=[], help="extra gemma2-tune setting (key=value); "
                        "the default compares against gemma2-tune's defaults")
    parser.add_argument("--only", choices=list(SIDES), help="run one side (exploration, no ratios)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to run; ratios are over the first "
                        f"(default: all: {','.join(SIDES)})")
    parser.add_argument("--loss-kernels", action="store_true", help="the loss path alone: ours vs TRL's fused LM "
                        "head (as it runs here, and on supervised positions only as on CUDA); writes 'loss_kernels' "
                        "into --json")
    parser.add_argument("--worker-loss", choices=LOSS_SIDES)
    parser.add_argument("--loss-sides", default=",".join(LOSS_SIDES), help="--loss-kernels: the sides, "
                        f"{LOSS_SIDES[0]} first (default: all)")
    parser.add_argument("--tokens", type=int, default=4096, help="--loss-kernels: tokens in the batch")
    parser.add_argument("--supervised", type=float, default=0.5, help="--loss-kernels: supervised fraction")
    parser.add_argument("--steps", type=int, default=3, help="--loss-kernels: timed steps after one warm-up")
    a = parser.parse_args()
    if a.worker_loss:
        Path(a.result).write_text(json.dumps(worker_loss(a.worker_loss, a.vocab, a.hidden, a.tokens, a.supervised,
                                                         a.steps)))
        return
    if a.loss_kernels:
        if a.quick:
            a.vocab, a.tokens, a.repeats, a.steps = 4096, 256, 1, 1
        return loss_kernels(a)
    if a.worker:
        result = worker_trl(a.model_dir, a.data, a.out, packing=a.worker == "trl-packed") if a.worker.startswith(
            "trl") else worker_gemma2_tune(
            a.model_dir, a.data, a.out, a.set + SIDES[a.worker])
        Path(a.result).write_text(json.dumps(result))
        return
    sides = [a.only] if a.only else [s.strip() for s in a.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)}")
    base = sides[0]
    if a.quick:
        a.rows, a.vocab, a.repeats = 12, 4096, 1
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gemma2-tune-bench-") as tmp:
        work = Path(tmp)
        model_dir, data = work / "model", work / "chats.jsonl"
        build_model(model_dir, a.vocab, a.hidden, a.layers)
        data.write_text("".join(json.dumps(c) + "\n" for c in make_chats(a.rows, a.vocab)))
        os.environ["GEMMA2_TUNE_HOME"] = str(work / "home")  # a cold tokenized-data cache for every run
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(a.repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):  # interleaved, order alternating
                runs[side].append(run_side(side, model_dir, data, work, a.set) | {"load_avg_1m": os.getloadavg()[0]})
                print(f"repeat {r + 1} {side:22s} " + json.dumps(runs[side][-1]), flush=True)
    if a.only:
        return
    metrics = ("supervised_tokens_per_s", "supervised_tokens_per_cpu_s", "peak_rss", "peak_growth", "final_loss",
               "steps")
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in runs.items()}
    spread = {s: {k: {"min": min(x[k] for x in v), "median": med[s][k], "max": max(x[k] for x in v)} for k in metrics}
              for s, v in runs.items()}
    ratios = {s: {k: med[s][k] / med[base][k] for k in metrics} for s in sides if s != base}
    summary = {"setup": {"rows": a.rows, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers,
                         "repeats": a.repeats, "gemma2_tune_sets": a.set, "sides": sides,
                         "machine": f"{os.cpu_count()} CPU cores", "started": started,
                         "load_avg_1m_before": load_before[0], "load_avg_1m_after": os.getloadavg()[0]},
               "runs": runs, "median": med, "min_median_max": spread, f"ratio_over_{base}": ratios}
    if {"gemma2-tune", "gemma2-tune-loss-trl"} <= set(sides):
        # The loss path alone: TRL's fused loss over ours, everything else equal (medians, and per repeat)
        ours, theirs = runs["gemma2-tune"], runs["gemma2-tune-loss-trl"]
        summary["loss_trl_over_supervised_chunked"] = {
            k: {"median": med["gemma2-tune-loss-trl"][k] / med["gemma2-tune"][k],
                "per_repeat": [t[k] / o[k] for o, t in zip(ours, theirs)]} for k in metrics}
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    rows = (("supervised_tokens_per_s", "supervised tokens/s", 1), ("supervised_tokens_per_cpu_s", "supervised tok/CPU-s", 1),
            ("peak_rss", "peak RSS MiB", 2**20),
            ("peak_growth", "peak growth MiB", 2**20), ("final_loss", "final loss", 1), ("steps", "optimizer steps", 1))
    others = [s for s in sides if s != base]
    print(f"\nmedians (ratio over {base}); {a.repeats} repeats, interleaved")
    print(f"{'':22s}{base:>14s}" + "".join(f"{s:>28s}" for s in others))
    for key, label, scale in rows:
        print(f"{label:22s}{med[base][key] / scale:14.2f}"
              + "".join(f"{med[s][key] / scale:20.2f} ({ratios[s][key]:5.2f})" for s in others))
    print("\nmin / median / max")
    for side in sides:
        for key, label, scale in rows[:4]:
            m = spread[side][key]
            print(f"{side:22s}{label:22s}{m['min'] / scale:10.2f}{m['median'] / scale:10.2f}{m['max'] / scale:10.2f}")
    if "loss_trl_over_supervised_chunked" in summary:
        print("\ntraining.loss=trl over supervised_chunked (medians; per repeat):")
        for key, label, _ in rows:
            x = summary["loss_trl_over_supervised_chunked"][key]
            print(f"{label:22s}{x['median']:8.3f}   " + " ".join(f"{v:.3f}" for v in x["per_repeat"]))
    print(f"\nwritten: {a.json}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()

"""What a finished run leaves for people: a loss/learning-rate plot and a model card (README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.schema import RunConfig


def plot_run(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """loss.png: train loss (and eval loss) against step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    lrs = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (model-turn tokens)")
    ax.grid(alpha=0.3)
    if lrs:
        lr_ax = ax.twinx()
        lr_ax.plot(*zip(*lrs), "--", color="tab:gray", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lines = ax.get_lines() + lr_ax.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    else:
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def model_card(cfg: RunConfig, record: dict[str, Any], out: Path) -> str:
    """README.md of a run folder (Hugging Face model card front matter): base, data, recipe, numbers, how to load."""
    m, d, t = record.get("model", {}), record.get("data", {}), record.get("training", {})
    speed = record.get("throughput", {})
    adapter = cfg.lora.enabled
    base = cfg.base_model
    quant = "4-bit NF4 QLoRA" if cfg.quantization.load_in_4bit else ("LoRA" if adapter else "full fine-tuning")
    auto = "SequenceClassification" if cfg.head == "sequence-classification" else "CausalLM"
    load = (f'''```python
from peft import AutoPeftModelFor{auto}
from transformers import AutoTokenizer
model = AutoPeftModelFor{auto}.from_pretrained("{out}", {"num_labels=1, " if cfg.head == "sequence-classification" else ""}attn_implementation="{cfg.model.attn_implementation}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```''' if adapter else f'''```python
from transformers import AutoModelFor{auto}, AutoTokenizer
model = AutoModelFor{auto}.from_pretrained("{out}", attn_implementation="{cfg.model.attn_implementation}", dtype="bfloat16")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```''')
    if cfg.head == "sequence-classification":
        load += ("\n\nA reward model: `model(**tokenizer.apply_chat_template(messages, return_dict=True, "
                 "return_tensors='pt')).logits[0, 0]` is the score of a conversation ending with a model turn. Gemma 2's "
                 "final soft-cap belongs to the language-model head and does not apply to the score.")
    eval_line = f"\n- final eval loss: {t['final_eval_loss']:.4f}" if t.get("final_eval_loss") is not None else ""
    return f"""---
base_model: {base}
library_name: {"peft" if adapter else "transformers"}
tags: [{m.get("family", "gemma2")}, gemma2-tune, {record.get("command", "sft")}]
---

# {out.name}

{quant} of `{base}` with gemma2-tune {record.get("versions", {}).get("gemma2-tune", "")}, on
`{record.get("dataset", {}).get("name")}` (fingerprint `{record.get("dataset", {}).get("fingerprint")}`).

- attention: {m.get("attn_implementation")} (soft-caps: attention {m.get("attention_softcap")}, final {m.get("final_softcap")})
- adapters: {f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}" if adapter else "none (all weights trained)"}
- data: {d.get("rows_kept")} rows kept of {d.get("rows_read")} ({d.get("rows_bad")} bad, {d.get("rows_truncated")} truncated), {d.get("supervised_tokens")} supervised tokens; {cfg.data.describe()}
- training: {record.get("global_step")} steps, lr {cfg.training.learning_rate:g}, loss {_num(t.get("first_loss"))} -> {_num(t.get("final_loss"))}{eval_line}
- throughput: {speed.get("supervised_tokens_per_s") or 0:,.0f} supervised tokens/s over {_num(t.get("train_runtime_s"), 1)} s of training; launch {record.get("launch", {}).get("mode")} x {record.get("launch", {}).get("num_processes")}

The exact settings are in `config.yaml`; everything recorded about the run is in `run.json`; `loss.png`
plots the loss and learning rate.

## Use

Prompts must use Gemma's turn format, which the saved chat template renders:
`<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`; generation ends at `<end_of_turn>`.
Load it with the attention kernel it was trained with ({cfg.model.attn_implementation}){"; eager keeps Gemma 2's soft-capping" if m.get("attention_softcap") else ""}.

{load}

Or: `gemma2-tune chat --adapter {out}` / `gemma2-tune merge --adapter {out} --output merged/{out.name}`.
"""


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"

"""An exponential moving average (EMA) of the trainable weights during training (training.ema_decay).

Gemma 2's instruction-tuned models were finished with WARP (Ramé et al., 2024, "WARP: On the Benefits of
Weight Averaged Rewarded Policies", arXiv:2406.16768), whose first stage keeps an EMA of the policy while it
trains. Here, with decay d and the trainable weights theta_t after optimizer step t:

    ema_0 = theta_0 (the weights before the first step)
    ema_t = d * ema_t-1 + (1 - d) * theta_t

kept in float32 (in bf16, updates of (1 - d) * delta below bf16's resolution would be lost) on the weights'
device. Only the trainable weights are averaged (the LoRA matrices of a QLoRA run, every weight of a full
fine-tune), so the average costs 4 bytes per trainable parameter. Each checkpoint carries it (`ema.safetensors`,
written before the checkpoint is marked complete), so a resumed run continues the same average; the run
writes it at the end as a second adapter or model in `ema/`, usable wherever the run folder is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import TrainerCallback

from ..errors import UserError
from ..models.tokenizer_files import SENTENCEPIECE_MODEL

STATE_FILE = "ema.safetensors"
FOLDER = "ema"


class ExponentialMovingAverage(TrainerCallback):
    """Keeps the EMA of `model`'s trainable weights, one update per optimizer step.

    `resume_from`: the checkpoint a resumed run continues from (its ema.safetensors is loaded; UserError when
    it has none). `updates` counts the optimizer steps averaged so far.
    """

    def __init__(self, decay: float, resume_from: Path | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.resume_from = resume_from
        self.names: list[str] = []
        self.params: list = []
        self.average: list = []
        self.updates = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ARG002
        import torch

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if self.resume_from is None:
            self.average = [p.detach().to(torch.float32).clone() for p in self.params]
            self.updates = 0
            return
        self.average, self.updates = load_state(self.resume_from, self.names, [p.device for p in self.params])

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        import torch

        with torch.no_grad():
            current = [p.detach().to(torch.float32) for p in self.params]
            torch._foreach_lerp_(self.average, current, 1.0 - self.decay)  # ema += (1 - d) * (theta - ema)
        self.updates += 1

    def on_save(self, args, state, control, **kwargs):  # noqa: ARG002
        if state.is_world_process_zero:
            save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.names, self.average,
                       self.updates, self.decay)

    def swapped_in(self):
        """Context manager: the model's trainable weights hold the average (cast to their dtype) inside it."""
        import contextlib

        import torch

        @contextlib.contextmanager
        def swap():
            kept = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, a in zip(self.params, self.average):
                    p.copy_(a.to(p.dtype))
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, k in zip(self.params, kept):
                        p.copy_(k)

        return swap()

    def describe(self) -> dict:
        """The manifest's `ema` section."""
        return {"decay": self.decay, "updates": self.updates, "folder": FOLDER,
                "trainable_parameters": sum(p.numel() for p in self.params), "kept_in": "float32"}


def save_state(checkpoint: Path, names: list[str], average: list, updates: int, decay: float) -> None:
    """Write the average into a checkpoint folder: {name: float32 tensor} + metadata."""
    from safetensors.torch import save_file

    checkpoint.mkdir(parents=True, exist_ok=True)
    tensors = {n: a.detach().cpu().contiguous() for n, a in zip(names, average)}
    save_file(tensors, str(checkpoint / STATE_FILE), metadata={"updates": str(updates), "decay": repr(decay)})


def load_state(checkpoint: Path, names: list[str], devices: list) -> tuple[list, int]:
    """The average saved in `checkpoint`, in `names`' order. Raises UserError when it is missing or does not
    hold the same weights."""
    from safetensors import safe_open

    path = checkpoint / STATE_FILE
    earlier = "; resume from an earlier checkpoint with --resume-from, or start again"
    if not path.is_file():
        raise UserError(f"{path}: missing, so the average of training.ema_decay cannot be continued{earlier}")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = set(f.keys())
            if saved != set(names):
                missing, extra = sorted(set(names) - saved)[:3], sorted(saved - set(names))[:3]
                raise UserError(f"{path}: holds other weights than the model trains (missing {missing}, unexpected "
                                f"{extra}){earlier}")
            average = [f.get_tensor(n).to(d) for n, d in zip(names, devices)]
            updates = int((f.metadata() or {}).get("updates", "0"))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file: one message, not a traceback
        raise UserError(f"{path}: unreadable ({str(exc).splitlines()[0][:200]}){earlier}") from None
    return average, updates


def write_ema_folder(ema: ExponentialMovingAverage, trainer, out: Path, main: bool) -> Path:
    """Save the average as `out/ema/` (an adapter or a model, like the run's own output), with the tokenizer and
    the resolved config copied from the run folder, so `chat`, `merge`, `eval` and `merge-models` accept it."""
    target = out / FOLDER
    with ema.swapped_in():
        trainer.save_model(str(target))
    if main:
        for name in ("tokenizer.json", SENTENCEPIECE_MODEL, "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "config.yaml"):
            if (out / name).is_file():
                shutil.copy2(out / name, target / name)
        (target / "ema.json").write_text(json.dumps(ema.describe() | {"run": str(out.resolve())}, indent=2) + "\n")
        (target / "README.md").write_text(  # instead of the blank card the adapter's save writes
            f"# Exponential moving average of the run in `..`\n\nThe trainable weights of the run averaged over its "
            f"{ema.updates} optimizer steps with decay {ema.decay} (ema_t = d * ema_(t-1) + (1 - d) * theta_t, from the "
            f"weights before the first step). Use this folder wherever the run folder is used: `gemma2-tune chat "
            f"--adapter {target}`, `merge`, `eval --compare`, `merge-models`, `serve`. See `../README.md` for the run.\n")
    return target

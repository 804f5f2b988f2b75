"""`gemma2-tune sft`: supervised fine-tuning; the pieces the run lifecycle (lifecycle.train) asks of it.

data: conversations -> Gemma turns -> tokenized, masked, packed blocks (before anything is written); model
(checked) -> SFTTrainer (LoRA applied, placement checked, the supervised-only loss) -> kernels, compiled
layers -> a final held-out evaluation. Every rank runs this; only the main process writes shared files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config.sft import SftConfig
from ..data.template import template_record
from ..families import Shape
from ..models.loading import LoadRequest, load_model
from ..models.lora import inspect_adapters
from .batching import MicroBatch, gpu_memory, micro_batch
from .setup import base_model
from .compiling import compile_layers
from .data import TrainingData, blocks_dataset, data_collator, prepare_data
from . import lifecycle
from .describe import count
from .kernels import apply_kernel_settings, check_kernel_settings
from .launch import Launch
from .lifecycle import RunLifecycle
from .trainer import build_trainer, device_map, effective_loss, trainer_args

Echo = Callable[[str], None]


class Runner(lifecycle.Runner):
    """sft's pieces: conversations -> tokenized, masked, packed blocks; the model (checked); SFTTrainer with the
    supervised-only loss, kernels and compiled layers as configured; a final held-out evaluation."""

    cfg: SftConfig

    def prepare(self, launch: Launch, out: Path):
        """Family and kernel from the checkpoint's config (no weights), the loss and kernel settings, the
        micro-batch; returns SFTConfig."""
        cfg = self.cfg
        self.launch = launch
        base = base_model(cfg)  # config only; its tokenizer is read with the data (training/data.py)
        family, hf_config = base.family, base.config
        self.family, self.loss = family, effective_loss(cfg, launch)
        check_kernel_settings(cfg, family, self.loss)
        self.micro = micro_batch(cfg, Shape.from_config(hf_config.to_dict()), launch, gpu_memory())
        return trainer_args(cfg, out, launch, self.micro)

    def load_data(self, run: RunLifecycle) -> dict[str, Any]:
        """Rows -> blocks (cached), the run's chat template on the tokenizer."""
        cfg = self.cfg
        data = self.data = prepare_data(cfg, self.family, run.say, run.state)
        self.tokenizer, self.data_report, self.base_chat_template = data.tokenizer, data.report, data.base_chat_template
        return data_record(cfg, data) | {
            "loss_implementation": self.loss, "micro_batch": self.micro.to_dict(),
            "chat_template": template_record(data.family, cfg, data.base_chat_template, data.empty_thought)}

    def build(self, run: RunLifecycle, args):
        """The model through the one loading path, SFTTrainer (LoRA applied by TRL, placement checked), then
        the kernel settings and compiled layers."""
        cfg, data, launch = self.cfg, self.data, self.launch
        model, report = load_model(LoadRequest.for_run(cfg, device_map(cfg, launch, run.state.local_process_index)))
        self.eval_set = blocks_dataset(data.eval_blocks) if data.eval_blocks else None
        trainer = build_trainer(cfg, model, data.tokenizer, blocks_dataset(data.blocks), args, launch, self.eval_set,
                                data_collator(data, cfg.model.dtype))
        inspect_adapters(trainer.model, cfg, report)
        run.record_model(report)
        # before compiling: the compiled layers then include Liger's kernels
        run.record["kernels"] = apply_kernel_settings(trainer, cfg, self.family, self.loss, run.say)
        if cfg.training.torch_compile == "regional":
            run.record["compiled"] = compiled = compile_layers(trainer.model, cfg.model.dtype)
            run.say(f"compiled {compiled['compiled_layers']} decoder layers (torch.compile, regional); probe vs eager: "
                    f"logits max |difference| {compiled['probe_max_abs_logit_diff']:.2e}, gradients "
                    f"{compiled['probe_max_rel_grad_diff']:.2e} of the largest")
        return trainer

    def before_training(self, run: RunLifecycle, checkpoint) -> None:
        say_plan(self.cfg, run, self.data, checkpoint, self.micro)

    def after_training(self, run: RunLifecycle, trainer) -> None:
        """The final held-out loss and the eval curve, when rows are held out; an image + text checkpoint's image
        processor beside the weights (chat, serve, merge and export read it there)."""
        if self.data.images is not None and run.main:
            self.data.images.save(run.out)
        if self.eval_set is not None:
            run.record["training"]["final_eval_loss"] = trainer.evaluate()["eval_loss"]
            run.record["training"]["eval_history"] = [{"step": e["step"], "eval_loss": e["eval_loss"]}
                                                      for e in trainer.state.log_history if "eval_loss" in e]


def run_sft(cfg: SftConfig, echo: Echo = print, recipe: Path | str | None = None, resume: bool = False,
            resume_from: str | None = None) -> dict[str, Any]:
    """Train as `cfg` says through the run lifecycle; returns the run's manifest (also output.dir/run.json).
    Raises UserError (anything the user can fix), Interrupted (SIGTERM or Ctrl-C, checkpoint saved)."""
    return lifecycle.train(Runner(cfg), echo, recipe, resume, resume_from)


def data_record(cfg: SftConfig, data: TrainingData) -> dict[str, Any]:
    """The manifest's `dataset` and `data` sections."""
    source, report = data.source, data.report
    return {
        "dataset": {"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                    "fingerprint": source.fingerprint, "split": cfg.data.split},
        "data": report.to_dict() | {"packing": cfg.data.packing, "blocks": len(data.blocks),
                                     "cache": {"key": data.cache_key, "hit": data.cache_hit},
                                     "eval": data.eval_report.to_dict() if data.eval_report else None},
    }


def say_plan(cfg: SftConfig, run: RunLifecycle, data: TrainingData, checkpoint, micro: MicroBatch) -> None:
    """The launch, the loss and the tokens per optimizer step, before the first step."""
    t = cfg.training
    items_per_step = cfg.rows_per_optimizer_step * run.state.num_processes
    unit = "block" if cfg.data.packing else "row"
    run.say(f"launch: {run.launch.describe()}; loss: {run.record['loss_implementation']}")
    run.say(f"training: {count(data.report.rows_kept, 'row')} in {count(len(data.blocks), unit)}, "
            f"{count(items_per_step, unit)} per optimizer step (batch {t.per_device_train_batch_size} x accumulation {t.gradient_accumulation_steps} "
            f"x {run.state.num_processes} processes), at most {cfg.data.max_length * items_per_step} tokens per step"
            + (f"; resuming from {checkpoint.path} (step {checkpoint.step})" if checkpoint else ""))
    run.say(f"running: {micro.describe()}")

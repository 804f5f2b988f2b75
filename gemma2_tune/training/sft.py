"""`gemma2-tune sft`: supervised fine-tuning, read as setup -> train -> save.

config -> launch and output checks -> data (before anything is written) -> output folder -> model
(checked) -> SFTTrainer (LoRA applied, placement checked) -> train (checkpoints, SIGTERM) -> adapter or
model, tokenizer, manifest, plot, card. Every rank runs this; only the main process writes shared files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from transformers import set_seed

from ..config.schema import RunConfig
from ..families import Shape
from ..models.checks import check_kernel_request
from ..models.loading import LoadRequest, checkpoint_family, load_model
from ..models.lora import inspect_adapters
from .batching import MicroBatch, gpu_memory, micro_batch
from .compiling import compile_layers
from .data import TrainingData, blocks_dataset, prepare_data
from .describe import count
from .kernels import apply_kernel_settings, check_kernel_settings
from .launch import current_launch
from .lifecycle import RunLifecycle
from .trainer import build_trainer, device_map, effective_loss, trainer_args

Echo = Callable[[str], None]


def run_sft(cfg: RunConfig, echo: Echo = print, recipe: Path | str | None = None, resume: bool = False,
            resume_from: str | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns the run's manifest (also written to output.dir/run.json).

    Raises UserError for anything the user can fix (launch, output folder, data, model), found before
    training where possible, and Interrupted (exit 143) after a SIGTERM once a checkpoint is saved.
    """
    # setup
    launch = current_launch()
    run = RunLifecycle(cfg, "sft", echo, launch, recipe, resuming=resume or bool(resume_from))
    m = cfg.model
    family, hf_config = checkpoint_family(m.name_or_path, m.revision, m.trust_remote_code)  # config only, no weights
    check_kernel_request(family, m.attn_implementation, training=True)
    loss = effective_loss(cfg, launch)
    check_kernel_settings(cfg, family, loss)
    micro = micro_batch(cfg, Shape.from_config(hf_config.to_dict()), launch, gpu_memory())
    args = trainer_args(cfg, run.out, launch, micro)  # before any process state: makes ZeRO-3 load weights sharded
    run.join()
    checkpoint = run.resume_point(resume, resume_from)
    set_seed(cfg.training.seed)
    data = prepare_data(cfg, family, run.say, run.state)
    run.start(**data_record(cfg, data), loss_implementation=loss, micro_batch=micro.to_dict(),
              chat_template={"generated_for": data.family.key, "system_policy": cfg.data.system_policy,
                             "replaced_base_template": data.base_chat_template is not None})
    with run.attempt():
        model, report = load_model(LoadRequest.for_run(cfg, device_map(cfg, launch, run.state.local_process_index)))
        eval_set = blocks_dataset(data.eval_blocks) if data.eval_blocks else None
        trainer = build_trainer(cfg, model, data.tokenizer, blocks_dataset(data.blocks), args, launch, eval_set)
        inspect_adapters(trainer.model, cfg, report)
        run.record_model(report)
        # before compiling: the compiled layers then include Liger's kernels
        run.record["kernels"] = apply_kernel_settings(trainer, cfg, family, loss, run.say)
        if cfg.training.torch_compile == "regional":
            run.record["compiled"] = compile_layers(trainer.model, cfg.model.dtype)
            compiled = run.record["compiled"]
            run.say(f"compiled {compiled['compiled_layers']} decoder layers (torch.compile, regional); probe vs eager: "
                    f"logits max |difference| {compiled['probe_max_abs_logit_diff']:.2e}, gradients "
                    f"{compiled['probe_max_rel_grad_diff']:.2e} of the largest")
        say_plan(cfg, run, data, checkpoint, micro)

        # train
        stop = run.attach(trainer)
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
        run.finish_training(trainer, data.report, result.metrics.get("train_runtime"), stop.stopped)
        if eval_set is not None:
            run.record["training"]["final_eval_loss"] = trainer.evaluate()["eval_loss"]
            run.record["training"]["eval_history"] = [{"step": e["step"], "eval_loss": e["eval_loss"]}
                                                      for e in trainer.state.log_history if "eval_loss" in e]

        # save
        run.save(trainer, data.tokenizer, data.base_chat_template)
    for line in run.summary_lines():
        run.say(line)
    return run.record


def data_record(cfg: RunConfig, data: TrainingData) -> dict[str, Any]:
    """The manifest's `dataset` and `data` sections."""
    source, report = data.source, data.report
    return {
        "dataset": {"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                    "fingerprint": source.fingerprint, "split": cfg.data.split},
        "data": report.to_dict() | {"packing": cfg.data.packing, "blocks": len(data.blocks),
                                     "cache": {"key": data.cache_key, "hit": data.cache_hit},
                                     "eval": data.eval_report.to_dict() if data.eval_report else None},
    }


def say_plan(cfg: RunConfig, run: RunLifecycle, data: TrainingData, checkpoint, micro: MicroBatch) -> None:
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

"""`gemma2-tune distill`: on-policy knowledge distillation from a larger Gemma to a smaller one.

The student generates completions for the prompts and learns to match the teacher's next-token
distribution on them (generalized Jensen-Shannon divergence, Agarwal et al. 2024, "On-Policy Distillation of
Language Models"; the Gemma 2 report, arXiv 2408.00118, post-trained its smaller models this way). Built on
TRL's DistillationTrainer, which computes the divergence on both models' soft-capped logits (the 30.0 final
cap), over the generated completion tokens only, with the same temperature on both sides. Around it: the
same config layering, run lifecycle, checks on both models, launches, checkpoints and resume as `sft`.

setup (both models' families, tokenizer and vocabulary checked before any weights load) -> prompts ->
student (QLoRA or full) + teacher (4-bit, 8-bit or full precision; frozen, eval) -> train -> save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import trl.trainer.distillation_trainer as trl_distillation
from transformers import PrinterCallback
from trl import DistillationConfig, DistillationTrainer

from ..config.distill import DistillConfig
from ..config.memory import divergence_rows
from ..data.prompts import build_prompts
from ..data.sources import load_rows
from ..data.template import template_record
from ..data.turns import end_of_turn
from ..errors import UserError
from ..models.checks import check_kernel_request, text_config, vocabulary_digest
from ..models.loading import LoadRequest, checkpoint_family, load_model, load_tokenizer
from ..models.lora import inspect_adapters, lora_config
from ..models.serving import stop_ids
from . import lifecycle
from .data import split_rows
from .divergence import divergence_loss, divergence_problem
from .generation import CountingGeneration, run_total
from .launch import Launch
from .lifecycle import RunLifecycle
from .trainer import common_args, device_map, has_accelerator, keep_adapters_in_fp32

Echo = Callable[[str], None]


class GemmaDistillationTrainer(CountingGeneration, DistillationTrainer):
    """TRL's DistillationTrainer, counting what on-policy generation costs (training/generation.py), its divergence
    computed by training/divergence.py where `completion_rows` says so (use_divergence)."""

    completion_rows = False

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's _compute_loss runs both backbones and reads both heads, then calls its module's
        # _chunked_divergence_loss; ours takes that call (same arguments, same returns) for the length of this one
        if not self.completion_rows:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        trl_divergence = trl_distillation._chunked_divergence_loss
        trl_distillation._chunked_divergence_loss = divergence_loss
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            trl_distillation._chunked_divergence_loss = trl_divergence


def use_divergence(trainer: GemmaDistillationTrainer, cfg: DistillConfig, launch: Launch) -> dict[str, str]:
    """Which divergence the trainer computes (distill.loss; TRL's where ours would differ: divergence_problem).
    Returns run.json's record {"loss": "completion_rows" | "trl", "reason": why}."""
    from trl.kernels.chunked_logprob import _use_triton

    from ..models.lora import base_model

    asked = cfg.distill.loss
    head = trainer.model.get_output_embeddings().weight
    device = head.device
    if asked == "trl" or (asked == "auto" and _use_triton(device)):
        reason = ("asked (distill.loss=trl)" if asked == "trl" else
                  f"distill.loss=auto on {device.type} with Triton: TRL's Triton kernels (ours is not measured on a "
                  "GPU)")
        return {"loss": "trl", "reason": reason}
    # the teacher as TRL's own loss reads it: under DeepSpeed (any stage) TRL wraps it in an engine
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    problem = divergence_problem(base_model(trainer.model), teacher, sharded=launch.shards_parameters)
    if problem:
        return {"loss": "trl", "reason": problem}
    trainer.completion_rows = True
    rows = divergence_rows(head.shape[1], teacher.get_output_embeddings().weight.shape[1])
    return {"loss": "completion_rows", "reason": f"generated positions only, whole vocabulary rows in fp32 blocks of "
            f"{rows}, one lm_head pass per model"}


def describe_divergence(record: dict[str, str]) -> str:
    """use_divergence's record in words."""
    if record["loss"] == "completion_rows":
        return f"completion_rows ({record['reason']})"
    return f"TRL's chunked divergence ({record['reason']})"


def distill_args(cfg: DistillConfig, out: Path, launch: Launch, *stop: int) -> DistillationConfig:
    """TRL's DistillationConfig from the resolved config (built before any model loads, as for sft); `stop`: the
    token ids generation stops at (models.serving.stop_ids)."""
    d = cfg.distill
    return DistillationConfig(
        **common_args(DistillationConfig, cfg, out, launch, evaluate=bool(cfg.data.eval_fraction)),
        beta=d.beta,
        temperature=d.temperature,
        max_completion_length=d.max_completion_length,
        top_p=d.top_p,
        top_k=d.top_k,
        # generation stops at the end of a turn (a base checkpoint's generation config may know only <eos>)
        generation_kwargs={"eos_token_id": list(stop)},
    )


def check_teacher(cfg: DistillConfig, student_family, student_config, student_tokenizer):
    """The teacher's family, vocabulary and tokenizer against the student's, from configs and tokenizers
    only (no weights). Returns its family; raises UserError naming the difference."""
    t = cfg.teacher
    try:
        family, config = checkpoint_family(t.name_or_path, t.revision, t.trust_remote_code)
    except UserError as exc:
        raise UserError(exc.message.replace("model.name_or_path", "teacher.name_or_path", 1)) from None
    if family is not student_family:
        raise UserError(f"teacher.name_or_path: '{t.name_or_path}' is {family.display}, the student is "
                        f"{student_family.display}: distillation needs one tokenizer and vocabulary")
    vocab, student_vocab = text_config(config).vocab_size, text_config(student_config).vocab_size
    if vocab != student_vocab:
        raise UserError(f"teacher.name_or_path: vocabulary of {vocab:,} entries, the student's has "
                        f"{student_vocab:,}: the divergence compares distributions over one vocabulary")
    teacher_tokenizer = load_tokenizer(t.name_or_path, t.revision, t.trust_remote_code, family)
    if vocabulary_digest(teacher_tokenizer) != vocabulary_digest(student_tokenizer):
        raise UserError(f"teacher.name_or_path: '{t.name_or_path}' has another tokenizer than the student "
                        f"'{cfg.model.name_or_path}' (same vocabulary size, different tokens): token ids would not "
                        "mean the same thing")
    check_kernel_request(family, t.attn_implementation)
    return family


def teacher_request(cfg: DistillConfig, launch: Launch, local_rank: int) -> LoadRequest:
    """How the teacher loads: its precision (4-bit NF4 with the student's 4-bit settings, 8-bit, or unquantized
    in model.dtype), its kernel, never trained. Quantized weights are placed at load time, one copy per process;
    unquantized ones are placed by the trainer (sharded under ZeRO-3)."""
    t, q = cfg.teacher, cfg.quantization
    bits = None if t.load_in == "full" else t.load_in
    device = {"": local_rank} if bits and has_accelerator() and not launch.places_weights else None
    return LoadRequest(t.name_or_path, t.revision, t.trust_remote_code, cfg.model.dtype, t.attn_implementation,
                       bits, q.quant_type, q.double_quant, cfg.compute_dtype, cfg.quant_storage, device)


class Runner(lifecycle.Runner):
    """distill's pieces: both models' families, tokenizers and vocabularies checked before any weights load;
    prompts; the student (QLoRA or full) and the teacher (4-bit, 8-bit or full; frozen, eval); TRL's
    DistillationTrainer; generation totals in run.json."""

    cfg: DistillConfig

    def prepare(self, launch: Launch, out: Path) -> DistillationConfig:
        """Student and teacher checked from configs and tokenizers; the run's template on the tokenizer;
        returns DistillationConfig (generation stops at <end_of_turn>)."""
        cfg = self.cfg
        self.launch = launch
        student_config = self.set_up_base(padding_side="left")  # generation pads prompts on the left
        check_teacher(cfg, self.family, student_config, self.tokenizer)
        return distill_args(cfg, out, launch, *stop_ids(self.tokenizer))

    def load_data(self, run: RunLifecycle) -> dict[str, Any]:
        """Prompts (each row up to its last user turn), held-out prompts by data.eval_fraction."""
        cfg, tokenizer, family = self.cfg, self.tokenizer, self.family
        rows, source = load_rows(cfg.data)
        rows, held_out = split_rows(rows, cfg)
        self.prompts, report, _ = build_prompts(rows, tokenizer, cfg.data, family, cfg.distill.max_completion_length,
                                                empty_thought=self.empty_thought)
        self.eval_prompts = build_prompts(held_out, tokenizer, cfg.data, family, cfg.distill.max_completion_length,
                                          empty_thought=self.empty_thought)[0] if held_out else None
        self.data_report = report
        for line in report.summary_lines()[:1] + report.summary_lines()[2:]:
            run.say(line)
        batch = cfg.training.per_device_train_batch_size * self.launch.num_processes
        if len(self.prompts) < batch:  # the trainer drops a partial batch: not one step could run
            raise UserError(f"data: {len(self.prompts)} usable prompts, fewer than one batch (training."
                            f"per_device_train_batch_size {cfg.training.per_device_train_batch_size} x "
                            f"{self.launch.num_processes} process(es)): give more prompts or a smaller batch")
        run.say(f"prompts: {len(self.prompts)} ({report.total_tokens:,} tokens); completions generated by the "
                f"student, up to {cfg.distill.max_completion_length} tokens, stopping at {end_of_turn(family)}")
        d = cfg.distill
        return dict(
            dataset={"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                     "fingerprint": source.fingerprint, "split": cfg.data.split},
            data=report.to_dict() | {"prompts": len(self.prompts), "eval_prompts": len(self.eval_prompts or [])},
            distill={"teacher": cfg.teacher.name_or_path, "teacher_load_in": cfg.teacher.load_in, "beta": d.beta,
                     "divergence": d.divergence, "temperature": d.temperature,
                     "max_completion_length": d.max_completion_length, "top_p": d.top_p, "top_k": d.top_k,
                     "on_policy_fraction": 1.0},
            chat_template=template_record(family, cfg, self.base_chat_template, self.empty_thought))

    def build(self, run: RunLifecycle, args) -> "GemmaDistillationTrainer":
        """Student and teacher through the one loading path; the trainer (LoRA applied to the student)."""
        cfg, launch = self.cfg, self.launch
        rank = run.state.local_process_index
        student, report_model = load_model(LoadRequest.for_run(cfg, device_map(cfg, launch, rank)))
        teacher, report_teacher = load_model(teacher_request(cfg, launch, rank))
        trainer = build_trainer(cfg, student, teacher, self.tokenizer, self.prompts, self.eval_prompts, args, launch)
        divergence = use_divergence(trainer, cfg, launch)
        run.record["distill"] |= {"loss": divergence, "sampling": trainer.sampling}
        run.record["loss_implementation"] = f"trl DistillationTrainer; divergence {describe_divergence(divergence)}"
        inspect_adapters(trainer.model, cfg, report_model)
        run.record_model(report_model)
        run.record["teacher"] = report_teacher.to_dict()
        run.say(f"teacher: {cfg.teacher.name_or_path} ({report_teacher.family}, {report_teacher.num_layers} layers, "
                f"hidden {report_teacher.hidden_size}, {cfg.teacher.load_in}), frozen, eval mode; attention "
                f"{report_teacher.attn_implementation}, soft-caps {report_teacher.attention_softcap}/"
                f"{report_teacher.final_softcap}")
        run.say(f"divergence: {run.record['distill']['divergence']} at temperature {cfg.distill.temperature} on both "
                f"models' soft-capped logits, over the generated completion tokens only, by "
                f"{describe_divergence(divergence)}; launch {launch.describe()}")
        return trainer

    def record_training(self, run: RunLifecycle, trainer, runtime_s: float | None) -> None:
        """Completion tokens generated and generation seconds (totals over attempts), the divergence curve."""
        self.generated = run_total(trainer, trainer.supervised_seen)
        before = run.previous.get("distill") or {}  # a resumed run: totals over its attempts
        run.record["distill"] |= {
            "tokens_generated": self.generated + (before.get("tokens_generated") or 0),
            "generation_s": round(run_total(trainer, trainer.generation_seconds) + (before.get("generation_s") or 0),
                                  3),
            "train_runtime_s": runtime_s, "divergence_history": [
                {"step": e["step"], "divergence": e["loss"]} for e in trainer.state.log_history if "loss" in e]}

    def after_training(self, run: RunLifecycle, trainer) -> None:
        """The held-out divergence curve, when prompts are held out."""
        if self.eval_prompts:
            run.record["training"]["eval_history"] = [{"step": e["step"], "eval_divergence": e["eval_loss"]}
                                                      for e in trainer.state.log_history if "eval_loss" in e]

    def final_lines(self, run: RunLifecycle, trainer, runtime_s: float | None) -> list[str]:
        """Completion tokens generated and generation's share of the training time."""
        share = (run_total(trainer, trainer.generation_seconds) / max(runtime_s or 0, 1e-9)
                 / max(run.state.num_processes, 1))
        return [f"generated {self.generated:,.0f} completion tokens; generation took {share:.0%} of the training time"]


def run_distill(cfg: DistillConfig, echo: Echo = print, recipe: Path | str | None = None, resume: bool = False,
                resume_from: str | None = None) -> dict[str, Any]:
    """Distill as `cfg` says through the run lifecycle; returns the run's manifest (also output.dir/run.json).
    Raises UserError (teacher/student mismatch, prompts, launch, output folder), Interrupted (SIGTERM or Ctrl-C)."""
    return lifecycle.train(Runner(cfg), echo, recipe, resume, resume_from)


def build_trainer(cfg: DistillConfig, student, teacher, tokenizer, prompts: list, eval_prompts: list | None, args,
                  launch: Launch) -> GemmaDistillationTrainer:
    """The distillation trainer: TRL applies LoRA (lora_config) to the student; the teacher is frozen; prompts
    are conversations (TRL renders them with the tokenizer's template: the run's generated one)."""
    from datasets import Dataset

    teacher.requires_grad_(False)
    trainer = GemmaDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        eval_dataset=Dataset.from_dict({"prompt": eval_prompts}) if eval_prompts else None,
        processing_class=tokenizer, peft_config=lora_config(cfg, student))
    trainer.remove_callback(PrinterCallback)
    keep_adapters_in_fp32(trainer, cfg, launch)
    return trainer


"""`gemma2-tune dpo`: preference optimisation (DPO and TRL's other paired losses; KTO on unpaired examples).

The policy learns to raise the likelihood of the chosen answer over the rejected one relative to a frozen
reference: DPO's loss is -log sigmoid(beta x ((log pi(chosen) - log pi_ref(chosen)) - (log pi(rejected) -
log pi_ref(rejected)))), each log-probability summed over the answer's tokens (Rafailov et al. 2023, "Direct
Preference Optimization"). Built on TRL's DPOTrainer (KTOTrainer for `kto`/`apo_zero_unpaired`), which
computes the log-probabilities in chunks from the final norm's hidden states with Gemma 2's final soft-cap
(30.0) applied, as the model's own logits are. What trains is exactly our ids (data/preferences.py): TRL's own
re-tokenization is skipped.

The reference is the starting policy:
  LoRA, new adapter            the model with its adapter disabled (TRL; no second copy in memory)
  LoRA, from a run (sft, dpo,  base + the run's adapter, trained further; the reference is a frozen copy of that
  rl: --model RUN)             adapter (TRL's `ref` adapter): the starting policy, not the raw base. The result is
                               one adapter on the raw base, so chat/merge/serve and the next stage read it as
                               they read the run it continued.
  full fine-tuning             a second copy of the starting model (an sft adapter merged into it), loaded
                               through the one loading path, frozen (declared in the schema's frozen_models)
What it leaves out: no on-policy sampling (the pairs are fixed), no reference sync (TR-DPO), no precomputed
reference log-probabilities, dropout off in both models (TRL's default: policy and reference score alike).

setup (family, tokenizer, the run's template) -> pairs (checked, nothing written) -> policy (+ reference) ->
train (rewards, margins, accuracy per logging step) -> held-out evaluation -> save.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from transformers import PrinterCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from ..config.dpo import DpoConfig
from ..data.preferences import read_preference_splits, trl_rows
from ..data.template import template_record
from ..models.loading import LoadRequest, load_model
from ..models.lora import continue_adapter, inspect_adapters, lora_config
from . import lifecycle
from .launch import Launch
from .lifecycle import RunLifecycle
from .logprobs import describe_head, use_supervised_heads
from .trainer import common_args, device_map, keep_adapters_in_fp32

# The metrics TRL logs per logging step that run.json keeps (KTO logs no accuracy; it adds `kl`).
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl")


class CountingMixin:
    """Counts the answer tokens trained on (`supervised_seen`: the positions the loss reads, chosen and rejected),
    and skips TRL's re-tokenization: the dataset already holds our ids in TRL's columns."""

    supervised_seen = 0

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ARG002
        return dataset

    def _compute_loss(self, model, inputs, return_outputs):
        if self.model.training:
            self.supervised_seen += int(inputs["completion_mask"].sum())
        return super()._compute_loss(model, inputs, return_outputs)


class GemmaDPOTrainer(CountingMixin, DPOTrainer):
    """TRL's DPOTrainer on pre-tokenized pairs (prompt_ids, chosen_ids, rejected_ids)."""


class GemmaKTOTrainer(CountingMixin, KTOTrainer):
    """TRL's KTOTrainer on pre-tokenized examples (prompt_ids, completion_ids, label); the KL completions are
    TRL's rule: each batch's answers rotated by one, so every prompt meets another example's answer."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ARG002
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


def dpo_args(cfg: DpoConfig, out: Path, launch: Launch, evaluate: bool) -> DPOConfig | KTOConfig:
    """TRL's DPOConfig (or KTOConfig for an unpaired loss) from the resolved config, built before any model loads.
    max_length is data.max_length: the pairs are already cut to it, so TRL's keep_start cut changes nothing."""
    d = cfg.dpo
    if d.unpaired:
        return KTOConfig(**common_args(KTOConfig, cfg, out, launch, evaluate=evaluate), beta=d.beta,
                         loss_type=d.loss_type[0], desirable_weight=d.desirable_weight,
                         undesirable_weight=d.undesirable_weight, max_length=cfg.data.max_length,
                         # KTO's KL completions are built per batch in dataset order (the rows are shuffled here)
                         train_sampling_strategy="sequential")
    return DPOConfig(**common_args(DPOConfig, cfg, out, launch, evaluate=evaluate), beta=d.beta,
                     loss_type=list(d.loss_type), loss_weights=d.loss_weights, label_smoothing=d.label_smoothing,
                     max_length=cfg.data.max_length, truncation_mode="keep_start")


def trl_head_outputs(trainer) -> tuple[str, ...]:
    """The per-token fields TRL's trainer asks its fused LM head for (its metrics: entropy, mean logits, token
    accuracy; WPO's weights need log_sum_sq_probs), as DPOTrainer/KTOTrainer.__init__ in TRL 1.16 set them."""
    if isinstance(trainer, KTOTrainer):
        return ("log_probs", "entropy", "mean_logits")
    return ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if trainer.use_weighting
                                                                  else ())


def loss_implementation(cfg: DpoConfig, head: dict[str, str]) -> str:
    """run.json's loss_implementation: TRL's trainer and the LM head its log-probabilities came from."""
    return f"trl {'KTOTrainer' if cfg.dpo.unpaired else 'DPOTrainer'} ({describe_head(head)})"


def load_policy(cfg: DpoConfig, device: Any, *, training: bool = True):
    """The starting policy through the one loading path: the base (cfg.base_model), with the adapter of the run it
    continues (cfg.start) applied (trainable, for LoRA) or merged into the weights (full fine-tuning). Returns
    (model, report). `training=False` gives the frozen reference (full fine-tuning). Raises UserError."""
    start = cfg.start
    request = dataclasses.replace(LoadRequest.for_run(cfg, device), name_or_path=cfg.base_model, training=training)
    model, report = load_model(request)
    if start is not None:
        model = continue_adapter(model, start, trainable=cfg.lora.enabled and training, merge=not cfg.lora.enabled)
        report.name_or_path = f"{start.base} + adapter {start.folder}"
    if not training:
        model.requires_grad_(False)
        model.eval()
    return model, report


class Runner(lifecycle.Runner):
    """dpo's pieces: family and tokenizer from the base (the base of the run it continues, if any); pairs (or
    KTO examples) checked before anything is written; the policy and its reference; TRL's DPOTrainer or
    KTOTrainer; rewards, margins and accuracy in run.json."""

    cfg: DpoConfig

    def prepare(self, launch: Launch, out: Path):
        """Family, kernel and tokenizer of the base; the run's template; returns DPOConfig (or KTOConfig)."""
        cfg = self.cfg
        self.launch = launch
        self.set_up_base()
        d = cfg.data
        return dpo_args(cfg, out, launch, evaluate=bool(d.eval_dataset or d.eval_split or d.eval_fraction))

    def load_data(self, run: RunLifecycle) -> dict[str, Any]:
        """Pairs (or unpaired examples) and the held-out ones, read and checked; the run.json fields."""
        cfg = self.cfg
        kind = "unpaired" if cfg.dpo.unpaired else "paired"
        data, items, eval_data, eval_items = read_preference_splits(cfg, self.tokenizer, self.family, kind, self.empty_thought)
        if cfg.dpo.unpaired:  # TRL samples KTO in order (its KL pairs are per batch): the order is drawn here
            random.Random(cfg.training.seed).shuffle(items)
        self.items, self.eval_items, self.data_report = items, eval_items, data.report
        for line in data.report.summary_lines():
            run.say(line)
        unit = self.cfg.item_unit
        run.say(f"{unit}s: {len(items)} to train on, {len(eval_items)} held out"
                + (f" ({eval_data.source.name})" if eval_data else ""))
        source = data.source
        return dict(
            dataset={"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                     "fingerprint": source.fingerprint, "split": cfg.data.split},
            data=data.report.to_dict() | {"kind": kind, "items": len(items), "eval_items": len(eval_items),
                                          "ids_fingerprint": data.summary()["ids_fingerprint"],
                                          "eval": eval_data.summary() if eval_data else None},
            dpo={"loss_type": list(cfg.dpo.loss_type), "loss_weights": cfg.dpo.loss_weights, "beta": cfg.dpo.beta,
                 "label_smoothing": cfg.dpo.label_smoothing, "trainer": "KTOTrainer" if cfg.dpo.unpaired else
                 "DPOTrainer", "reference": cfg.reference, "dropout": "off in policy and reference (TRL)"},
            chat_template=template_record(self.family, cfg, self.base_chat_template, self.empty_thought))

    def build(self, run: RunLifecycle, args):
        """Policy (+ reference) through the one loading path; the trainer (LoRA applied by TRL to a new adapter)."""
        from datasets import Dataset

        cfg, launch = self.cfg, self.launch
        device = device_map(cfg, launch, run.state.local_process_index)
        policy, report = load_policy(cfg, device)
        reference = None
        if not cfg.lora.enabled:
            reference, ref_report = load_policy(cfg, device, training=False)
            run.record["reference"] = ref_report.to_dict()
        trainer_class = GemmaKTOTrainer if cfg.dpo.unpaired else GemmaDPOTrainer
        name = "kto" if cfg.dpo.unpaired else "dpo"
        started_from_adapter = hasattr(policy, "peft_config")
        trainer = trainer_class(
            model=policy, ref_model=reference, args=args, processing_class=self.tokenizer,
            train_dataset=Dataset.from_list(trl_rows(self.items, name)),
            eval_dataset=Dataset.from_list(trl_rows(self.eval_items, name)) if self.eval_items else None,
            peft_config=None if started_from_adapter else lora_config(cfg, policy))
        trainer.remove_callback(PrinterCallback)  # raw log dicts; EchoLoss prints readable lines
        keep_adapters_in_fp32(trainer, cfg, launch)
        head = use_supervised_heads(trainer, trl_head_outputs(trainer), sharded=launch.shards_parameters)
        run.record["dpo"]["lm_head"] = head
        run.record["loss_implementation"] = loss_implementation(cfg, head)
        inspect_adapters(trainer.model, cfg, report)
        run.record_model(report)
        run.say(f"{name}: {cfg.dpo.describe()}; reference: {run.record['dpo']['reference']}; log-probabilities of "
                f"soft-capped logits (final cap {report.final_softcap}) from {describe_head(head)}; launch "
                f"{launch.describe()}")
        return trainer

    def before_training(self, run: RunLifecycle, checkpoint) -> None:
        t = self.cfg.training
        per_step = self.cfg.rows_per_optimizer_step * run.state.num_processes
        run.say(f"training: {len(self.items)} {self.cfg.item_unit}s, {per_step} per optimizer step (batch "
                f"{t.per_device_train_batch_size} x accumulation {t.gradient_accumulation_steps} x "
                f"{run.state.num_processes} processes)"
                + (f"; resuming from {checkpoint.path} (step {checkpoint.step})" if checkpoint else ""))

    def record_training(self, run: RunLifecycle, trainer, runtime_s: float | None) -> None:
        """Rewards, margins and accuracy per logging step (TRL's means over the step's pairs)."""
        run.record["dpo"]["history"] = [
            {"step": e["step"], "loss": e["loss"]} | {k: e[k] for k in REWARD_METRICS if k in e}
            for e in trainer.state.log_history if "loss" in e]

    def after_training(self, run: RunLifecycle, trainer) -> None:
        """The held-out loss, reward margin and preference accuracy, at the end and per evaluation."""
        if not self.eval_items:
            return
        final = trainer.evaluate()
        run.record["dpo"]["eval"] = {k.removeprefix("eval_"): v for k, v in final.items()
                                     if k.removeprefix("eval_") in REWARD_METRICS + ("loss",)}
        run.record["training"]["final_eval_loss"] = final["eval_loss"]
        by_step = {e["step"]: {"step": e["step"], "eval_loss": e["eval_loss"]} | {
            k: e[f"eval_{k}"] for k in REWARD_METRICS if f"eval_{k}" in e}
            for e in trainer.state.log_history if "eval_loss" in e}  # the final evaluation may repeat the last step's
        run.record["training"]["eval_history"] = list(by_step.values())

    def final_lines(self, run: RunLifecycle, trainer, runtime_s: float | None) -> list[str]:
        """The held-out preference accuracy and margin."""
        e = run.record["dpo"].get("eval")
        if not e:
            return []
        parts = [f"loss {e['loss']:.4f}"]
        if "rewards/accuracies" in e:
            parts.append(f"preference accuracy {e['rewards/accuracies']:.1%}")
        if "rewards/margins" in e:
            parts.append(f"reward margin {e['rewards/margins']:.3f}")
        return [f"held out ({len(self.eval_items)} {self.cfg.item_unit}s): " + ", ".join(parts)]


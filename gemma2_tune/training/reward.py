"""`gemma2-tune reward`: a reward model on preference pairs (TRL's RewardTrainer).

The model is Gemma with a sequence-classification head: one score r(x) per sequence, read from the final norm's
hidden state at the last token by a `score` linear layer (new, seeded). The loss is -log sigmoid(r(chosen) -
r(rejected)) over the pairs (Bradley-Terry; Ouyang et al. 2022). Each side is the whole sequence the run's chat
template renders (prompt + answer through <end_of_turn> and its newline), our ids (data/preferences.py). Gemma 2's
final logit soft-cap (30.0) belongs to the language-model head and does not apply to the score; the attention
soft-cap (50.0) does, under eager attention as for every run.

With LoRA (and QLoRA: the score head stays unquantized) the head is trained whole and saved with the adapter
(PEFT task SEQ_CLS, modules_to_save=["score"]). Held-out pairwise accuracy (the fraction of held-out pairs whose
chosen side scores higher, counted exactly over the pairs) per evaluation and at the end, in run.json.
What it leaves out: margins per pair (TRL's `margin` column), ensembles, reward normalisation after training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PrinterCallback
from trl import RewardConfig as TrlRewardConfig
from trl import RewardTrainer

from ..config.reward import RewardConfig
from ..data.preferences import read_preference_splits, trl_rows
from ..data.template import template_record
from ..models.loading import LoadRequest, load_model
from ..models.lora import continue_adapter, inspect_adapters, lora_config
from . import lifecycle
from .launch import Launch
from .lifecycle import RunLifecycle
from .trainer import common_args, device_map, keep_adapters_in_fp32


class GemmaRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer, counting the tokens scored in training (`supervised_seen`: every token of both sides
    is read by the score) and, in evaluation, the held-out pairs and how many of them the model orders right
    (`pairwise_accuracy` among the eval metrics: exact over the pairs, not a mean of batch means)."""

    supervised_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if self.model.training:
            self.supervised_seen += int(inputs["attention_mask"].sum())
        else:
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).detach(), 2)
            self._eval_counts += torch.stack([(chosen > rejected).sum(), torch.tensor(chosen.numel(),
                                                                                      device=chosen.device)])
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        import torch

        self._eval_counts = torch.zeros(2, dtype=torch.long, device=self.accelerator.device)
        metrics = super().evaluate(*args, **kwargs)
        right, pairs = (int(x) for x in self.accelerator.reduce(self._eval_counts, "sum"))
        metrics |= {"eval_pairwise_accuracy": right / max(pairs, 1), "eval_pairs": pairs}
        self.state.log_history[-1] |= {"eval_pairwise_accuracy": right / max(pairs, 1), "eval_pairs": pairs}
        return metrics


def reward_args(cfg: RewardConfig, out: Path, launch: Launch, evaluate: bool) -> TrlRewardConfig:
    """TRL's RewardConfig from the resolved config, built before any model loads (ZeRO-3 shards at load)."""
    return TrlRewardConfig(**common_args(TrlRewardConfig, cfg, out, launch, evaluate=evaluate),
                           max_length=cfg.data.max_length,
                           center_rewards_coefficient=cfg.reward.center_rewards_coefficient)


def reward_lora_config(cfg: RewardConfig):
    """lora.* as a SEQ_CLS adapter whose score head is trained whole and saved with it (None: full fine-tuning)."""
    config = lora_config(cfg)
    if config is not None:
        config.task_type = "SEQ_CLS"
        config.modules_to_save = ["score"]
    return config


class Runner(lifecycle.Runner):
    """reward's pieces: family and tokenizer, the run's template; pairs as whole sequences; the model with a
    one-score head through the one loading path; TRL's RewardTrainer; held-out pairwise accuracy."""

    cfg: RewardConfig

    def prepare(self, launch: Launch, out: Path):
        cfg = self.cfg
        self.launch = launch
        self.set_up_base()
        d = cfg.data
        return reward_args(cfg, out, launch, evaluate=bool(d.eval_dataset or d.eval_split or d.eval_fraction))

    def load_data(self, run: RunLifecycle) -> dict[str, Any]:
        cfg = self.cfg
        data, items, eval_data, eval_items = read_preference_splits(cfg, self.tokenizer, self.family, "paired", self.empty_thought)
        self.items, self.eval_items, self.data_report = items, eval_items, data.report
        for line in data.report.summary_lines():
            run.say(line)
        run.say(f"pairs: {len(items)} to train on, {len(eval_items)} held out"
                + (f" ({eval_data.source.name})" if eval_data else ""))
        source = data.source
        return dict(
            dataset={"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                     "fingerprint": source.fingerprint, "split": cfg.data.split},
            data=data.report.to_dict() | {"kind": "paired", "items": len(items), "eval_items": len(eval_items),
                                          "ids_fingerprint": data.summary()["ids_fingerprint"],
                                          "eval": eval_data.summary() if eval_data else None},
            reward={"head": "sequence classification, 1 score at the last token",
                    "center_rewards_coefficient": cfg.reward.center_rewards_coefficient,
                    "final_softcap_applies": False},
            loss_implementation="trl RewardTrainer (-log sigmoid(r(chosen) - r(rejected)))",
            chat_template=template_record(self.family, cfg, self.base_chat_template, self.empty_thought))

    def build(self, run: RunLifecycle, args):
        from datasets import Dataset

        cfg, launch = self.cfg, self.launch
        model, report = load_model(LoadRequest.for_run(cfg, device_map(cfg, launch, run.state.local_process_index)))
        # the score is read at the last token that is not padding: the model must know the tokenizer's pad id
        model.config.pad_token_id = self.tokenizer.pad_token_id
        start = cfg.start
        if start is not None:  # the run it continues: its adapter trained further (LoRA) or merged in (full)
            model = continue_adapter(model, start, trainable=cfg.lora.enabled, merge=not cfg.lora.enabled)
            report.name_or_path = f"{start.base} + adapter {start.folder}"
        trainer = GemmaRewardTrainer(
            model=model, args=args, processing_class=self.tokenizer,
            train_dataset=Dataset.from_list(trl_rows(self.items, "reward")),
            eval_dataset=Dataset.from_list(trl_rows(self.eval_items, "reward")) if self.eval_items else None,
            peft_config=None if hasattr(model, "peft_config") else reward_lora_config(cfg))
        trainer.remove_callback(PrinterCallback)
        keep_adapters_in_fp32(trainer, cfg, launch)
        inspect_adapters(trainer.model, cfg, report)
        run.record_model(report)
        run.say(f"reward model: one score per sequence; attention soft-cap {report.attention_softcap} applies, the "
                f"final soft-cap ({report.final_softcap}) belongs to the language-model head and does not; launch "
                f"{launch.describe()}")
        return trainer

    def before_training(self, run: RunLifecycle, checkpoint) -> None:
        t = self.cfg.training
        per_step = self.cfg.rows_per_optimizer_step * run.state.num_processes
        run.say(f"training: {len(self.items)} pairs, {per_step} per optimizer step (batch "
                f"{t.per_device_train_batch_size} x accumulation {t.gradient_accumulation_steps} x "
                f"{run.state.num_processes} processes)"
                + (f"; resuming from {checkpoint.path} (step {checkpoint.step})" if checkpoint else ""))

    def record_training(self, run: RunLifecycle, trainer, runtime_s: float | None) -> None:
        """Accuracy and margin per logging step (TRL's means over the step's pairs)."""
        run.record["reward"]["history"] = [
            {"step": e["step"], "loss": e["loss"]} | {k: e[k] for k in ("accuracy", "margin", "mean_reward") if k in e}
            for e in trainer.state.log_history if "loss" in e]

    def after_training(self, run: RunLifecycle, trainer) -> None:
        """Held-out pairwise accuracy, margin and loss, at the end and per evaluation."""
        if not self.eval_items:
            return
        final = trainer.evaluate()
        run.record["reward"]["eval"] = {"pairwise_accuracy": final["eval_pairwise_accuracy"],
                                        "pairs": final["eval_pairs"], "loss": final["eval_loss"],
                                        "margin": final.get("eval_margin")}
        run.record["training"]["final_eval_loss"] = final["eval_loss"]
        by_step = {e["step"]: {"step": e["step"], "eval_loss": e["eval_loss"],
                               "pairwise_accuracy": e.get("eval_pairwise_accuracy"), "margin": e.get("eval_margin")}
                   for e in trainer.state.log_history if "eval_loss" in e}
        run.record["training"]["eval_history"] = list(by_step.values())

    def final_lines(self, run: RunLifecycle, trainer, runtime_s: float | None) -> list[str]:
        e = run.record["reward"].get("eval")
        if not e:
            return []
        return [f"held out ({e['pairs']} pairs): pairwise accuracy {e['pairwise_accuracy']:.1%}, mean margin "
                f"{e['margin'] or 0:.3f}, loss {e['loss']:.4f}"]

"""What on-policy methods (distill, rl) share around TRL's generation: counting what it costs and yields, a
prompt order that survives a resume, and per-process counters summed over a launch."""

from __future__ import annotations

import time

from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler draws each epoch's order from one generator, so an epoch's order depends on how
    many epochs the sampler has served: a run resumed in epoch 2 would see epoch 1's order. Here the order is
    a function of (seed, epoch): the trainer calls set_epoch before every epoch, resumed or not."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


class CountingGeneration:
    """A mixin for TRL's on-policy trainers (DistillationTrainer, GRPOTrainer, RLOOTrainer: their `_generate`
    returns (prompt_ids, completion_ids, ...)): the completion tokens generated (`supervised_seen`: the positions
    the loss is on), the seconds spent generating (`generation_seconds`; also logged per step as
    `generation_time`), `count_completions` for anything more a method counts; prompts in an order that
    survives a resume (EpochSeededRepeatSampler)."""

    supervised_seen = 0
    generation_seconds = 0.0

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        return EpochSeededRepeatSampler(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size,
                                        sampler.repeat_count, sampler.shuffle, sampler.seed)

    def _generate(self, prompts: list):
        started = time.perf_counter()
        out = super()._generate(prompts)
        seconds = time.perf_counter() - started
        self.generation_seconds += seconds
        if self.model.training:
            self.supervised_seen += sum(len(ids) for ids in out[1])
            self.count_completions(out[1])
            self._metrics["train"]["generation_time"].append(seconds)
        return out

    def count_completions(self, completion_ids: list[list[int]]) -> None:
        """A training step's completions (token ids each), for a method's own counts; nothing here."""


def run_total(trainer, value: float) -> float:
    """A per-process counter summed over the launch's processes."""
    import torch

    total = torch.tensor([float(value)], device=trainer.accelerator.device)
    return trainer.accelerator.gather(total).sum().item()

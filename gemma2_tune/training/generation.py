"""What on-policy methods (distill, rl) share around TRL's generation: counting what it costs and yields, a
prompt order that survives a resume, per-process counters summed over a launch, and a faster draw of each sampled
token on a CPU."""

from __future__ import annotations

import contextlib
import time

import torch

from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler draws each epoch's order from one generator, so an epoch's order depends on how
    many epochs the sampler has served: a run resumed in epoch 2 would see epoch 1's order. Here the order is
    a function of (seed, epoch): the trainer calls set_epoch before every epoch, resumed or not."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


# torch's messages for weights it cannot sample from (aten/src/ATen/native/Distributions.cpp)
BAD_WEIGHTS = "probability tensor contains either `inf`, `nan` or element < 0"
ZERO_ROW = "invalid multinomial distribution (sum of probabilities <= 0)"


def sample_categorical(weights: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
    """One index per row drawn with probability weights[i] / sum(weights), as torch.multinomial(weights, 1) draws it,
    by inverse transform sampling: one uniform number per row against the row's cumulative sum (float64), instead of
    one exponential number per vocabulary entry. Measured on 2 CPU cores at 256,000 entries: 2 rows 0.56 ms against
    torch's 13-14 ms, 8 rows 2.2 ms against 51 ms. A zero weight is never drawn. weights: (V,) or (B, V),
    non-negative, finite, each row's sum > 0; scratch: a dict that keeps the float64 buffer between calls (one
    generation's tokens), else one is allocated per call. Returns int64 indices of shape (1,) or (B, 1), on weights'
    device; draws from torch's default generator. Raises RuntimeError with torch.multinomial's messages for a
    negative, infinite or NaN weight, or a row summing to 0."""
    rows = weights.reshape(-1, weights.shape[-1])
    buffer = (scratch or {}).get("cumulative")
    if buffer is None or buffer.numel() < rows.numel() or buffer.device != rows.device:
        buffer = torch.empty(rows.numel(), dtype=torch.float64, device=rows.device)
        if scratch is not None:
            scratch["cumulative"] = buffer
    # cast and summed in place: a fresh (B, V) float64 tensor per token costs more than the sum (mapped afresh)
    cumulative = buffer[: rows.numel()].view(rows.shape).copy_(rows).cumsum_(dim=1)
    total = cumulative[:, -1:].contiguous()
    if not bool(torch.isfinite(total).all()) or float(rows.min()) < 0:
        raise RuntimeError(BAD_WEIGHTS)
    if bool((total <= 0).any()):
        raise RuntimeError(ZERO_ROW)
    u = torch.rand(total.shape, dtype=torch.float64, device=weights.device) * total
    index = torch.searchsorted(cumulative, u, right=True)
    # u rounds up to the total once in 2^53 draws: the last index with a weight, not one past the end
    last = torch.searchsorted(cumulative, total, right=False)
    index = torch.minimum(index, last)
    return index.reshape(*weights.shape[:-1], 1)


@contextlib.contextmanager
def inverse_cdf_sampling():
    """While generating: torch.multinomial(probs, num_samples=1) on a CPU tensor (transformers' sampling step) runs
    sample_categorical, its buffer kept for the whole generation; every other call (several samples, a generator or
    an out= tensor, another device) runs torch's own."""
    original = torch.multinomial
    scratch: dict = {}

    def multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
        if num_samples == 1 and generator is None and out is None and input.device.type == "cpu" and \
                input.dim() in (1, 2):
            return sample_categorical(input, scratch)
        return original(input, num_samples, replacement, generator=generator, out=out)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


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
        with inverse_cdf_sampling():
            out = super()._generate(prompts)
        seconds = time.perf_counter() - started
        self.generation_seconds += seconds
        if self.model.training:
            self.supervised_seen += sum(len(ids) for ids in out[1])
            self.count_completions(out[1])
            self._metrics["train"]["generation_time"].append(seconds)
        return out

    @property
    def sampling(self) -> str:
        """How each sampled token is drawn, for run.json: 'inverse_cdf' (sample_categorical, transformers'
        generation on a CPU), 'torch.multinomial' (on a GPU) or 'vllm' (vLLM's own sampler)."""
        if getattr(self, "use_vllm", False):
            return "vllm"
        return "inverse_cdf" if self.accelerator.device.type == "cpu" else "torch.multinomial"

    def count_completions(self, completion_ids: list[list[int]]) -> None:
        """A training step's completions (token ids each), for a method's own counts; nothing here."""


def run_total(trainer, value: float) -> float:
    """A per-process counter summed over the launch's processes."""
    import torch

    total = torch.tensor([float(value)], device=trainer.accelerator.device)
    return trainer.accelerator.gather(total).sum().item()

"""How the items of one optimizer step are run: the micro-batch shape, folded when memory allows.

`batch b x accumulation a` runs a forwards of b items. Folding by k (a divisor of a) runs a/k forwards of
b*k items instead: the same items per optimizer step (the sampler groups consecutive items either way),
the same loss normalisation (summed over the step's supervised tokens), so the same gradient up to float
summation order, with fewer, fuller kernels on a GPU. tests/unit/test_batching.py checks the gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..config.schema import RunConfig
from ..families import Shape
from .launch import Launch
from ..config.memory import GIB, estimate


# auto folds only into this share of the card: plan's estimate ran up to 5% under measured peaks on an H200
# (2.59 vs 2.62 GiB, 4.89 vs 5.16 GiB: issue 10), and a larger micro-batch than fits fails with out-of-memory
AUTO_FOLD_SHARE = 0.9


@dataclass(frozen=True)
class MicroBatch:
    """Items per forward and forwards per optimizer step, per process; `folded` = k."""

    per_device: int
    accumulation: int
    folded: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """'micro-batch 4 x accumulation 1 (folded 4: ...)'."""
        fold = f"folded {self.folded}: " if self.folded > 1 else ""
        return f"micro-batch {self.per_device} x accumulation {self.accumulation} ({fold}{self.reason})"


def micro_batch(cfg: RunConfig, shape: Shape, launch: Launch, gpu_bytes: float | None = None) -> MicroBatch:
    """The micro-batch a run of `shape` uses. `gpu_bytes`: memory of this process's GPU (None: no GPU).

    `auto` picks the largest k whose `plan` estimate of the folded step fits AUTO_FOLD_SHARE of `gpu_bytes`;
    `gemma2-tune plan` prints the same choice for a named card.
    """
    b, a = cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps
    mode = cfg.training.fold_accumulation
    if a == 1:
        return MicroBatch(b, 1, 1, "no accumulation to fold")
    if mode is False:
        return MicroBatch(b, a, 1, "training.fold_accumulation=false")
    if mode is True:
        return MicroBatch(b * a, 1, a, "training.fold_accumulation=true")
    if gpu_bytes is None:
        return MicroBatch(b, a, 1, "auto: not folded without a GPU (training.fold_accumulation=true folds)")
    usable = AUTO_FOLD_SHARE * gpu_bytes
    for k in sorted((k for k in range(a, 0, -1) if a % k == 0), reverse=True):
        need = estimate(shape, cfg, launch.num_processes, launch.shards_parameters, launch.offload, batch=b * k).total
        if need <= usable:
            why = (f"auto: plan estimates {need / GIB:.1f} GiB of {usable / GIB:.1f} GiB "
                   f"({AUTO_FOLD_SHARE:.0%} of the card)")
            return MicroBatch(b * k, a // k, k, why)
    return MicroBatch(b, a, 1, f"auto: even unfolded, plan estimates more than {usable / GIB:.1f} GiB "
                               f"({AUTO_FOLD_SHARE:.0%} of the card)")


def gpu_memory() -> int | None:
    """Total memory of this process's CUDA device (LOCAL_RANK under a launch) in bytes, or None without one."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory

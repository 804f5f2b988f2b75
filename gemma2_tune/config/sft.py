"""The `sft` schema: supervised fine-tuning on conversations (the loss on model turns, packed blocks)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ..families import Shape
from .memory import DTYPE_BYTES, logprob_head_bytes
from .rules import run_problems
from .schema import RunConfig, SftDataSection, SftTrainingSection


class SftConfig(RunConfig):
    """Supervised fine-tuning: every shared section, with sft's own data keys (overlong, train_on, packing)
    and training keys (fold_accumulation, kernels, the loss)."""

    method: Literal["sft"] = Field("sft", description=RunConfig.model_fields["method"].description)
    data: SftDataSection = Field(default_factory=SftDataSection)
    training: SftTrainingSection = Field(default_factory=SftTrainingSection)
    folds_accumulation: ClassVar[bool] = True

    def problems(self) -> tuple[list[str], list[str]]:
        """The shared rules of a training run (rules.run_problems)."""
        return run_problems(self)

    def launch_problems(self, launch: Any) -> list[str]:
        """sft's own keys against the launch: compiled layers, Liger's kernels and the fused loss read whole
        weights, which a sharded launch does not have."""
        if launch.reads_whole_weights:
            return []
        sharding, problems = launch.sharding, []
        if self.training.torch_compile != "off":
            problems.append(f"training.torch_compile is set but gemma2-tune compiles layers only without {sharding} "
                            "(its parameter gathering hooks break the compiled graphs); set training.torch_compile=off")
        if self.training.use_liger_kernel:
            problems.append(f"training.use_liger_kernel is set but gemma2-tune checks Liger's kernels against the plain "
                            f"model's gradients, which {sharding} partitions; set training.use_liger_kernel=false")
        if self.training.loss == "supervised_liger":
            problems.append(f"training.loss is supervised_liger but {sharding} partitions the lm_head weight it reads "
                            f"(TRL's own loss runs under {sharding}); set training.loss=trl")
        return problems

    @property
    def item_unit(self) -> str:
        """A batch item is a packed block, or a row."""
        return "packed block" if self.data.packing else "row"

    def data_line(self) -> str:
        """Gemma turns, where the loss is, how long rows are handled."""
        d = self.data
        return (f"Gemma turns, system messages '{d.system_policy}', loss on {d.train_on.replace('_', ' ')}, max "
                f"{d.max_length} tokens ({d.overlong} longer rows)")

    def method_lines(self) -> list[str]:
        """The loss and the kernels a run asks for beyond the defaults (nothing when none)."""
        t = self.training
        loss = {"trl": "loss trl (TRL's own)", "supervised_liger": "loss supervised_liger (Liger's fused linear "
                "cross-entropy, CUDA only; checked against the fp32 tiles before training)"}
        parts = [loss[t.loss]] if t.loss in loss else []
        parts += ["Liger RMSNorm, GeGLU, RoPE (CUDA only; checked against the plain model before training)"
                  ] if t.use_liger_kernel else []
        parts += [f"torch.compile {t.torch_compile} (checked against eager before training)"
                  ] if t.torch_compile != "off" else []
        return [f"kernels:      {'; '.join(parts)}"] if parts else []

    def memory_terms(self, shape: Shape, b: int, t: int, n: int, shards: bool,
                     frozen: dict[str, Shape]) -> dict[str, float]:
        """sft's loss: supervised_chunked: one fp32 tile (x3 with temporaries) + fp32 hidden states at the
        supervised positions (every position, as an upper bound); supervised_liger: Liger's chunk; TRL's loss
        (asked for, or under sharding): its fused tiles."""
        h, dtype = shape.hidden, DTYPE_BYTES[self.model.dtype]
        supervised = b * t  # upper bound: every position supervised
        if self.training.loss == "supervised_chunked" and not shards:
            return {"loss": logprob_head_bytes(shape, supervised, trl_head=False)}
        if self.training.loss == "supervised_liger" and not shards:
            # Liger sizes its chunk of rows so that rows x vocab ~ positions x hidden (rounded up to a power of 2:
            # up to 2x), logits in the model's dtype and their fp32 gradient; plus the gradient of the hidden states
            return {"loss": 2 * supervised * h * (dtype + 4) + supervised * h * 8}
        return {"loss": logprob_head_bytes(shape, supervised, trl_head=True)}

"""The `reward` schema: a reward model trained on preference pairs (TRL's RewardTrainer).

data.* gives the pairs (data/preferences.py); the model is model/quantization/lora with a sequence-classification
head: one score per sequence, read at its last token. With LoRA the score head is trained whole and saved with the
adapter (PEFT's modules_to_save). model.name_or_path may be a run with a LoRA adapter (an sft run, or a reward run
to train further): its adapter is the reward model's starting adapter. `reward` is this method's own section.
sft's packing, loss and kernel keys are unknown keys here.

Light module (pydantic only): `validate` and `--dry-run` read it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..families import Shape
from .memory import activation_bytes
from .rules import continued_run_problems
from .schema import OutputSection, PreferenceDataSection, RunConfig, Section


class RewardSection(Section):
    """The pairwise loss of a reward model: -log sigmoid(r(chosen) - r(rejected)) (Bradley-Terry, as in
    Ouyang et al. 2022), averaged over the pairs of a batch (TRL's RewardTrainer)."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0.0,
        description="Add this x mean((r(chosen) + r(rejected))^2) to the loss, pulling scores towards zero mean "
        "(Eisenstein et al. 2023; e.g. 0.01). null: off.",
    )


class RewardConfig(RunConfig):
    """The `reward` schema: a training run whose model has a one-score head, on preference pairs."""

    method: Literal["reward"] = Field("reward", description=RunConfig.model_fields["method"].description)
    data: PreferenceDataSection = Field(default_factory=lambda: PreferenceDataSection(dataset="concise"))
    reward: RewardSection = Field(default_factory=RewardSection)
    output: OutputSection = Field(default_factory=lambda: OutputSection(dir="runs/gemma2-reward"))

    data_kind: ClassVar[str] = "preference pairs"
    head: ClassVar[str] = "sequence-classification"
    continues_runs: ClassVar[bool] = True

    def problems(self) -> tuple[list[str], list[str]]:
        """The shared rules of a training run (on the base of a run it continues: continued_run_problems), and one
        source of held-out pairs."""
        errors, warnings = continued_run_problems(self)
        if self.data.eval_dataset and (self.data.eval_fraction or self.data.eval_split):
            errors.append("data.eval_dataset with data.eval_fraction/eval_split: choose one source of held-out pairs")
        return errors, warnings

    @property
    def item_unit(self) -> str:
        """A batch item is a pair (chosen and rejected are scored as one batch of two)."""
        return "pair"

    def data_line(self) -> str:
        """Whole sequences (prompt + answer) per side."""
        d = self.data
        return (f"preference pairs in Gemma turns, system messages '{d.system_policy}', each side scored whole "
                f"(prompt + answer <= {d.max_length} tokens, {d.overlong} longer pairs)"
                + (f"; held out: {d.eval_dataset}" if d.eval_dataset else ""))

    def method_lines(self) -> list[str]:
        """The head and the loss."""
        c = self.reward.center_rewards_coefficient
        head = "LoRA + the score head trained whole (saved with the adapter)" if self.lora.enabled else "all weights"
        lines = [f"reward:       one score per sequence (sequence-classification head at the last token; {head}); "
                 f"loss -log sigmoid(r(chosen) - r(rejected))" + (f" + {c:g} x mean(r^2)" if c else "")]
        start = self.start
        if start:
            how = ("its adapter trained further as the reward model's (a new score head unless it has one)"
                   if self.lora.enabled else "its adapter merged into the weights, all of them trained")
            lines.append(f"start:        {start.describe()}: {how}")
        return lines

    def memory_terms(self, shape: Shape, b: int, t: int, n: int, shards: bool,
                     frozen: dict[str, Shape]) -> dict[str, float]:
        """A reward model's extra memory: chosen and rejected are scored as one batch of 2B sequences, so the
        activations count twice (the shared term counts B). No logits over the vocabulary: the score head reads one
        hidden state per sequence (its fp32 copy and gradient: 2B x hidden x 8 B)."""
        return {"activations, rejected sides": activation_bytes(shape, self, b, t),
                "loss": 2 * b * shape.hidden * 8}

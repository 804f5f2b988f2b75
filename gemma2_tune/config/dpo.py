"""The `dpo` schema: preference optimisation against a frozen reference (TRL's DPOTrainer; KTOTrainer for
unpaired data).

data.* gives the preference pairs (data/preferences.py reads them); `dpo` is this method's own section. sft's
packing, loss and kernel keys are unknown keys here: a pair is scored whole, unpacked, by TRL's log-probabilities
(the final soft-cap applied). The reference is the starting policy: with LoRA the model with its adapter
disabled (or, when continuing a run given as model.name_or_path, e.g. an sft run, a frozen copy of its adapter);
with full fine-tuning a second copy loaded through the one loading path (declared in `frozen_models`).

Light module (pydantic, json): `validate` and `--dry-run` read it.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..families import Shape
from .memory import DTYPE_BYTES, activation_bytes, forward_bytes, logprob_head_bytes
from .rules import continued_run_problems, generating_model_problem
from .schema import FrozenModel, OutputSection, PreferenceDataSection, RunConfig, Section

# TRL 1.16 DPOConfig.loss_type's values (trl/trainer/dpo_config.py), combinable with dpo.loss_weights.
PAIRED_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# TRL 1.16 KTOConfig.loss_type's values: unpaired examples, TRL's KTOTrainer. Not combinable.
UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")
# Losses TRL 1.16 offers only under trl.experimental (its API may change in any release): refused, with why.
REFUSED_LOSSES = {
    "orpo": "ORPO has no reference model and a supervised term on the chosen side; TRL 1.16 has it only in "
            "trl.experimental.orpo (no stable API), which gemma2-tune does not wire",
    "simpo": "SimPO (reference-free, length-normalised) is in TRL 1.16 only as trl.experimental.cpo's "
             "loss_type='simpo' (no stable API), which gemma2-tune does not wire",
    "cpo": "CPO is in TRL 1.16 only in trl.experimental.cpo (no stable API), which gemma2-tune does not wire",
}


class DpoSection(Section):
    """The preference loss (TRL's DPOTrainer, or KTOTrainer for `kto`/`apo_zero_unpaired`) and its strength."""

    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid"],
        description="TRL's loss(es): `sigmoid` (DPO, Rafailov et al. 2023), `ipo`, `hinge`, `robust`, `apo_zero`, "
        "`apo_down`, `exo_pair`, `nca_pair`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `discopop`, `sft`, "
        "`sigmoid_norm`, several combined with dpo.loss_weights; or `kto` / `apo_zero_unpaired` alone (unpaired "
        "data, TRL's KTOTrainer; pairs count as one desirable and one undesirable example). ORPO and SimPO are "
        "refused (TRL 1.16 has them only in trl.experimental).",
    )
    loss_weights: list[float] | None = Field(
        None, description="Weights of the combined losses, one per dpo.loss_type (default: 1.0 each).")
    beta: float = Field(
        0.1, gt=0.0,
        description="Strength of the pull towards the reference (DPO's beta; IPO's tau). The implicit reward of an "
        "answer is beta x (log pi(answer) - log pi_ref(answer)), summed over its tokens.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="Probability that a preference label is flipped (`robust`); EXO's epsilon (`exo_pair`, needs > 0).")
    desirable_weight: float = Field(1.0, gt=0.0, description="KTO: weight of the desirable examples' loss.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="KTO: weight of the undesirable examples' loss.")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss(cls, value: object) -> object:
        """`--set dpo.loss_type=kto` (one name, as --loss-type takes it): a list of one."""
        return [value] if isinstance(value, str) else value

    @property
    def unpaired(self) -> bool:
        """The loss reads unpaired examples (TRL's KTOTrainer)."""
        return any(t in UNPAIRED_LOSSES for t in self.loss_type)

    def describe(self) -> str:
        """'sigmoid (DPO), beta 0.1' / '0.8 sigmoid + 0.2 sft, beta 0.1'."""
        names = {"sigmoid": "sigmoid (DPO)", "kto": "kto (KTO, unpaired)"}
        if self.loss_weights and len(self.loss_weights) == len(self.loss_type):
            parts = [f"{w:g} {names.get(t, t)}" for t, w in zip(self.loss_type, self.loss_weights)]
        else:
            parts = [names.get(t, t) for t in self.loss_type]
        return f"{' + '.join(parts)}, beta {self.beta:g}"


class DpoConfig(RunConfig):
    """The `dpo` schema: a training run (the policy = model/quantization/lora) plus the preference loss. data.*
    gives the pairs (or unpaired examples for KTO); model.name_or_path may be an sft run folder (its adapter is
    the starting policy and the reference)."""

    method: Literal["dpo"] = Field("dpo", description=RunConfig.model_fields["method"].description)
    data: PreferenceDataSection = Field(default_factory=lambda: PreferenceDataSection(dataset="concise"))
    dpo: DpoSection = Field(default_factory=DpoSection)
    output: OutputSection = Field(default_factory=lambda: OutputSection(dir="runs/gemma2-dpo"))

    data_kind: ClassVar[str] = "preference pairs"
    continues_runs: ClassVar[bool] = True

    def problems(self) -> tuple[list[str], list[str]]:
        """dpo_problems."""
        return dpo_problems(self)

    def frozen_models(self) -> list[FrozenModel]:
        """Full fine-tuning: the reference, a second copy of the starting model in model.dtype. With LoRA none:
        the reference is the model with its adapter disabled (or a frozen copy of the adapter it continues)."""
        if self.lora.enabled:
            return []
        return [FrozenModel("reference", self.base_model, "full", self.model.attn_implementation)]

    @property
    def reference(self) -> str:
        """The frozen reference in words (the dry run's plan, the log, run.json): the starting policy, however it
        is held."""
        start = self.start
        if start and self.lora.enabled:
            return (f"the starting policy: a frozen copy of the adapter of {start.folder} (TRL's `ref` adapter; the "
                    f"policy trains that adapter further, on {start.base})")
        if self.lora.enabled:
            return "the starting model, its LoRA adapter disabled (no second copy in memory)"
        what = f"{start.base} with the adapter of {start.folder} merged in" if start else self.model.name_or_path
        return f"a second copy of the starting model ({what}, {self.model.dtype}), frozen"

    @property
    def preference_kind(self) -> str:
        """'unpaired' for KTO's losses (pairs count as a desirable and an undesirable example), else 'paired'."""
        return "unpaired" if self.dpo.unpaired else "paired"

    @property
    def item_unit(self) -> str:
        """A batch item is a pair (chosen and rejected run as one batch of two), or a KTO example."""
        return "example" if self.dpo.unpaired else "pair"

    def data_line(self) -> str:
        """Pairs in Gemma turns, per-side length."""
        d = self.data
        kind = "unpaired examples (pairs split into desirable/undesirable)" if self.dpo.unpaired else "preference pairs"
        return (f"{kind} in Gemma turns, system messages '{d.system_policy}', loss on the answers, prompt + answer "
                f"<= {d.max_length} tokens per side ({d.overlong} longer pairs)"
                + (f"; held out: {d.eval_dataset}" if d.eval_dataset else ""))

    def method_lines(self) -> list[str]:
        """The loss and the reference."""
        trainer = "KTOTrainer" if self.dpo.unpaired else "DPOTrainer"
        return [f"dpo:          {self.dpo.describe()} (TRL {trainer}, log-probabilities of soft-capped logits, "
                f"dropout off in both models); reference: {self.reference}"]

    def memory_terms(self, shape: Shape, b: int, t: int, n: int, shards: bool,
                     frozen: dict[str, Shape]) -> dict[str, float]:
        """A preference run's extra memory: chosen and rejected run as one batch of 2B sequences, so the policy's
        activations count twice (the shared term counts B); the reference's forward on the same 2B sequences (no
        gradients; with LoRA it is the policy with its adapter disabled, so no weights); with full fine-tuning the
        reference's weights in model.dtype (/ N under ZeRO-3). KTO (an unpaired loss) adds a forward of both models on
        the B mismatched KL sequences. Loss: the log-probabilities' LM head (memory.logprob_head_bytes)."""
        sequences = b if self.dpo.unpaired else 2 * b
        terms = {"activations, rejected sides" if not self.dpo.unpaired else
                 "KL sequences (policy forward, no gradients)":
                 activation_bytes(shape, self, b, t) if not self.dpo.unpaired else forward_bytes(
                     shape, self.model.attn_implementation, b, t)}
        reference = frozen.get("reference")
        if reference is not None:
            terms["reference weights"] = reference.total_params * DTYPE_BYTES[self.model.dtype] / n
        ref_sequences = sequences * (2 if self.dpo.unpaired else 1)
        terms["reference forward (no gradients)"] = forward_bytes(reference or shape, self.model.attn_implementation,
                                                                  ref_sequences, t)
        terms["loss"] = logprob_head_bytes(shape, sequences * t, trl_head=shards)
        return terms


def dpo_problems(cfg: DpoConfig) -> tuple[list[str], list[str]]:
    """A preference run's rules: the policy's (continued_run_problems: on the base of a run it continues, whose
    adapter's shape lora.* must equal), then the loss: every dpo.loss_type known to TRL 1.16 (ORPO/SimPO refused
    with the reason), KTO's losses alone, weights one per loss, EXO's label smoothing, KTO's batch of at least 2
    (its KL estimate pairs each prompt with another example's answer in the batch)."""
    problem = generating_model_problem(cfg.model.name_or_path, "model.name_or_path")
    if problem:  # a reward run is an adapter too: not a starting policy
        return [problem], []
    errors, warnings = continued_run_problems(cfg)
    d = cfg.dpo
    for t in d.loss_type:
        if t in REFUSED_LOSSES:
            errors.append(f"dpo.loss_type: '{t}' is refused: {REFUSED_LOSSES[t]}")
        elif t not in PAIRED_LOSSES + UNPAIRED_LOSSES:
            errors.append(f"dpo.loss_type: '{t}' is not a TRL 1.16 loss (paired: {', '.join(PAIRED_LOSSES)}; "
                          f"unpaired: {', '.join(UNPAIRED_LOSSES)})")
    if not d.loss_type:
        errors.append("dpo.loss_type: empty; e.g. [sigmoid] (DPO)")
    if d.unpaired and len(d.loss_type) > 1:
        errors.append(f"dpo.loss_type: {d.loss_type}: {'/'.join(UNPAIRED_LOSSES)} read unpaired examples (TRL's "
                      "KTOTrainer) and cannot be combined with other losses")
    if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
        errors.append(f"dpo.loss_weights: {len(d.loss_weights)} weights for {len(d.loss_type)} losses in dpo.loss_type")
    if d.loss_weights is not None and not d.unpaired:
        negative = [f"{w:g} for '{t}'" for t, w in zip(d.loss_type, d.loss_weights) if not 0 <= w < math.inf]
        if negative:
            errors.append(f"dpo.loss_weights: {', '.join(negative)}: a negative weight trains that loss's opposite "
                          "(towards the rejected answers); weights are each loss's share: finite, >= 0")
        elif d.loss_weights and not any(d.loss_weights):
            errors.append("dpo.loss_weights: every weight is 0: the loss is 0, no gradient reaches the policy and "
                          "the adapter stays as it started")
    if d.unpaired and d.loss_weights is not None:
        errors.append("dpo.loss_weights: KTO has one loss; weigh its examples with dpo.desirable_weight and "
                      "dpo.undesirable_weight")
    if "exo_pair" in d.loss_type and d.label_smoothing == 0.0:
        errors.append("dpo.label_smoothing: exo_pair needs it > 0 (the EXO paper recommends 1e-3)")
    if "kto" in d.loss_type and cfg.training.per_device_train_batch_size < 2:
        errors.append("training.per_device_train_batch_size: kto needs at least 2 (its KL term pairs each prompt with "
                      "another example's answer in the same batch; with 1 it equals the reward itself)")
    if cfg.data.eval_dataset and (cfg.data.eval_fraction or cfg.data.eval_split):
        errors.append("data.eval_dataset with data.eval_fraction/eval_split: choose one source of held-out pairs")
    return errors, warnings

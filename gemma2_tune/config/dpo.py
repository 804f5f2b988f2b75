"""The `dpo` schema: preference optimisation against a frozen reference (TRL's DPOTrainer; KTOTrainer for
unpaired data).

data.* gives the preference pairs (data/preferences.py reads them); `dpo` is this method's own section. sft's
packing, loss and kernel keys are unknown keys here: a pair is scored whole, unpacked, by TRL's log-probabilities
(the final soft-cap applied). The reference is the starting policy: with LoRA the model with its adapter
disabled (or, when starting from an sft run's adapter, a frozen copy of that adapter); with full fine-tuning a
second copy loaded through the one loading path (declared in `frozen_models`).

Light module (pydantic, json): `validate` and `--dry-run` read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

from pydantic import Field, field_validator

from .rules import generating_model_problem, run_problems, saved_weights
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


class SftStart(NamedTuple):
    """A training run folder given as model.name_or_path (the usual order: sft, then preferences): its base model
    and, for a LoRA run, its adapter (`adapter` is the folder; None for a full fine-tune, which is a model folder).
    `lora`: the adapter's adapter_config.json (r, lora_alpha, target_modules, ...)."""

    folder: str
    base: str
    adapter: str | None
    lora: dict | None


def sft_start(name_or_path: str) -> SftStart | None:
    """What model.name_or_path holds when it is a gemma2-tune run folder with a LoRA adapter: its base (the run's
    config.yaml model.name_or_path, else adapter_config.json's base_model_name_or_path) and the adapter; None for
    anything else (hub ids, model folders, a full fine-tune's run folder: that loads as a model). Reads two small
    files, no torch. Raises ValueError when the adapter does not name its base."""
    path = Path(name_or_path).expanduser()
    adapter_config = path / "adapter_config.json"
    if saved_weights(path) != "adapter":
        return None
    lora = json.loads(adapter_config.read_text())
    base = None
    if (path / "config.yaml").is_file():
        import yaml

        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        base = (saved.get("model") or {}).get("name_or_path")
    base = base or lora.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"model.name_or_path: the adapter in {path} does not name its base model")
    return SftStart(str(path), str(base), str(path), lora)


class DpoConfig(RunConfig):
    """The `dpo` schema: a training run (the policy = model/quantization/lora) plus the preference loss. data.*
    gives the pairs (or unpaired examples for KTO); model.name_or_path may be an sft run folder (its adapter is
    the starting policy and the reference)."""

    method: Literal["dpo"] = Field("dpo", description=RunConfig.model_fields["method"].description)
    data: PreferenceDataSection = Field(default_factory=lambda: PreferenceDataSection(dataset="concise"))
    dpo: DpoSection = Field(default_factory=DpoSection)
    output: OutputSection = Field(default_factory=lambda: OutputSection(dir="runs/gemma2-dpo"))

    data_kind: ClassVar[str] = "preference pairs"

    def problems(self) -> tuple[list[str], list[str]]:
        """dpo_problems."""
        return dpo_problems(self)

    def frozen_models(self) -> list[FrozenModel]:
        """Full fine-tuning: the reference, a second copy of the starting model in model.dtype. With LoRA none:
        the reference is the model with its adapter disabled (or a frozen copy of the sft adapter)."""
        if self.lora.enabled:
            return []
        return [FrozenModel("reference", self.base_model, "full", self.model.attn_implementation)]

    @property
    def base_model(self) -> str:
        """The base checkpoint under the trained weights: an sft run folder's base when training starts from one."""
        try:
            start = sft_start(self.model.name_or_path)
        except (OSError, ValueError):
            start = None
        return start.base if start else self.model.name_or_path

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
        start = None
        try:
            start = sft_start(self.model.name_or_path)
        except (OSError, ValueError):
            pass
        if start and self.lora.enabled:
            reference = f"the sft policy {start.folder} (base {start.base} + its adapter, kept frozen as `ref`)"
        elif self.lora.enabled:
            reference = "the starting model, its LoRA adapter disabled (no second copy in memory)"
        else:
            reference = f"a second copy of {self.model.name_or_path} ({self.model.dtype}), frozen"
        trainer = "KTOTrainer" if self.dpo.unpaired else "DPOTrainer"
        return [f"dpo:          {self.dpo.describe()} (TRL {trainer}, log-probabilities of soft-capped logits, "
                f"dropout off in both models); reference: {reference}"]


def dpo_problems(cfg: DpoConfig) -> tuple[list[str], list[str]]:
    """A preference run's rules: the policy's (run_problems, on the base when starting from an sft run), then the
    loss: every dpo.loss_type known to TRL 1.16 (ORPO/SimPO refused with the reason), KTO's losses alone, weights
    one per loss, EXO's label smoothing, KTO's batch of at least 2 (its KL estimate pairs each prompt with another
    example's answer in the batch); a starting sft adapter's LoRA shape equal to lora.*."""
    problem = generating_model_problem(cfg.model.name_or_path, "model.name_or_path")
    if problem:  # a reward run is an adapter too: not a starting policy
        return [problem], []
    try:
        start = sft_start(cfg.model.name_or_path)
    except (OSError, ValueError) as exc:
        return [str(exc)], []
    checked = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": start.base})}) if start \
        else cfg
    errors, warnings = run_problems(checked)
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
    if start:
        lora = start.lora or {}
        if cfg.lora.enabled:
            saved = (lora.get("r"), lora.get("lora_alpha"), sorted(lora.get("target_modules") or []))
            wanted = (cfg.lora.r, cfg.lora.alpha, sorted(cfg.lora.target_modules))
            if saved != wanted:
                errors.append(f"lora.r/alpha/target_modules are {wanted[0]}/{wanted[1]}/{wanted[2]} but the sft adapter "
                              f"in {start.folder} has {saved[0]}/{saved[1]}/{saved[2]}: a LoRA preference run trains "
                              "that adapter further; set lora.* to its values")
    return errors, warnings

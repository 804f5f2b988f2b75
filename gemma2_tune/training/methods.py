"""The training methods, one registry entry each: the one place that says what a method is made of.

    METHODS["sft"]      conversations -> SftConfig     -> training/sft.py      (SFTTrainer, supervised loss)
    METHODS["distill"]  prompts       -> DistillConfig -> training/distill.py  (DistillationTrainer)
    METHODS["dpo"]      pairs         -> DpoConfig     -> training/dpo.py      (DPOTrainer; KTOTrainer unpaired)
    METHODS["reward"]   pairs         -> RewardConfig  -> training/reward.py   (RewardTrainer, one-score head)
    METHODS["rl"]       prompts       -> RlConfig      -> training/rl.py       (GRPOTrainer / RLOOTrainer)

An entry names the method's schema (config/<method>.py: its sections, rules, the models it loads beside
the trained one, its dry-run lines), its runner (training/<method>.py: what it loads, the trainer it builds,
what it records; the run order itself is `lifecycle.train`), its `plan` memory terms and launch rules, and
its help. Nothing outside a method's own modules and this registry asks which method is running.

Adding a method: config/<method>.py (schema), training/<method>.py (a `Runner`), one `Method(...)` here, a
command in cli/train.py, and tests. Light module (no torch): `validate`, `plan` and `--dry-run` read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..config.distill import DistillConfig
from ..config.dpo import DpoConfig
from ..config.reward import RewardConfig
from ..config.recipes import find_recipe, load_recipe
from ..config.schema import RunConfig
from ..config.rl import RlConfig, rl_launch_problems
from ..config.sft import SftConfig
from ..errors import ConfigError, UserError
from . import plan
from .launch import sft_launch_problems


@dataclass(frozen=True)
class Method:
    """A training method. `runner`: the module whose `Runner` class supplies the method's pieces to the run
    lifecycle (imported only to train: it imports torch and TRL). `plan_terms(shape, cfg, batch, length,
    shards, frozen) -> {term: bytes}`: the memory the method adds to the shared terms (its loss at least).
    `launch_problems(cfg, launch) -> [problem]`: the method's own keys against the launch. `folds_accumulation`:
    the run may fold accumulated micro-batches (plan shows the micro-batch it will use)."""

    name: str
    schema: type[RunConfig]
    summary: str
    runner: str
    plan_terms: Callable[..., dict[str, float]]
    launch_problems: Callable[[Any, Any], list[str]] = lambda cfg, launch: []
    folds_accumulation: bool = False

    def run(self, cfg: RunConfig, **kwargs: Any) -> dict[str, Any]:
        """Train `cfg` through the run lifecycle; returns the manifest (run.json). kwargs: echo, recipe,
        resume, resume_from."""
        from .lifecycle import train

        return train(importlib.import_module(self.runner).Runner(cfg), **kwargs)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", SftConfig, "Supervised fine-tuning (QLoRA by default) on a chat dataset.",
           "gemma2_tune.training.sft", plan.sft_terms, sft_launch_problems, folds_accumulation=True),
    Method("distill", DistillConfig, "On-policy distillation: the student writes answers to the prompts and "
           "learns the teacher's distribution.", "gemma2_tune.training.distill", plan.distill_terms),
    Method("dpo", DpoConfig, "Preference optimisation on chosen/rejected pairs against a frozen reference: DPO and "
           "TRL's other losses (ipo, hinge, robust, apo_zero, ...), KTO on unpaired examples.",
           "gemma2_tune.training.dpo", plan.dpo_terms),
    Method("reward", RewardConfig, "A reward model on chosen/rejected pairs: Gemma with a one-score head, "
           "held-out pairwise accuracy.", "gemma2_tune.training.reward", plan.reward_terms),
    Method("rl", RlConfig, "Online reinforcement learning (GRPO loss types or RLOO): the policy writes groups of "
           "answers to the prompts, rewarded by Python functions and/or a reward model.", "gemma2_tune.training.rl",
           plan.rl_terms, rl_launch_problems),
)}
# Sections only one method has: a recipe without `method:` that has one of them is that method's.
IMPLIED_BY_SECTION = {"teacher": "distill", "distill": "distill", "dpo": "dpo", "reward": "reward", "rl": "rl"}


def method_for(cfg: RunConfig) -> Method:
    """The registry entry of a resolved config."""
    return METHODS[cfg.method]


def method_of_mapping(data: Any) -> str:
    """The method a raw config mapping (a recipe, a saved config.yaml) is written for: its `method:` key, else
    implied by a method's own section (`teacher`/`distill`: distill), else sft (every recipe before `method:`).
    An unknown `method:` is returned as is (resolve reports it against the schema)."""
    if not isinstance(data, dict):
        return "sft"
    if data.get("method") is not None:
        return str(data["method"])
    implied = {IMPLIED_BY_SECTION[k] for k in data if k in IMPLIED_BY_SECTION}
    return implied.pop() if len(implied) == 1 else "sft"


def schema_for(recipe: str | None, sets: list[str] | None = None, default: str = "sft") -> type[RunConfig]:
    """The schema a recipe (and --set items) is written for, by `method_of_mapping`; `default` when neither
    names a method nor has a method's own section. Raises ConfigError for an unknown method."""
    data: dict[str, Any] = {}
    if recipe:
        try:
            data = dict(load_recipe(find_recipe(recipe)))
        except ConfigError:
            pass  # resolve() reports it
    for item in sets or []:
        key, _, value = item.partition("=")
        if key.strip() == "method":
            data["method"] = value.strip()
        else:
            data.setdefault(key.strip().split(".", 1)[0], {})
    says = data.get("method") is not None or bool(set(data) & set(IMPLIED_BY_SECTION))
    name = method_of_mapping(data) if says else default
    if name not in METHODS:
        raise ConfigError([f"method: '{name}' is not a training method (methods: {', '.join(METHODS)})"])
    return METHODS[name].schema


def check_command(command: str, recipe: str | None, sets: list[str] | None) -> None:
    """A recipe written for another method than the command running it is refused, naming the command to use.
    Raises UserError."""
    schema = schema_for(recipe, sets, default=command)
    written_for = next(name for name, m in METHODS.items() if m.schema is schema)
    if written_for != command:
        raise UserError(f"{recipe or '--set'}: written for `{written_for}` (method: {written_for}); run it with "
                        f"`gemma2-tune {written_for}`, or set method: {command} and its keys")


def saved_schema(data: Any) -> type[RunConfig] | None:
    """The schema of a saved config.yaml mapping (runs from before `method:` included); None when its method
    is not one this version knows."""
    method = METHODS.get(method_of_mapping(data))
    return method.schema if method else None

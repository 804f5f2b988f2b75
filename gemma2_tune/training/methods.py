"""The training methods, one registry entry each: the one place that says what a method is made of.

    METHODS["sft"]      conversations -> SftConfig     -> training/sft.py      (SFTTrainer, supervised loss)
    METHODS["distill"]  prompts       -> DistillConfig -> training/distill.py  (DistillationTrainer)
    METHODS["dpo"]      pairs         -> DpoConfig     -> training/dpo.py      (DPOTrainer; KTOTrainer unpaired)
    METHODS["reward"]   pairs         -> RewardConfig  -> training/reward.py   (RewardTrainer, one-score head)
    METHODS["rl"]       prompts       -> RlConfig      -> training/rl.py       (GRPOTrainer / RLOOTrainer)

An entry names the method's schema (config/<method>.py: its sections, rules, launch rules, memory terms, the
models it loads beside the trained one, its dry-run lines), its runner (training/<method>.py: what it loads, the
trainer it builds, what it records; the run order itself is `lifecycle.train`), its command's own flags and its
help. Nothing outside a method's own modules and this registry asks which method is running; nothing below
this registry imports it (the modules it names take what they need from the config).

Adding a method: config/<method>.py (schema), training/<method>.py (a `Runner`), one `Method(...)` here (its
command and the flags only it has are generated from the entry by cli/train.py), and tests. Light module (no
torch): `validate`, `plan` and `--dry-run` read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..config.distill import DistillConfig
from ..config.dpo import DpoConfig
from ..config.reward import RewardConfig
from ..config.schema import RunConfig
from ..config.rewards import reward_function_specs
from ..config.rl import RlConfig
from ..config.sft import SftConfig


@dataclass(frozen=True)
class Flag:
    """A command-line option of a training command that sets one config key. `names`: the option's spellings
    ("--teacher", "-t"); `kind`: its value's type (str, int, float, or list[str] for a repeatable option);
    `convert`: turns the parsed value into the key's value (None: as parsed). A method's flag with the same first
    name as a shared one (cli/train.py) replaces it for that method's command."""

    key: str
    names: tuple[str, ...]
    kind: Any
    help: str
    convert: Callable[[Any], Any] | None = None

    @property
    def parameter(self) -> str:
        """The Python name of the option ('--num-generations' -> 'num_generations')."""
        return self.names[0].lstrip("-").replace("-", "_")


def comma_list(value: str) -> list[str]:
    """'sigmoid, sft' -> ['sigmoid', 'sft']."""
    return [part.strip() for part in value.split(",")]


@dataclass(frozen=True)
class Method:
    """A training method. `runner`: the module whose `Runner` class supplies the method's pieces to the run
    lifecycle (imported only to train: it imports torch and TRL). `flags`: the options only this method's command
    has (cli/train.py adds the shared ones). What the schema says of the method (its rules, launch rules, memory
    terms, whether it folds accumulation) is the schema's."""

    name: str
    schema: type[RunConfig]
    summary: str
    runner: str
    flags: tuple[Flag, ...] = ()

    def run(self, cfg: RunConfig, **kwargs: Any) -> dict[str, Any]:
        """Train `cfg` through the run lifecycle; returns the manifest (run.json). kwargs: echo, recipe,
        resume, resume_from."""
        from .lifecycle import train

        return train(importlib.import_module(self.runner).Runner(cfg), **kwargs)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", SftConfig, "Supervised fine-tuning (QLoRA by default) on a chat dataset.",
           "gemma2_tune.training.sft",
           flags=(Flag("data.max_length", ("--max-length",), int, "data.max_length"),)),
    Method("distill", DistillConfig, "On-policy distillation: the student writes answers to the prompts and "
           "learns the teacher's distribution.", "gemma2_tune.training.distill",
           flags=(Flag("teacher.name_or_path", ("--teacher", "-t"), str, "teacher.name_or_path: hub id or local "
                       "folder of a larger model of the same family."),)),
    Method("dpo", DpoConfig, "Preference optimisation on chosen/rejected pairs against a frozen reference: DPO and "
           "TRL's other losses (ipo, hinge, robust, apo_zero, ...), KTO on unpaired examples.",
           "gemma2_tune.training.dpo",
           flags=(Flag("dpo.loss_type", ("--loss-type",), str, "dpo.loss_type: sigmoid (DPO), ipo, hinge, robust, "
                       "apo_zero, kto, ... (comma-separated to combine)", comma_list),
                  Flag("dpo.beta", ("--beta",), float, "dpo.beta: the pull towards the reference."))),
    Method("reward", RewardConfig, "A reward model on chosen/rejected pairs: Gemma with a one-score head, "
           "held-out pairwise accuracy.", "gemma2_tune.training.reward"),
    Method("rl", RlConfig, "Online reinforcement learning (GRPO loss types or RLOO): the policy writes groups of "
           "answers to the prompts, rewarded by Python functions and/or a reward model.", "gemma2_tune.training.rl",
           flags=(Flag("model.name_or_path", ("--model", "-m"), str, "model.name_or_path: the starting policy: a "
                       "hub id, a model folder, or a gemma2-tune LoRA run folder (its base + adapter: the starting "
                       "policy and the reference)."),
                  Flag("rl.reward_functions", ("--reward-function",), list[str], "rl.reward_functions: "
                       "PATH.py:NAME[=WEIGHT], TRL's signature f(prompts, completions, **kwargs) -> list[float]; "
                       "repeatable.", reward_function_specs),
                  Flag("reward_model.name_or_path", ("--reward-model",), str, "reward_model.name_or_path: a "
                       "sequence-classification folder (one output) or hub id."),
                  Flag("rl.algorithm", ("--algorithm",), str, "rl.algorithm: grpo, dapo, dr_grpo, bnpo, cispo, "
                       "sapo or rloo."),
                  Flag("rl.num_generations", ("--num-generations",), int, "rl.num_generations: the group size."))),
)}


def method_for(cfg: RunConfig) -> Method:
    """The registry entry of a resolved config."""
    return METHODS[cfg.method]

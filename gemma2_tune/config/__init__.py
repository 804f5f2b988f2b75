"""Configuration: one schema per training method, layered from defaults, a recipe, --set items and flags.

    schema.py     the shared sections and their base, RunConfig; light: pydantic only
    sft.py        the `sft` schema (SftConfig)
    distill.py    the `distill` schema (DistillConfig: + teacher, distill) and its rules
    dpo.py        the `dpo` schema (DpoConfig: + dpo; preference pairs, KTO's unpaired examples)
    reward.py     the `reward` schema (RewardConfig: + reward; a one-score head on preference pairs)
    rl.py         the `rl` schema (RlConfig: + rl: algorithm, group, KL, clipping, rewards) and its rules
    rewards.py    reward functions and reward models as a run or `eval` names them (rl, eval, rewards.py read it)
    rules.py      rules every method shares, reading the model's family
    methods.py    which method (so which schema) a recipe, a saved config or a command is written for
    memory.py     the memory model: bytes per process of a run, term by term (plan, the micro-batch choice)
    runs.py       a run folder -> its base model + adapter, following the runs it continued (the one reader)
    layering.py   resolve(recipe, sets, flags, schema) -> Resolved, every problem at once
    requests.py   the options of the after-training commands (merge-models, eval, ...), checked the same way
    recipes.py    bundled recipes, finding and reading recipe files
    reference.py  the config reference (README table, `gemma2-tune config`)

The registry of methods (schema, runner, command flags) is gemma2_tune/training/methods.py.
"""

# Every method's schema is imported here, sft first: schema.method_schemas() lists them in this order.
from .sft import SftConfig  # noqa: I001
from .distill import DistillConfig
from .dpo import DpoConfig
from .reward import RewardConfig
from .rl import RlConfig
from .layering import Resolved, config_to_yaml, parse_set, resolve
from .schema import DataSection, RunConfig

__all__ = ["DataSection", "DistillConfig", "DpoConfig", "Resolved", "RewardConfig", "RlConfig", "RunConfig",
           "SftConfig", "config_to_yaml", "parse_set", "resolve"]

"""Rewards as a run or an evaluation names them: Python reward functions (TRL's signature) and reward models
(sequence classifiers with one output, e.g. a `gemma2-tune reward` run), the --reward-function flag's syntax, and
what a reward model's folder may be, from its files alone. Read by `rl` (config/rl.py), `eval --reward-function /
--reward-model` (config/requests.py, after/reward_eval.py) and gemma2_tune/rewards.py, which loads them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..errors import ConfigError
from .rules import reward_model_kind
from .runs import adapter_folder, missing_folder, unfinished_run
from .schema import Section


class RewardFunction(Section):
    """A Python reward function, TRL's signature: `f(prompts, completions, **columns) -> list[float]`, one
    reward per completion (prompts and completions are message lists: completion[0]['content'] is the text)."""

    path: str = Field(description="A .py file defining the function (relative to the working directory).")
    name: str = Field(description="The function's name in that file.")
    weight: float = Field(1.0, description="Its weight in the summed reward.")

    @property
    def label(self) -> str:
        """`path:name`, as messages name it."""
        return f"{self.path}:{self.name}"


class RewardModelSection(Section):
    """A reward model: any sequence-classification checkpoint with one output (a `gemma2-tune reward` run, or
    a hub id), frozen, in eval mode, scoring prompt + completion rendered with its own chat template (ours when
    it has none)."""

    name_or_path: str | None = Field(None, description="Hub id or local folder of the reward model (null: none).")
    load_in: Literal["4bit", "8bit", "full"] = Field(
        "full", description="Its precision: 4-bit NF4 (quantization.* settings), 8-bit, or `full` (model.dtype).")
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    attn_implementation: Literal["eager", "sdpa"] = Field(
        "eager", description="Its attention kernel (eager keeps Gemma 2's soft-caps).")
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading it.")


def reward_function_specs(items: list[str] | None) -> list[dict[str, Any]] | None:
    """--reward-function PATH.py:NAME[=WEIGHT] items -> rl.reward_functions entries (None: not given). Raises
    ConfigError naming the item that is not of that form."""
    if not items:
        return None
    specs = []
    for item in items:
        target, _, weight = item.partition("=")
        path, sep, name = target.rpartition(":")
        if not sep or not path or not name:
            raise ConfigError([f"--reward-function {item}: expected PATH.py:NAME (optionally =WEIGHT)"])
        try:
            specs.append({"path": path, "name": name, "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise ConfigError([f"--reward-function {item}: the weight after '=' must be a number"]) from None
    return specs


def reward_model_path_problem(name: str, key: str) -> str | None:
    """Why `name` can't be a reward model, from its files alone (naming `key`): no such folder (a local path, or a
    bare name, which is no hub id), a run that holds no trained weights yet, a LoRA adapter of a causal LM. None:
    it may be one (whether it is a one-output sequence classifier is checked when its config loads)."""
    missing = missing_folder(name, bare_names=True)
    if missing:
        return f"{key}: {name}: {missing}"
    unfinished = unfinished_run(name)
    if unfinished:
        return f"{key}: {unfinished}"
    if adapter_folder(name) and not reward_run(name):
        return (f"{key}: {name} is a LoRA adapter of a causal LM, not a reward model (a `gemma2-tune reward` run or "
                "a one-output sequence classifier)")
    return None


def reward_run(name: str) -> bool:
    """A local `gemma2-tune reward` run (or any PEFT SEQ_CLS adapter): adapter_config.json with task_type SEQ_CLS
    and no whole model beside it."""
    return adapter_folder(name) and reward_model_kind(name) is not None

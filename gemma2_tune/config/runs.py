"""What a folder named as a model holds, from its small files (no torch, no weights read).

    missing_folder(name)   a name meant as a local folder that is none ("no such folder", "a file, ...")
    saved_weights(path)    the trained weights at a folder's top: "adapter", "model" or None
    unfinished_run(name)   a run folder that holds no weights yet, with how to go on
    adapter_run(name)      a folder with a LoRA adapter and the whole model it applies to

`adapter_run` is the one reader of "run folder -> base + adapter": every command that takes a run as it is reads
its base here (dpo, rl and reward starting from a run; chat, eval, merge, merge-models, serve and export loading
one; plan counting its shape). A run that started from another run's adapter trained that adapter further, so its
own adapter still applies to the first run's base: a `dpo` run started from an `sft` run names the sft run as its
model.name_or_path, and the base is found by following such names back to a whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..files import checkpoint_step, list_checkpoints

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"  # a run's resolved config (training/manifest.py writes it; ema/ holds a copy)
MAX_STAGES = 64  # runs followed back to a base at most: a longer chain is a loop of folders naming each other


def missing_folder(name: str, bare_names: bool = False) -> str | None:
    """Why `name`, meant as a local model folder, is none: "a file, not a model folder", or "no such folder" when
    it reads as a path (starts with / ./ ../ ~, has more than one slash, or its first part is a folder here) or,
    with `bare_names`, has no slash at all (no hub id: those are org/name). None: it exists, or may be a hub id
    or a builtin:NAME model."""
    path = Path(name).expanduser()
    if path.is_file():
        return "a file, not a model folder"
    if path.exists() or ":" in name:
        return None
    slashes = name.count("/")
    if name.startswith(("/", "./", "../", "~")) or slashes > 1:
        return "no such folder"
    if slashes == 1 and path.parent.is_dir():
        return f"no such folder ({path.parent}/ is a folder here, so this is a path, not a hub id)"
    if slashes == 0 and bare_names:
        return "no such folder (a hub id has the form org/name)"
    return None


def saved_weights(path: Path) -> str | None:
    """What trained weights the folder `path` holds at its top: "adapter" (adapter_config.json +
    adapter_model.safetensors), "model" (config.json + *.safetensors: a full fine-tune, a merge) or None."""
    if (path / ADAPTER_CONFIG).is_file() and (path / "adapter_model.safetensors").is_file():
        return "adapter"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "model"
    return None


def adapter_folder(name: str) -> bool:
    """A local folder holding a LoRA adapter's config and no whole model (its weights file may be missing)."""
    path = Path(name).expanduser()
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def unfinished_run(name: str) -> str | None:
    """Why the local folder `name` can't be used as a model yet: a run folder (run.json) that holds no trained
    weights (its run was interrupted, failed or is running: no adapter or model files at its top), with how to go
    on (resume it, or use its last complete checkpoint-N: one with its completion marker); None for anything else."""
    path = Path(name).expanduser()
    if not (path / "run.json").is_file():
        return None
    if saved_weights(path):
        return None
    try:
        record = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        record = {}
    # a checkpoint without its completion marker was being written when the run stopped: never suggested
    complete = [c for c in list_checkpoints(path) if c.complete]
    method = record.get("method") or "sft"
    return (f"{name} is a run that holds no trained weights (run.json: status {record.get('status', '?')}, step "
            f"{record.get('global_step') or 0}): resume it (gemma2-tune {method} -o {name} --resume)"
            + (f" or use its last complete checkpoint, {complete[-1].path}" if complete else ""))


@dataclass(frozen=True)
class AdapterRun:
    """A folder holding a LoRA adapter (a gemma2-tune run, its checkpoint-N/ or ema/, or any PEFT adapter folder)
    and the whole model the adapter applies to.

    folder: as given; base: a hub id, builtin:NAME or model folder; adapter_config: its adapter_config.json;
    started_from: the earlier runs followed to reach the base, nearest first (a dpo run's sft run)."""

    folder: str
    base: str
    adapter_config: dict[str, Any]
    started_from: tuple[str, ...] = ()

    @property
    def reward_model(self) -> bool:
        """A sequence-classification adapter (a `gemma2-tune reward` run: PEFT task SEQ_CLS, its score head saved
        with it)."""
        return self.adapter_config.get("task_type") == "SEQ_CLS"

    @property
    def shape(self) -> tuple[Any, Any, list[str]]:
        """(r, lora_alpha, sorted target module names): what lora.* must equal to train this adapter further."""
        c = self.adapter_config
        return c.get("r"), c.get("lora_alpha"), target_names(c.get("target_modules"))

    def describe(self) -> str:
        """'runs/dpo (its adapter on google/gemma-2-2b, started from runs/sft)'."""
        via = f", started from {', '.join(self.started_from)}" if self.started_from else ""
        return f"{self.folder} (its adapter on {self.base}{via})"


# The regex models/lora.py:lora_targets writes for a model whose towers have modules of the decoder's names (image +
# text checkpoints): "<decoder>\.layers\.\d+\.[a-z_]+\.(?:k_proj|o_proj|q_proj|v_proj)"; its group holds the names.
_DECODER_TARGETS = re.compile(r"\\\.layers\\\.\\d\+\\\.\[a-z_\]\+\\\.\(\?:([A-Za-z0-9_|]+)\)$")


def target_names(targets: Any) -> list[str]:
    """An adapter's target_modules (adapter_config.json) as sorted module names, as lora.target_modules says them:
    a list as it is; the decoder-only regex this package writes for image + text checkpoints as the names in its
    group; any other regex as itself (a rule then names it)."""
    if not targets:
        return []
    if isinstance(targets, str):
        found = _DECODER_TARGETS.search(targets)
        return sorted(found.group(1).split("|")) if found else [targets]
    return sorted(targets)


def _config_of(path: Path) -> Path:
    """The config.yaml that describes `path`: its own, or for a checkpoint-N/ folder its run's (a resume keeps the
    config)."""
    own = path / RUN_CONFIG
    if not own.is_file() and checkpoint_step(path.name) is not None:
        return path.parent / RUN_CONFIG
    return own


def _named_base(path: Path, adapter_config: dict[str, Any]) -> str | None:
    """What the adapter in `path` names as its model: the run's config.yaml model.name_or_path (as typed: a hub id,
    builtin:NAME, a model folder, or the run it started from), else PEFT's base_model_name_or_path. A name that
    is no folder here (a relative path given in another working directory, a deleted earlier run; or a hub id)
    gives way to PEFT's record of the model the adapter was put on when that is a folder here (for a hub
    download PEFT records the hub id itself)."""
    peft_base = adapter_config.get("base_model_name_or_path") or None
    try:
        saved = yaml.safe_load(_config_of(path).read_text()) or {}
        name = (saved.get("model") or {}).get("name_or_path")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    if not isinstance(name, str) or not name:
        return peft_base
    here = Path(name).expanduser().exists() or ":" in name  # a folder here, or builtin:NAME
    if not here and peft_base and Path(peft_base).expanduser().is_dir():
        return peft_base
    return name


def adapter_run(name: str) -> AdapterRun | None:
    """`name` as a folder holding a LoRA adapter (adapter_config.json and no config.json: adapter_folder; whether
    its weights are there is saved_weights'), with the whole model under it: the model its run names, followed
    through earlier runs with adapters (a run started from another run's adapter trained that adapter further: its
    base is the earlier run's base). None when `name` holds no adapter (a hub id, a model folder, a full
    fine-tune, a run with no weights yet). Raises ValueError naming the folder when its adapter_config.json is
    unreadable or nothing names a base."""
    path = Path(name).expanduser()
    if not adapter_folder(name):
        return None
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: {ADAPTER_CONFIG} is unreadable ({type(exc).__name__})") from None
    base, via, here, here_config = None, [], path, config
    for _ in range(MAX_STAGES):
        base = _named_base(here, here_config)
        if base is None:
            raise ValueError(f"{name}: the adapter does not name its base model (no {RUN_CONFIG} with "
                             f"model.name_or_path, no base_model_name_or_path in {ADAPTER_CONFIG})")
        earlier = Path(base).expanduser()
        if not adapter_folder(base):
            return AdapterRun(name, base, config, tuple(via))
        via.append(base)
        here = earlier
        try:
            here_config = json.loads((earlier / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError):
            here_config = {}
    raise ValueError(f"{name}: more than {MAX_STAGES} runs name each other as their model ({' -> '.join(via[:4])} "
                     "...): no base model is reached")


def with_adapter_lora(data: dict[str, Any], start: AdapterRun) -> dict[str, Any]:
    """Raw config settings (a recipe's mapping with --set items and flags merged in) with lora.r, lora.alpha and
    lora.target_modules taken from `start`'s adapter where they are not given: the run trains that adapter."""
    lora = data.get("lora", {})
    if not isinstance(lora, dict):
        return data  # not a section: the schema says so
    r, alpha, targets = start.shape
    taken = {"r": r, "alpha": alpha, "target_modules": targets if targets else None}
    return dict(data, lora={**{k: v for k, v in taken.items() if v is not None}, **lora})

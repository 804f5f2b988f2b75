"""Checkpoints that are complete or visibly not, and choosing one to resume from.

The trainer writes `checkpoint-N/` file by file. Only after every rank has finished writing does the
main process add `complete.json` (atomically: write, then rename), holding the step and the resolved
config. A folder without it (a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.schema import RunConfig
from ..errors import UserError
from ..files import COMPLETE as MARKER
from ..files import write_text_atomic

_STEP = re.compile(r"^checkpoint-(\d+)$")
# Keys that may differ between the run that saved a checkpoint and the run that resumes from it.
RESUMABLE_DIFFERENCES = {"output.dir", "output.overwrite"}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint-N folder, its step, and whether every rank finished writing it (complete.json)."""

    path: Path
    step: int
    complete: bool


def list_checkpoints(out: Path) -> list[Checkpoint]:
    """Every checkpoint-N folder in `out`, oldest first."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir():
                found.append(Checkpoint(p, int(m.group(1)), (p / MARKER).is_file()))
    return sorted(found, key=lambda c: c.step)


def mark_complete(path: Path, step: int, cfg: RunConfig) -> None:
    """Write complete.json (step + resolved config) into a checkpoint every rank has finished writing."""
    write_text_atomic(path / MARKER, json.dumps({"step": step, "config": cfg.model_dump(mode="json")}, indent=1))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """'key: checkpoint X, now Y' for every key that differs (output.* may differ)."""
    a, b = _flatten(saved), _flatten(cfg.model_dump(mode="json"))
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k not in RESUMABLE_DIFFERENCES and a.get(k) != b.get(k)]


def check_checkpoint(path: Path, cfg: RunConfig) -> Checkpoint:
    """A checkpoint this config can resume from, or a UserError saying why not."""
    m = _STEP.match(path.name)
    if not path.is_dir() or not m:
        raise UserError(f"--resume-from {path}: not a checkpoint folder (expected .../checkpoint-<step>/)")
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"--resume-from {path}: incomplete checkpoint (no {MARKER}; the run was probably stopped "
                        "while saving); pick an earlier one or use --resume") from None
    diffs = config_differences(marker.get("config", {}), cfg)
    if diffs:
        raise UserError(f"{path}: saved by a run with a different config; resuming would mix two recipes:\n"
                        + "\n".join(f"  - {d}" for d in diffs))
    return Checkpoint(path, int(m.group(1)), True)


def newest_complete(out: Path, cfg: RunConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    """For --resume: the newest complete checkpoint in `out`, and the incomplete ones skipped over."""
    found = list_checkpoints(out)
    complete = [c for c in found if c.complete]
    if not complete:
        detail = f" ({len(found)} incomplete)" if found else ""
        raise UserError(f"--resume: no complete checkpoint in {out}{detail}; set training.save_steps to checkpoint a run")
    best = complete[-1]
    skipped = [c for c in found if not c.complete and c.step > best.step]
    return check_checkpoint(best.path, cfg), skipped

"""Checkpoints that are complete or visibly not, and choosing one to resume from.

The trainer writes `checkpoint-N/` file by file. Only after every rank has finished writing and flushed
its files to disk (fsync) does the main process add `complete.json` (atomically: write, fsync, rename),
holding the step, the resolved config, the data's fingerprint and every file's size. A folder without it (a
run killed while saving) is never resumed from; one whose files do not match it (truncated by a power loss
or a full disk, a file missing, an unreadable trainer state) is named and skipped for an older one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.schema import RunConfig
from ..errors import UserError
from ..files import COMPLETE as MARKER
from ..files import Checkpoint, checkpoint_step, list_checkpoints, write_text_atomic

# Keys that may differ between the run that saved a checkpoint and the run that resumes from it.
RESUMABLE_DIFFERENCES = {"output.dir", "output.overwrite"}


def mark_complete(path: Path, step: int, cfg: RunConfig, data_fingerprint: str | None = None) -> None:
    """Write complete.json (step, resolved config, data fingerprint, {file: bytes}) into a checkpoint every
    rank has finished writing and flushed."""
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != MARKER}
    write_text_atomic(path / MARKER, json.dumps({"step": step, "config": cfg.model_dump(mode="json"),
                                                 "data_fingerprint": data_fingerprint, "files": files}, indent=1))


def damage(path: Path) -> str | None:
    """Why a marked checkpoint cannot be loaded, or None: a file the marker lists that is missing or of another
    size, no readable trainer_state.json, a safetensors file whose header does not parse, a torch file (zip)
    whose directory is unreadable. Reads headers only (seconds, even for large checkpoints)."""
    import zipfile

    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{path / MARKER} is unreadable"
    for name, size in (marker.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size:,} bytes, {size:,} when the checkpoint was written (truncated)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{path / 'trainer_state.json'} is {'missing' if isinstance(exc, OSError) else 'not valid JSON'}"
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with open(file, "rb") as fh:
                header = int.from_bytes(fh.read(8), "little")
                json.loads(fh.read(header))
            if header + 8 > file.stat().st_size:
                raise ValueError
        except (OSError, ValueError):
            return f"{file} is not a readable safetensors file (truncated?)"
    for file in sorted(path.rglob("*.pt")) + sorted(path.rglob("*.pth")):
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return f"{file} is not a readable torch file (truncated?)"
    return None


def marked_data_fingerprint(path: Path) -> str | None:
    """The data fingerprint a checkpoint's marker recorded (None: not recorded, a checkpoint from before)."""
    try:
        return json.loads((path / MARKER).read_text()).get("data_fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """'key: checkpoint X, now Y' for every key that differs (output.* may differ; a checkpoint from before
    `method:` was recorded has the method its sections imply; a key added since it was written counts at its
    default)"""
    from ..config.methods import method_of_mapping

    saved = {"method": method_of_mapping(saved), **saved} if isinstance(saved, dict) else saved
    try:  # keys added since the checkpoint was written count at their defaults
        saved = type(cfg).model_validate(saved).model_dump(mode="json")
    except ValueError:  # a config this version no longer reads: compare what was written
        pass
    a, b = _flatten(saved), _flatten(cfg.model_dump(mode="json"))
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k not in RESUMABLE_DIFFERENCES and a.get(k) != b.get(k)]


def check_checkpoint(path: Path, cfg: RunConfig) -> Checkpoint:
    """A checkpoint this config can resume from, or a UserError saying why not."""
    step = checkpoint_step(path.name)
    if not path.is_dir() or step is None:
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
    broken = damage(path)
    if broken:
        raise UserError(f"--resume-from {path}: the checkpoint cannot be loaded: {broken}; pick an earlier one")
    return Checkpoint(path, step, True)


def newest_complete(out: Path, cfg: RunConfig) -> tuple[Checkpoint, list[tuple[Checkpoint, str]]]:
    """For --resume: the newest complete, loadable checkpoint in `out`, and the newer ones skipped over with
    the reason (incomplete: no marker; damaged: `damage`'s reason). Raises UserError when none can be used,
    naming what is wrong with each."""
    found = list_checkpoints(out)
    skipped: list[tuple[Checkpoint, str]] = []
    for c in reversed(found):
        if not c.complete:
            skipped.append((c, "incomplete: no complete marker (stopped while saving)"))
            continue
        broken = damage(c.path)
        if broken:
            skipped.append((c, f"cannot be loaded: {broken}"))
            continue
        return check_checkpoint(c.path, cfg), skipped
    if not found:
        raise UserError(f"--resume: no complete checkpoint in {out}; set training.save_steps to checkpoint a run")
    reasons = "\n".join(f"  - {c.path}: {why}" for c, why in skipped)
    raise UserError(f"--resume: no loadable checkpoint in {out}:\n{reasons}\nstart again with --overwrite, or "
                    "--resume-from a checkpoint copied from elsewhere")

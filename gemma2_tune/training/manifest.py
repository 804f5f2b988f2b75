"""What a run records about itself (run.json), and the output directory's safety rules."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_text_atomic

MANIFEST = "run.json"
RESOLVED_CONFIG = "config.yaml"
LIBRARIES = ["gemma2-tune", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "deepspeed"]


def library_versions() -> dict[str, str | None]:
    """Installed versions of Python and the libraries a run depends on (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    """run.json, written atomically."""
    write_text_atomic(out / MANIFEST, json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(out: Path) -> dict[str, Any] | None:
    """A folder's run.json, or None when it has none (or it is unreadable)."""
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def never_trained(path: Path, previous: dict[str, Any]) -> bool:
    """A run of ours that failed before its first optimizer step (no step reached, no checkpoint): it holds
    nothing worth keeping, so rerunning the same command may replace it without --overwrite."""
    return (previous.get("status") == "failed" and not previous.get("global_step")
            and not any(path.glob("checkpoint-*")))


def check_output_dir(path: Path, overwrite: bool) -> str | None:
    """Refuse to touch another run's output (or any foreign folder) unless told to; never delete foreign files.

    Returns a note when a previous run that never trained will be replaced. Raises UserError naming the
    folder and what to do.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is not a directory")
    if not path.exists() or not any(path.iterdir()):
        return None
    previous = read_manifest(path)
    if previous is None:
        raise UserError(
            f"output.dir: {path} is not empty and holds no gemma2-tune run ({MANIFEST}); "
            "refusing to write into it; choose another --output-dir"
        )
    if never_trained(path, previous):
        return (f"replacing the previous run in {path}: it failed before its first optimizer step "
                f"({str(previous.get('error', '?')).splitlines()[0][:200]})")
    if not overwrite:
        kept = replaced_path(path)
        restore = (f"; the run an interrupted --overwrite replaced is kept in {kept} (restore: rm -rf {path} && mv "
                   f"{kept} {path})" if kept.exists() else "")
        status = previous.get("status", "?")
        resume = ("--resume to continue it, " if status in ("interrupted", "failed", "running")
                  and any(path.glob("checkpoint-*")) else "")
        raise UserError(
            f"output.dir: {path} already holds a run (status {status}, started "
            f"{previous.get('started_at', '?')}); pass {resume}--overwrite to replace it, or choose another "
            "--output-dir" + restore
        )
    return None


def check_inputs_outside(cfg) -> None:
    """The output folder must not be (or hold) an input of the run: the base model, the models the method loads
    beside it (a teacher, ...), the data. Raises UserError before anything is written or deleted."""
    inputs = {"model.name_or_path": cfg.model.name_or_path, "data.dataset": cfg.data.dataset}
    start = cfg.start  # a run it continues: that run's folder and the base under its adapter
    if start is not None:
        inputs |= {"the run it continues": start.folder, "its base": start.base}
    inputs |= {f"{m.key}.name_or_path": m.name_or_path for m in cfg.frozen_models()}
    inside = inputs_inside(Path(cfg.output.dir), inputs)
    if inside:
        raise UserError(f"output.dir: {cfg.output.dir} is, or holds, an input of this run ({', '.join(inside)}); "
                        "writing the run there would destroy it; choose another --output-dir")


def inputs_inside(path: Path, inputs: dict[str, str]) -> list[str]:
    """The run's local inputs ({key: path}: model, teacher, dataset) that are `path` itself or lie inside it:
    writing the run there (and --overwrite deleting it first) would destroy them."""
    out = path.expanduser().resolve()
    found = []
    for key, name in inputs.items():
        if not name or name.startswith("builtin:"):
            continue
        p = Path(name).expanduser()
        if p.exists() and (p.resolve() == out or out in p.resolve().parents):
            found.append(f"{key} ({name})")
    return found


def replaced_path(path: Path) -> Path:
    """Where `--overwrite` keeps the run it replaces until the new run completes: `.NAME.replaced` beside it."""
    return path.parent / f".{path.name}.replaced"


def prepare_output_dir(path: Path, overwrite: bool) -> str | None:
    """After `check_output_dir`: make `path` an empty folder for a new run. A previous completed (or resumable)
    run replaced by --overwrite is moved aside to `.NAME.replaced`, deleted only when the new run completes
    (`drop_replaced`), so a rerun killed early loses nothing; a run that never trained is deleted. Returns what
    to tell the user."""
    check_output_dir(path, overwrite)
    note = None
    if path.exists() and any(path.iterdir()):
        previous = read_manifest(path) or {}
        kept = replaced_path(path)
        if never_trained(path, previous) or (kept.exists() and previous.get("status") != "completed"):
            # nothing of this one is worth keeping; an earlier replaced run, if any, stays the one to restore
            shutil.rmtree(path)
        else:
            if kept.exists():
                shutil.rmtree(kept)
            path.rename(kept)
        if kept.exists():
            note = (f"the previous run is kept in {kept} until this run completes (if this run is stopped, restore it "
                    f"with: rm -rf {path} && mv {kept} {path})")
    path.mkdir(parents=True, exist_ok=True)
    return note


def drop_replaced(path: Path) -> str | None:
    """Delete the run --overwrite moved aside, once the new run in `path` is complete; returns a note."""
    kept = replaced_path(path)
    if not kept.exists():
        return None
    shutil.rmtree(kept, ignore_errors=True)
    return f"removed the run this one replaced ({kept})"

"""What a run records about itself (run.json), and the output directory's safety rules."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

MANIFEST = "run.json"
RESOLVED_CONFIG = "config.yaml"
LIBRARIES = ["gemma2-tune", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "deepspeed"]


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_dir(final: Path, is_stale: Callable[[Path], bool] = lambda p: not any(p.iterdir())) -> Iterator[Path]:
    """A temporary folder beside `final` that becomes `final` by one rename when the block succeeds (readers
    see all of it or nothing) and is removed when it fails. An existing `final` is replaced only when
    `is_stale(final)` (default: it is empty); when another process publishes `final` first, theirs is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists() and is_stale(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    write_text_atomic(out / MANIFEST, json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to touch another run's output (or any foreign folder) unless told to; never delete foreign files."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is not a directory")
    if not path.exists() or not any(path.iterdir()):
        return
    previous = read_manifest(path)
    if previous is None:
        raise UserError(
            f"output.dir: {path} is not empty and holds no gemma2-tune run ({MANIFEST}); "
            "refusing to write into it; choose another --output-dir"
        )
    if not overwrite:
        raise UserError(
            f"output.dir: {path} already holds a run (status {previous.get('status', '?')}, started "
            f"{previous.get('started_at', '?')}); pass --overwrite to replace it, or choose another --output-dir"
        )


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    check_output_dir(path, overwrite)
    if path.exists() and any(path.iterdir()):  # a previous run of ours, and --overwrite was given
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)

"""File helpers shared by every layer: the package's home folder, atomic writes, staged folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


COMPLETE = "complete.json"  # marker written last into a folder (a builtin model, a checkpoint) once it is whole


def home() -> Path:
    """Where builtin models and the tokenized-data cache live: $GEMMA2_TUNE_HOME or ~/.cache/gemma2_tune."""
    return Path(os.environ.get("GEMMA2_TUNE_HOME", Path.home() / ".cache" / "gemma2_tune")).expanduser()


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target then rename: a reader never sees half a file. Raises OSError."""
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
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
        if final.exists() and is_stale(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux: VmRSS, VmHWM, ...), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

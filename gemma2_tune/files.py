"""File helpers shared by every layer: the package's home folder, atomic writes, staged folders."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
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


# Staging folders name their writer (host and process id) so the next run can tell a dead writer's leftovers,
# which a SIGKILL or a power cut leaves behind (a full copy of a model's weights), from a live writer's.
LEGACY_STAGING_AGE_S = 3600  # unnamed staging folders of earlier versions: removed once untouched this long


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.staging-{socket.gethostname()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for root, _, names in os.walk(folder):
        times += [os.stat(os.path.join(root, n), follow_symlinks=False).st_mtime for n in names]
    return max(times)


def _folder_bytes(folder: Path) -> int:
    return sum(os.stat(os.path.join(root, n), follow_symlinks=False).st_size
               for root, _, names in os.walk(folder) for n in names)


def clean_stale_staging(final: Path) -> list[tuple[Path, int]]:
    """Remove the staging folders of `final` whose writer is gone: one named by a process of this host that no
    longer runs, or an unnamed one of an earlier version untouched for LEGACY_STAGING_AGE_S. Staging folders of
    live processes, or of other hosts (whose processes can't be checked), are kept. Returns (folder, bytes)
    of each removed one."""
    named = re.compile(rf"^\.{re.escape(final.name)}\.staging-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{{8}}$")
    legacy = re.compile(rf"^\.{re.escape(final.name)}\.[a-z0-9_]{{8}}$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for folder in final.parent.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        match = named.match(folder.name)
        try:
            if match:
                stale = match["host"] == socket.gethostname() and not _process_alive(int(match["pid"]))
            else:
                stale = bool(legacy.match(folder.name)) and time.time() - _newest_mtime(folder) > LEGACY_STAGING_AGE_S
            if stale:
                size = _folder_bytes(folder)
                shutil.rmtree(folder)
                removed.append((folder, size))
        except OSError:  # vanished meanwhile, or not ours to remove: left as it is
            continue
    return removed


@contextlib.contextmanager
def staged_dir(final: Path, is_stale: Callable[[Path], bool] = lambda p: not any(p.iterdir()),
               echo: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A temporary folder beside `final` that becomes `final` by one rename when the block succeeds (readers
    see all of it or nothing) and is removed when it fails. An existing `final` is replaced only when
    `is_stale(final)` (default: it is empty); when another process publishes `final` first, theirs is kept.
    Staging folders of `final` left by a killed earlier writer are removed first (`clean_stale_staging`),
    each said through `echo` when given."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for folder, size in clean_stale_staging(final):
        if echo is not None:
            echo(f"removed {folder}: the staging folder of an earlier, interrupted write of {final.name} "
                 f"({size / 2**30:.2f} GiB)")
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(final), dir=final.parent))
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

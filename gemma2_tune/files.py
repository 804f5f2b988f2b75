"""File helpers shared by every layer: the package's home folder, atomic writes, staged folders."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


COMPLETE = "complete.json"  # marker written last into a folder (a builtin model, a checkpoint) once it is whole
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint-N folder of a run, its step N, and whether every rank finished writing it (its COMPLETE
    marker is there; training/checkpoints.py writes it and checks what it lists)."""

    path: Path
    step: int
    complete: bool


def checkpoint_step(name: str) -> int | None:
    """N of a folder named checkpoint-N (as the trainer names them); None for any other name."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(out: Path) -> list[Checkpoint]:
    """Every checkpoint-N folder in the run folder `out`, oldest first (none when `out` is no folder)."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            step = checkpoint_step(p.name)
            if step is not None and p.is_dir():
                found.append(Checkpoint(p, step, (p / COMPLETE).is_file()))
    return sorted(found, key=lambda c: c.step)


def home() -> Path:
    """Where builtin models and the tokenized-data cache live: $GEMMA2_TUNE_HOME or ~/.cache/gemma2_tune."""
    return Path(os.environ.get("GEMMA2_TUNE_HOME", Path.home() / ".cache" / "gemma2_tune")).expanduser()


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, flush it to disk, then rename: a reader (or a machine after a power loss)
    never sees half a file. Raises OSError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename, a new file) to disk; a no-op where folders can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """fsync every file under `folder` and the folders themselves: what a completeness marker written after it
    claims is then on disk, not in the page cache (a power loss or full disk otherwise leaves a marked folder
    with truncated files)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            try:
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def writable_problem(path: Path) -> str | None:
    """Why the folder `path` could not be created or written (its nearest existing ancestor is a file, is
    read-only, or lacks permission), or None. Checked before a command writes anything."""
    path = path.expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return f"{probe} is on a read-only filesystem" if read_only else f"no permission to write in {probe}"
    return None


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


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the filesystem is read-only"}


@contextlib.contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """A full disk, an exceeded quota or a read-only filesystem while writing `folder` becomes one UserError
    (exit 2) naming the folder and the cause, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        raise UserError(f"output.dir {folder}: cannot write: {DISK_ERRORS[exc.errno]} ({exc.filename or folder}); "
                        "free space or choose another --output-dir") from None


class OutputLock:
    """One writer per output folder: `.NAME.lock` beside it holds the writer's pid, host and start time. A lock
    whose process is gone (same host) is stale and taken over; a live one refuses. Created atomically
    (O_EXCL), so two processes starting together cannot both take it."""

    def __init__(self, folder: Path):
        self.folder = folder.expanduser()
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises UserError when a live process
        holds it (naming its pid and host)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                host, pid = holder.get("host"), holder.get("pid")
                if host == socket.gethostname() and isinstance(pid, int) and not _process_alive(pid):
                    self.path.unlink(missing_ok=True)
                    note = f"taking over a stale lock on {self.folder} (process {pid} on {host} is gone)"
                    continue
                raise UserError(f"output.dir {self.folder}: another gemma2-tune process (pid {pid} on {host}, since "
                                f"{holder.get('since', '?')}) is writing it; wait for it, or choose another "
                                f"--output-dir (a lock left by a crashed machine: remove {self.path})") from None
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, fh)
            self.held = True
            return note
        raise UserError(f"output.dir {self.folder}: cannot take its lock {self.path}")

    def holder(self) -> dict:
        """What the lock file says (empty when unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and self.holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""One way to turn what a user points at into a model folder a library can load: a merged folder, a full
fine-tune, a merge-models output or a run's `ema/` folder are used as they are; a LoRA run (or its `ema/`
adapter) is merged into its base by `merge` (self-checked) in a temporary folder that lives as long as the
caller needs it. Used by `serve` and `export`; `merge-models` merges its adapter inputs through the same
`merge`, beside its output (the inputs of a merge can be larger than the temporary folder's filesystem).

A process killed while holding a temporary folder (SIGKILL, a lost machine) leaves a full copy of the weights
(~18 GB for a 9B model): each folder records its owner's pid, and the next call removes the folders of
owners that are gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError

TEMP_PREFIX = "gemma2-tune-serve-"  # the temporary merged folders (named for serve, their first user)
OWNER_FILE = "owner.pid"


@dataclass
class ModelFolder:
    """A loadable model folder and what it is: `name` the label clients see, `system_policy` the one its chat
    template was generated for, `source` what the user pointed at, `merge_report` `merge`'s report when an
    adapter was merged for it (None: used as it is)."""

    folder: Path
    name: str
    system_policy: str
    family: Any
    source: str
    merge_report: dict | None = None
    enable_thinking: bool = False  # Gemma 4: the run rendered its rows with thinking on (data.enable_thinking)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(root: Path, echo: Callable[[str], None], min_age_s: float = 60.0) -> list[Path]:
    """Remove temporary merged folders under `root` whose owner is gone (killed before it could remove them).
    A folder is stale when its owner.pid names no live process, or, without that file (an owner that died while
    creating it, or an older gemma2-tune), when it is older than `min_age_s` seconds. Returns those removed."""
    removed = []
    for folder in sorted(root.glob(TEMP_PREFIX + "*")):
        if not folder.is_dir():
            continue
        try:
            owner = int((folder / OWNER_FILE).read_text().strip())
            stale = not pid_alive(owner) and owner != os.getpid()
        except (OSError, ValueError):
            try:
                stale = time.time() - folder.stat().st_mtime > min_age_s
            except OSError:
                continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
                echo(f"removed {folder}: a temporary merged model left by a process that was killed")
    return removed


@contextmanager
def model_folder(target: str, *, command: str, name: str | None = None, dtype: str | None = None,
                 echo: Callable[[str], None] = print) -> Iterator[ModelFolder]:
    """The model folder for `target`, for the duration of the block. `command` names the caller in messages;
    `name` overrides the label (default: the folder's name, `RUN-ema` for an `ema/` folder); `dtype` is the
    merged weights' precision (default: the run's). Raises UserError when `target` is not a run, an `ema/`
    folder or a model folder, or when the merge's self-check fails."""
    from ..models.loading import checkpoint_family
    from .inference import read_run
    from .merge import merge

    path = Path(target).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise UserError(f"{command} {target}: {what} (give a run folder, its ema/ folder, or a merged folder)")
    run = read_run(str(path), None, key=command)
    run.require_generating(command)  # before a merge: a reward model can be neither served nor exported
    label = name or (path.parent.name + "-ema" if path.name == "ema" else path.name)
    if not run.is_adapter:
        family, _ = checkpoint_family(str(path))
        yield ModelFolder(path, label, run.system_policy, family, str(path), enable_thinking=run.enable_thinking)
        return
    remove_stale_folders(Path(tempfile.gettempdir()), echo)
    work = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    try:
        (work / OWNER_FILE).write_text(str(os.getpid()))
        echo(f"{path} holds a LoRA adapter: merging it into its base for {command} (a temporary folder, removed at "
             "exit)")
        report = merge(str(path), str(work / "merged"), dtype=dtype, echo=lambda line: echo(f"  {line}"))
        family, _ = checkpoint_family(str(work / "merged"))
        yield ModelFolder(work / "merged", label, run.system_policy, family, str(path), report,
                          enable_thinking=run.enable_thinking)
    finally:
        shutil.rmtree(work, ignore_errors=True)

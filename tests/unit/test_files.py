"""Staged folders: a writer killed mid-write leaves its staging folder (a full copy of a model's weights for a
merge); the next write of the same target removes it, says so, and leaves live writers' folders alone."""

import os
import subprocess
import sys
import time

from gemma2_tune.files import LEGACY_STAGING_AGE_S, staged_dir

KILLED_WRITER = """
import os, sys
from pathlib import Path
from gemma2_tune.files import staged_dir
with staged_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"w" * 4096)
    os.kill(os.getpid(), 9)  # as the OOM killer or `kill -9` would
"""


def staging_folders(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_the_next_write_removes_a_killed_writers_staging_folder_and_says_so(tmp_path):
    target = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env=env)
    assert killed.returncode == -9
    leftover = staging_folders(tmp_path)
    assert len(leftover) == 1 and (tmp_path / leftover[0] / "model.safetensors").is_file() and not target.exists()
    legacy = tmp_path / ".merged.k3x9_a0q"  # an earlier version's unnamed staging folder, untouched for hours
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"w" * 1024)
    old = time.time() - LEGACY_STAGING_AGE_S - 60
    for path in (legacy / "model.safetensors", legacy):
        os.utime(path, (old, old))
    recent = tmp_path / ".merged.recent00"  # unnamed but recently written: maybe a live writer; kept
    recent.mkdir()
    live = tmp_path / f".merged.staging-{os.uname().nodename}-{os.getpid()}-abcd1234"  # this process: alive; kept
    live.mkdir()
    other = tmp_path / ".other.staging-host-1-abcd1234"  # another target's: not ours to touch
    other.mkdir()
    said = []
    with staged_dir(target, echo=said.append) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    assert staging_folders(tmp_path) == sorted([recent.name, live.name, other.name])
    assert len(said) == 2 and all("the staging folder of an earlier, interrupted write of merged" in s for s in said)
    assert any(leftover[0] in s for s in said) and any(legacy.name in s for s in said)

"""Free space on local filesystems: how much there is, where, and whether a failed write ran out of it.

A checkpoint is written to a staging folder and then moved (file://) or uploaded (s3://) into the
store, so two filesystems may fill up: the staging folder's and a file:// store's. S3 has no limit
to check. Standard library only: storage.py imports this module.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What writers that do not raise OSError say instead: safetensors ("I/O error: No space left on device
# (os error 28)"), and torch.save, which says only "unexpected pos" (caught by the free-space test below).
_OUT_OF_SPACE_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), f"os error {errno.ENOSPC}")
NEARLY_FULL_BYTES = 16 * 1024 * 1024
"""Less free than this after a failed write means the write ran out of space: a writer fills the
filesystem to its last blocks before the kernel refuses it."""


def existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a folder not created yet is on that filesystem)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    return shutil.disk_usage(existing(path)).free


def mount_point(path: Path) -> Path:
    """Where the filesystem holding ``path`` is mounted: the name a user looks for in ``df``."""
    path = existing(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def same_filesystem(first: Path, second: Path) -> bool:
    return os.stat(existing(first)).st_dev == os.stat(existing(second)).st_dev


def ran_out_of_space(error: BaseException, path: Path) -> bool:
    """Whether ``error``, raised while writing below ``path``, means its filesystem is full: the
    error says so, or the filesystem is left nearly full."""
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE_ERRNOS:
        return True
    if any(words in str(error) for words in _OUT_OF_SPACE_WORDS):
        return True
    try:
        return free_bytes(path) < NEARLY_FULL_BYTES
    except OSError:
        return False


def describe(path: Path) -> str:
    """``the filesystem at /data (1.2 GB free)``: which filesystem holds ``path`` and what it has left."""
    return f"the filesystem at {mount_point(path)} ({human(free_bytes(path))} free)"


def human(size: int) -> str:
    """Bytes in decimal units, as df -H and the benchmarks give them: 2.7 GB, 540 MB, 0 B."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"

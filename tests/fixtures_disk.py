"""Small real filesystems for full-disk tests: a tmpfs of a few MB, mounted for one test.

Mounting needs root (or CAP_SYS_ADMIN); where it is not permitted the test skips saying so. Tests
that only need the trainer to *believe* a disk is full fake it at the storage layer instead.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """``mount(name, megabytes)``: a fresh tmpfs of that size at ``tmp_path / name``, unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, megabytes: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {megabytes} MB tmpfs for a full-disk test (needs root): "
                        f"{(result.stderr or result.stdout).strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(folder)], check=False)

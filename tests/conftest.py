"""Shared fixtures. Tests that need ../shared/data skip with the reason when a clone lacks it."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

# Fixture modules shared by several test files (small filesystems, a tiny random model with a real tokenizer, an S3 server,
# a Kubernetes API server).
pytest_plugins = ["fixtures_disk", "fixtures_models", "fixtures_s3", "kube_emulator"]

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GRPO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark and GSM8K JSONL files that CI has beside the repository (never copied into it)."""
    if not (SHARED_DATA / "aime24").is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (set GRPO_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def cached_schemas():
    """kubernetes-validate reads a 2 MB schema file again on every call; read each one once."""
    import kubernetes_validate

    with pytest.MonkeyPatch.context() as patch:
        utils = kubernetes_validate.utils
        patch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
        yield

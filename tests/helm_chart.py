"""The Helm chart as helm renders it, and the binaries the chart and image checks run.

The binaries come from scripts/install-tools.sh (.tools/bin) or the PATH; a test that needs one
that is absent skips, naming it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "grpo-operator"
TOOLS = REPO / ".tools" / "bin"
RELEASE = "grpo-operator"
"""As the README installs it; the release's objects are named after it."""
NAMESPACE = "grpo-system"


def tool(name: str) -> str:
    """The path of a binary, or a skip that says how to get it."""
    path = TOOLS / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not in .tools/bin nor on the PATH: run scripts/install-tools.sh")
    return found


def helm(*args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm with ``values`` as a values file; the result, failed or not."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values or {}, file)
        file.flush()
        return subprocess.run([tool("helm"), *args, "--values", file.name], capture_output=True, text=True, timeout=60)


def render(values: dict[str, Any] | None = None, *, crds: bool = False) -> list[dict[str, Any]]:
    """The objects ``helm install`` would create with ``values`` (the CRD too with ``crds``)."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *(["--include-crds"] if crds else []),
                  values=values)
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def chart_metadata() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``) among ``objects``."""
    (found,) = [obj for obj in objects if obj["kind"] == kind and name in (None, obj["metadata"]["name"])]
    return found

"""The container images: every Dockerfile is clean under hadolint, the build script tags the images
the chart and the spec name, and what each image holds agrees with the package and the pods."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from helm_chart import REPO, default_values, tool

from grpo_operator.manifests import USER_ID
from grpo_trainer.spec import DEFAULT_IMAGES, IMAGES_VERSION

DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile):
    result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_script_tags_the_images_the_chart_and_the_spec_name(tmp_path):
    docker = tmp_path / "docker"  # a stand-in client that records what it is asked
    docker.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    docker.chmod(0o755)
    subprocess.run(["bash", REPO / "scripts" / "build-images.sh", "--push"], env={"DOCKER": str(docker), "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    built = {call.split("--tag ")[1].split()[0] for call in calls if call.startswith("build ")}
    registry = default_values()["images"]["registry"]
    assert built == {f"{registry}/operator:{IMAGES_VERSION}", *DEFAULT_IMAGES.values()}
    assert {call.removeprefix("push ") for call in calls if call.startswith("push ")} == built
    assert all(call.endswith(" .") for call in calls if call.startswith("build ")), "built from the repository root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_run_as_the_pods_user_from_bases_pinned_to_an_exact_version(dockerfile):
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    external = [image for image in stages if ":" in image]
    assert external and all(re.search(r"(@sha256:[0-9a-f]{64}|:\d+\.\d+\.\d+[-\w.]*)$", image) for image in external), external
    assert re.findall(r"^USER (\S+)", text, re.MULTILINE) == [f"{USER_ID}:{USER_ID}"]
    assert f"--uid {USER_ID} " in text


def test_the_gpu_images_hold_the_vllm_the_package_pins():
    (pin,) = PROJECT["optional-dependencies"]["vllm"]
    assert re.fullmatch(r"vllm==[\d.]+", pin)
    assert f" {pin} " in (REPO / "images" / "gpu.Dockerfile").read_text()


def test_the_vllm_image_never_installs_the_trainers_extra_whose_transformers_vllm_refuses():
    """vLLM 0.34.0 pins transformers<5.23 and the trainer needs >=5.25: two environments, and the
    vllm one takes only [eval], which leaves torch and transformers to vLLM."""
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", (REPO / "images" / "gpu.Dockerfile").read_text(),
                             re.MULTILINE | re.DOTALL))
    assert '"/src[eval]"' in stages["build-vllm"] and "[trainer]" not in stages["build-vllm"]
    assert '"/src[trainer]"' in stages["build-trainer"] and "vllm" not in stages["build-trainer"]
    assert "--from=build-vllm" in stages["vllm"] and "--from=build-trainer" in stages["trainer"]
    assert not [r for r in PROJECT["optional-dependencies"]["eval"] if re.match(r"(torch|transformers)\b", r)]
    assert "grpo-operator[eval]" in PROJECT["optional-dependencies"]["trainer"]


def test_the_operator_image_has_no_torch():
    assert not [requirement for requirement in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["operator"]
                if re.match(r"(torch|transformers|deepspeed|vllm)\b", requirement)]
    assert '"/src[operator]"' in (REPO / "images" / "operator.Dockerfile").read_text()
    code = (
        "import sys, grpo_trainer.cli, grpo_operator.handlers; "
        "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert loaded.strip() == "[]", "grpo operator imports none of the trainer's heavy packages"


def test_the_build_context_holds_what_the_dockerfiles_copy():
    allowed = {line.removeprefix("!").rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            assert set(sources.split()) <= allowed, (dockerfile.name, sources)


@pytest.mark.parametrize("script", sorted((REPO / "scripts").glob("*.sh")), ids=lambda path: path.name)
def test_the_scripts_parse(script):
    """Some never run in CI (kind-e2e.sh needs Docker): bash at least reads each."""
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)

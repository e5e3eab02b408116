"""The trainer reports its progress and checkpoints into its GRPORun's status, and a failure to do so
never stops training."""

from __future__ import annotations

import asyncio
import http
import logging
import shutil
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
import pytest
import torch
import yaml
from kube_emulator import GRPORUNS, ApiCall, KubeEmulator, api_call

from grpo_trainer.metrics import StepTimer, step_record
from grpo_trainer.spec import GRPORunStatus
from grpo_trainer.status_report import FIELD_MANAGER, StatusReporter

REPO = Path(__file__).resolve().parent.parent
RUN = yaml.safe_load((REPO / "examples" / "cpu-smollm2.yaml").read_text())
NAME = RUN["metadata"]["name"]
TOTAL_STEPS = 10
STATUS_PATCH = ApiCall("patch", "grporuns/status")
OPERATOR_STATUS = {
    "phase": "Running",
    "attempt": 2,
    "restarts": 1,
    "startTime": "2025-03-01T12:00:00Z",
    "conditions": [
        {"type": "Created", "status": "True", "reason": "PodCreated", "message": "",
         "lastTransitionTime": "2025-03-01T12:00:00Z"},
    ],
}


class Clock:
    """Monotonic seconds that pass only when the test says so."""

    def __init__(self):
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


def record(step: int, *, seconds: float = 1.0, kl: float = 0.02) -> dict:
    """The record metrics.step_record makes of a step of 2 prompts × 2 completions that took ``seconds``."""
    timer = StepTimer()
    timer.start -= seconds  # as if the step had begun `seconds` ago
    return step_record(
        step,
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        per_function={"accuracy": torch.tensor([1.0, 0.0, 1.0, 1.0])},
        reward_failures={},
        completion_lengths=torch.tensor([10, 20, 30, 40]),
        truncated=torch.tensor([False, False, False, True]),
        num_generations=2,
        loss_metrics={"kl": kl},
        learning_rate=1e-5,
        timer=timer,
    )


def started_run(kube: KubeEmulator) -> None:
    """The run as the operator leaves it once its pod runs."""
    kube.create_object(GRPORUNS, RUN, "default")
    kube.patch_object(GRPORUNS, "default", NAME, {"status": OPERATOR_STATUS}, "status")


def reporter_at(url: str, **options) -> StatusReporter:
    return StatusReporter(url, lambda: "fake-token", "default", NAME, total_steps=TOTAL_STEPS, **options)


def status(kube: KubeEmulator) -> dict:
    return kube.read_object(GRPORUNS, "default", NAME)["status"]


def status_patches(kube: KubeEmulator) -> list:
    return [request for request in kube if api_call(request) == STATUS_PATCH]


def reported_steps(kube: KubeEmulator) -> list[int]:
    return [request.data["status"]["progress"]["step"] for request in status_patches(kube)]


def assert_recent(timestamp: str) -> None:
    assert abs(datetime.fromisoformat(timestamp) - datetime.now(UTC)) < timedelta(seconds=10)


# ------------------------------------------------------------------------------ what reaches the status


@pytest.mark.asyncio
async def test_a_step_reaches_the_status_and_leaves_the_operators_fields_alone(kube):
    started_run(kube)
    step = record(3, seconds=2.0)

    await asyncio.to_thread(reporter_at(str(kube.url)).report_step, step)

    progress = status(kube)["progress"]
    assert_recent(progress.pop("lastUpdateTime"))
    assert progress == {
        "step": 3,
        "totalSteps": TOTAL_STEPS,
        "reward": step["reward"],
        "accuracy": step["accuracy"],
        "completionLength": step["completions/mean_length"],
        "kl": step["kl"],
        "tokensPerSecond": step["tokens_per_second"],
        "etaSeconds": round(step["time/step"] * (TOTAL_STEPS - 3)),
    }
    assert {key: status(kube)[key] for key in OPERATOR_STATUS} == OPERATOR_STATUS
    GRPORunStatus.model_validate(status(kube))  # the status still fits the schema
    [patch] = status_patches(kube)
    assert patch.params["fieldManager"] == FIELD_MANAGER
    assert patch.headers["Authorization"] == "Bearer fake-token"
    assert list(patch.data["status"]) == ["progress"]  # nothing but the trainer's own field


@pytest.mark.asyncio
async def test_a_checkpoint_reaches_the_status_with_the_progress_not_sent_yet(kube):
    started_run(kube)
    clock = Clock()
    trainer = reporter_at(str(kube.url), clock=clock)
    uri = f"s3://bucket/runs/{NAME}/checkpoints/step-2"

    await asyncio.to_thread(trainer.report_step, record(1))
    await asyncio.to_thread(trainer.report_step, record(2))  # within min_interval: held back
    assert status(kube)["progress"]["step"] == 1
    await asyncio.to_thread(trainer.report_checkpoint, 2, uri)

    checkpoint = status(kube)["latestCheckpoint"]
    assert_recent(checkpoint.pop("time"))
    assert checkpoint == {"step": 2, "uri": uri}
    assert status(kube)["progress"]["step"] == 2
    assert "checkpoints" not in status(kube)
    assert {key: status(kube)[key] for key in OPERATOR_STATUS} == OPERATOR_STATUS

    clock.seconds += 10.0
    await asyncio.to_thread(trainer.report_step, record(3))
    assert list(status_patches(kube)[-1].data["status"]) == ["progress"]  # the checkpoint went once


@pytest.mark.asyncio
async def test_progress_is_patched_at_most_once_per_interval_and_always_at_the_last_step(kube):
    started_run(kube)
    clock = Clock()
    trainer = reporter_at(str(kube.url), clock=clock, min_interval=10.0)

    for step in range(1, TOTAL_STEPS + 1):  # a step every 3 s
        await asyncio.to_thread(trainer.report_step, record(step))
        clock.seconds += 3.0

    # Sent at t = 0, 12 and 24 s (steps 1, 5, 9), then the last step, 3 s after the one before.
    assert reported_steps(kube) == [1, 5, 9, TOTAL_STEPS]
    assert status(kube)["progress"]["step"] == TOTAL_STEPS
    assert status(kube)["progress"]["etaSeconds"] == 0


@pytest.mark.asyncio
async def test_the_eta_is_the_mean_step_time_times_the_steps_left(kube):
    started_run(kube)
    trainer = reporter_at(str(kube.url), min_interval=0.0)

    await asyncio.to_thread(trainer.report_step, record(1, seconds=2.0))
    assert status(kube)["progress"]["etaSeconds"] == pytest.approx(2.0 * 9, abs=1)
    await asyncio.to_thread(trainer.report_step, record(2, seconds=6.0))
    assert status(kube)["progress"]["etaSeconds"] == pytest.approx(4.0 * 8, abs=1)


@pytest.mark.asyncio
async def test_a_nan_metric_is_removed_not_sent(kube):
    started_run(kube)
    trainer = reporter_at(str(kube.url), min_interval=0.0)

    await asyncio.to_thread(trainer.report_step, record(1))
    assert "kl" in status(kube)["progress"]
    await asyncio.to_thread(trainer.report_step, record(2, kl=float("nan")))

    assert status(kube)["progress"]["step"] == 2
    assert "kl" not in status(kube)["progress"]  # JSON has no NaN; null removes the stale value


# ------------------------------------------------------------------------------ failures never stop training


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [403, 404, 409, 500])
async def test_a_refused_patch_is_a_warning_and_is_sent_again_with_the_next(kube, caplog, code):
    started_run(kube)
    clock = Clock()
    trainer = reporter_at(str(kube.url), clock=clock)
    uri = f"file://runs/{NAME}/checkpoints/step-1"
    kube.fail(2, code, verb="patch", resource="grporuns/status")

    with caplog.at_level(logging.WARNING, logger="grpo_trainer.status_report"):
        await asyncio.to_thread(trainer.report_step, record(1))
        await asyncio.to_thread(trainer.report_checkpoint, 1, uri)
    assert "progress" not in status(kube)
    reason = f"HTTP {code} {http.HTTPStatus(code).phrase}: injected by the test: HTTP {code}"
    assert [entry.getMessage() for entry in caplog.records] == [
        f"could not report the {what} to GRPORun default/{NAME}: {reason}"
        for what in ("progress of step 1", "checkpoint of step 1")
    ]

    clock.seconds += 10.0
    await asyncio.to_thread(trainer.report_step, record(2))  # the API server is back

    assert status(kube)["progress"]["step"] == 2
    assert status(kube)["latestCheckpoint"]["uri"] == uri  # the failed checkpoint report went with it


def test_an_unreachable_api_server_is_a_warning(caplog):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    trainer = reporter_at(f"http://127.0.0.1:{port}")  # the port is closed again

    with caplog.at_level(logging.WARNING, logger="grpo_trainer.status_report"):
        trainer.report_step(record(1))

    assert "Connection refused" in caplog.text


def test_a_hung_api_server_delays_a_step_by_the_timeout_only(caplog):
    # A server that takes the connection and never answers.
    with socket.create_server(("127.0.0.1", 0)) as server:
        trainer = reporter_at(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.2)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="grpo_trainer.status_report"):
            trainer.report_step(record(1))
        elapsed = time.monotonic() - began

    assert 0.2 <= elapsed < 2.0
    assert "timed out" in caplog.text


@pytest.mark.asyncio
async def test_a_record_that_is_not_valid_progress_is_a_warning_and_sends_nothing(kube, caplog):
    started_run(kube)
    trainer = reporter_at(str(kube.url))

    with caplog.at_level(logging.WARNING, logger="grpo_trainer.status_report"):
        await asyncio.to_thread(trainer.report_step, {**record(1), "step": -1})

    assert "not reporting step -1" in caplog.text and "greater than or equal to 0" in caplog.text
    assert status_patches(kube) == []


# ------------------------------------------------------------------------------ inside a pod or not


def service_account(directory: Path, token: str = "token-1") -> Path:
    directory.mkdir()
    (directory / "token").write_text(token + "\n")
    shutil.copy(certifi.where(), directory / "ca.crt")  # any valid CA bundle
    return directory


POD_ENVIRONMENT = {
    "GRPO_RUN_NAME": NAME,
    "GRPO_NAMESPACE": "team-a",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
}


def test_outside_a_pod_nothing_is_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="grpo_trainer.status_report"):
        on_a_laptop = StatusReporter.from_environment(TOTAL_STEPS, environ={}, service_account_dir=tmp_path)
    assert on_a_laptop is None
    assert caplog.records == []  # a laptop run is not told about Kubernetes


def test_a_pod_without_a_service_account_token_warns_and_reports_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="grpo_trainer.status_report"):
        in_pod = StatusReporter.from_environment(TOTAL_STEPS, environ=POD_ENVIRONMENT, service_account_dir=tmp_path)
    assert in_pod is None
    assert f"lacks {tmp_path / 'token'}, {tmp_path / 'ca.crt'}" in caplog.text


@pytest.mark.parametrize(
    ("host", "server"), [("10.96.0.1", "https://10.96.0.1:443"), ("fd00::1", "https://[fd00::1]:443")]
)
def test_in_a_pod_the_reporter_patches_its_own_run_with_the_current_token(tmp_path, host, server):
    account = service_account(tmp_path / "serviceaccount")
    environ = {**POD_ENVIRONMENT, "KUBERNETES_SERVICE_HOST": host}

    reporter = StatusReporter.from_environment(TOTAL_STEPS, environ=environ, service_account_dir=account)

    path = f"/apis/grpo.dev/v1alpha1/namespaces/team-a/grporuns/{NAME}/status"
    assert reporter.url == f"{server}{path}?fieldManager=grpo-trainer"
    assert reporter.total_steps == TOTAL_STEPS
    assert reporter.token() == "token-1"
    (account / "token").write_text("token-2")  # the kubelet rotated it
    assert reporter.token() == "token-2"

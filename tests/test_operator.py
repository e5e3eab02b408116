"""The operator end to end: kopf runs grpo_operator.handlers in-process against the API emulator
(tests/kube_emulator.py), and each test plays the user (kubectl), the kubelet and the trainer.

The emulator runs no pods: a test reports a pod's status as its kubelet would. Pods go at once when
deleted, so a suspended or timed-out pod is simply gone, as after its trainer checkpointed on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import prometheus_client
import pytest
import yaml
from kube_emulator import (
    CONFIGMAPS,
    EVENTS,
    GRPORUNS,
    JOB_NAME_LABEL,
    JOBS,
    PODS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    ApiCall,
    Fault,
    KubeEmulator,
    api_call,
    eventually,
    job_finished,
    running_operator,
    terminated,
    waiting,
)

import grpo_operator.handlers  # noqa: F401  (registers the handlers with kopf's default registry)
from grpo_operator import manifests, state
from grpo_operator.cluster import FIELD_MANAGER, USER_AGENT, Cluster
from grpo_operator.manifests import RUN_LABEL, job_name, pod_name
from grpo_trainer.cli import parser as grpo_parser
from grpo_trainer.spec import BenchmarkScore, CheckpointRef, GRPORunStatus
from grpo_trainer.termination import EXIT_INVALID, Outcome, TerminationMessage

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = yaml.safe_load((REPO / "examples" / "cpu-smollm2.yaml").read_text())
NS = "default"
OWNED = {CONFIGMAPS: "config_map", SERVICEACCOUNTS: "service_account", ROLES: "role", ROLEBINDINGS: "role_binding"}
SERVER_METADATA = ("uid", "creationTimestamp", "resourceVersion", "generation")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "BACKOFF_BASE_SECONDS", 0.05)  # 10 s in a cluster


def manifest(name: str = "run", **spec: Any) -> dict[str, Any]:
    """The CPU example, without evaluation (so a completed run succeeds), with ``spec`` fields set."""
    body = {**EXAMPLE, "metadata": {"name": name}}
    body["spec"] = {**EXAMPLE["spec"], "evaluation": {"checkpoints": "none"}, **spec}
    return body


@contextlib.asynccontextmanager
async def operator(kube: KubeEmulator) -> AsyncIterator[None]:
    """The operator, running until the block exits, from when it watches pods: kopf stopped while
    its start-up calls are in flight waits 5 s for them to time out."""
    configuration = kubernetes.client.Configuration(host=str(kube.url).rstrip("/"))
    memo = kopf.Memo(cluster=Cluster(kubernetes.client.ApiClient(configuration)), namespaces=[NS])
    before = len(list(kube))
    async with running_operator(str(kube.url), kopf.get_default_registry(), namespaces=[NS], memo=memo):
        await eventually(lambda: any(r.resource == PODS and "watch" in r.params for r in list(kube)[before:]))
        yield


# ------------------------------------------------------------------------------ what a test reads


def run_of(kube: KubeEmulator, name: str = "run") -> dict[str, Any] | None:
    return kube.read_object(GRPORUNS, NS, name)


def status_of(kube: KubeEmulator, name: str = "run") -> dict[str, Any]:
    return (run_of(kube, name) or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def pod_of(kube: KubeEmulator, attempt: int) -> dict[str, Any] | None:
    return kube.read_object(PODS, NS, pod_name("run", attempt))


def pods_ever(kube: KubeEmulator, name: str = "run") -> dict[str, list[Any]]:
    """Every pod the run ever had, by name, with all its versions (None: deleted)."""
    return {
        pod: list(obj.history)
        for (resource, _, pod), obj in kube.objects.items()
        if resource == PODS and obj.history[0]["metadata"]["labels"].get(RUN_LABEL) == name
    }


def events_of(kube: KubeEmulator) -> list[tuple[str, str]]:
    events = [obj.raw for (resource, _, _), obj in kube.objects.items() if resource == EVENTS and not obj.deleted]
    return [(event["type"], event["reason"]) for event in events]


def phase_is(kube: KubeEmulator, phase: str) -> Callable[[], bool]:
    def check() -> bool:
        return status_of(kube).get("phase") == phase

    check.__name__ = f"the run is {phase}"
    return check


def without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: value for key, value in obj["metadata"].items() if key not in SERVER_METADATA}
    return {key: value for key, value in obj.items() if key != "status"} | {"metadata": metadata}


# ------------------------------------------------------------------------------ what the kubelet says

COMPLETED = TerminationMessage(Outcome.COMPLETED, step=60).to_json()
PREEMPTED = TerminationMessage(Outcome.PREEMPTED, step=30, checkpoint_uri="file:///runs/run/step-30").to_json()


def report(kube: KubeEmulator, attempt: int, phase: str, trainer: dict[str, Any] | None = None, **status: Any) -> None:
    kube.set_pod_status(NS, pod_name("run", attempt), phase, containers={"trainer": trainer} if trainer else None, **status)


def end(kube: KubeEmulator, attempt: int, how: str) -> None:
    """The trainer of the attempt ends: a failure the operator retries, a preemption, or the end of training."""
    match how:
        case "crash":
            report(kube, attempt, "Failed", terminated(1, message="Traceback ...\nRuntimeError: CUDA error"))
        case "oom":
            report(kube, attempt, "Failed", terminated(137, "OOMKilled"))
        case "evicted":
            report(kube, attempt, "Failed", reason="Evicted", message="The node was low on resource: memory.")
        case "deleted":  # the node went away and the pod with it
            kube.delete_object(PODS, NS, pod_name("run", attempt))
        case "preempted":
            report(kube, attempt, "Succeeded", terminated(0, message=PREEMPTED))
        case "completed":
            report(kube, attempt, "Succeeded", terminated(0, message=COMPLETED))
        case _:
            raise ValueError(how)


RETRIED = {"crash": "Error", "oom": "OOMKilled", "evicted": "Evicted", "deleted": "PodDeleted"}
"""How each failure the operator retries is reported: the reason of the Running condition and the event."""


def report_progress(kube: KubeEmulator, step: int) -> None:
    """What the trainer writes into its run's status."""
    kube.patch_object(GRPORUNS, NS, "run", {"status": {"progress": {"step": step, "totalSteps": 60, "reward": 0.5}}}, "status")


# ------------------------------------------------------------------------------ scenarios


@pytest.mark.asyncio
async def test_a_new_run_gets_exactly_its_pod_and_the_objects_it_needs(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1) and condition(status_of(kube), "Created").get("status") == "True")
        await eventually(lambda: events_of(kube))

    stored = run_of(kube)
    run = state.validate_body(stored)
    assert without_server_fields(pod_of(kube, 1)) == manifests.pod(run, attempt=1)
    for resource, builder in OWNED.items():
        built = getattr(manifests, builder)(run)
        assert without_server_fields(kube.read_object(resource, NS, built["metadata"]["name"])) == built
    assert list(pods_ever(kube)) == [pod_name("run", 1)]

    status = stored["status"]
    GRPORunStatus.model_validate(status)  # the CRD's fields and nothing else: the model forbids any other
    assert (status["phase"], status["attempt"], status["restarts"], status["observedGeneration"]) == ("Pending", 1, 0, 1)
    assert events_of(kube) == [("Normal", "AttemptCreated")]
    # kopf keeps nothing of its own but its finalizer, under our prefix.
    assert stored["metadata"]["finalizers"] == ["grpo.dev/finalizer"]
    assert not stored["metadata"].get("annotations")
    # The operator's own writes (kopf's are its finalizer and the events) name its field manager.
    writes = [r for r in kube if r.headers.get("User-Agent") == USER_AGENT and r.method.name != "GET"]
    assert {r.resource.plural for r in writes} == {"configmaps", "serviceaccounts", "roles", "rolebindings", "pods", "grporuns"}
    assert all(r.params.get("fieldManager") == FIELD_MANAGER for r in writes)


@pytest.mark.parametrize(("evaluation", "final"), [({"checkpoints": "none"}, "Succeeded"), ({}, "Evaluating")])
@pytest.mark.asyncio
async def test_pod_phases_become_run_phases_conditions_and_events(kube: KubeEmulator, evaluation, final):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(evaluation=evaluation), NS)
        await eventually(lambda: pod_of(kube, 1))

        report(kube, 1, "Pending", waiting("ImagePullBackOff", "Back-off pulling image"))
        await eventually(lambda: condition(status_of(kube), "Running").get("reason") == "ImagePullBackOff")
        assert status_of(kube)["phase"] == "Pending"

        report(kube, 1, "Running")
        await eventually(phase_is(kube, "Running"))
        assert condition(status_of(kube), "Running")["status"] == "True"
        report_progress(kube, step=30)

        end(kube, 1, "completed")
        await eventually(phase_is(kube, final))
        await eventually(lambda: len(events_of(kube)) == 3)

    status = status_of(kube)
    assert status["progress"]["step"] == 30, "the operator leaves the trainer's progress alone"
    assert condition(status, "Running")["reason"] == "TrainingCompleted"
    assert (condition(status, "Succeeded").get("status") == "True") == (final == "Succeeded")
    assert ("completionTime" in status) == (final == "Succeeded")
    assert events_of(kube) == [("Normal", "AttemptCreated"), ("Normal", "Started"), ("Normal", "TrainingCompleted")]
    assert list(pods_ever(kube)) == [pod_name("run", 1)]


@pytest.mark.parametrize("failure", sorted(RETRIED))
@pytest.mark.asyncio
async def test_a_failed_pod_is_recreated_after_a_backoff(kube: KubeEmulator, monkeypatch, failure):
    monkeypatch.setattr(state, "BACKOFF_BASE_SECONDS", 0.3)
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Running")
        await eventually(phase_is(kube, "Running"))

        failed_at = asyncio.get_running_loop().time()
        end(kube, 1, failure)
        await eventually(lambda: status_of(kube).get("restarts") == 1)
        status = status_of(kube)
        assert (status["phase"], status["attempt"]) == ("Pending", 2)
        assert (condition(status, "Created")["reason"], condition(status, "Running")["reason"]) == ("Backoff", RETRIED[failure])
        assert pod_of(kube, 2) is None, "not before the backoff"

        await eventually(lambda: pod_of(kube, 2))
        assert asyncio.get_running_loop().time() - failed_at >= 0.3
        await eventually(lambda: condition(status_of(kube), "Created")["reason"] == "PodCreated")
        await eventually(lambda: ("Warning", RETRIED[failure]) in events_of(kube))

    assert list(pods_ever(kube)) == [pod_name("run", 1), pod_name("run", 2)]
    assert (pod_of(kube, 1) is None) == (failure == "deleted"), "a failed pod is kept for its logs"


@pytest.mark.asyncio
async def test_a_run_fails_once_its_restarts_are_used_up(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(maxRestarts=1), NS)
        for attempt, failure in enumerate(["crash", "oom"], start=1):
            await eventually(lambda attempt=attempt: pod_of(kube, attempt))
            end(kube, attempt, failure)
        await eventually(phase_is(kube, "Failed"))
        await asyncio.sleep(0.3)  # longer than the backoff: no attempt 3 starts

    status = status_of(kube)
    assert (status["restarts"], status["attempt"]) == (2, 2)
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "spec.maxRestarts (1)" in status["message"]
    assert list(pods_ever(kube)) == [pod_name("run", 1), pod_name("run", 2)]


@pytest.mark.asyncio
async def test_a_permanent_failure_fails_the_run_at_once_with_its_reason(kube: KubeEmulator):
    said = TerminationMessage(Outcome.INVALID, reason="DatasetError", message="spec.dataset.source: no such file")
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Failed", terminated(EXIT_INVALID, message=said.to_json()))
        await eventually(phase_is(kube, "Failed"))
        await asyncio.sleep(0.2)

    status = status_of(kube)
    failed = condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "DatasetError")
    assert "spec.dataset.source: no such file" in failed["message"]
    assert (status["restarts"], list(pods_ever(kube))) == (0, [pod_name("run", 1)])


@pytest.mark.asyncio
async def test_an_invalid_spec_fails_the_run_naming_the_field_and_starts_nothing(kube: KubeEmulator):
    # The emulator checks no schema, so this stands for what only the operator's checks catch.
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(grpo={**EXAMPLE["spec"]["grpo"], "numGenerations": "four"}), NS)
        await eventually(phase_is(kube, "Failed"))
        await eventually(lambda: events_of(kube))

    failed = condition(status_of(kube), "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.grpo.numGenerations" in failed["message"]
    assert events_of(kube) == [("Warning", "InvalidSpec")]
    assert not pods_ever(kube) and kube.read_object(CONFIGMAPS, NS, "run-config") is None


@pytest.mark.asyncio
async def test_suspend_stops_the_pod_and_resume_starts_the_next_attempt(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Running")
        await eventually(phase_is(kube, "Running"))

        kube.patch_object(GRPORUNS, NS, "run", {"spec": {"suspend": True}})
        await eventually(phase_is(kube, "Suspended"))
        assert pod_of(kube, 1) is None
        status = status_of(kube)
        assert condition(status, "Suspended")["status"] == "True" and status["observedGeneration"] == 2

        kube.patch_object(GRPORUNS, NS, "run", {"spec": {"suspend": False}})
        await eventually(lambda: pod_of(kube, 2))
        await eventually(phase_is(kube, "Pending"))
        await eventually(lambda: ("Normal", "Resumed") in events_of(kube))

    status = status_of(kube)
    assert (status["attempt"], status["restarts"]) == (2, 0), "a suspension is no failure"
    assert condition(status, "Suspended")["status"] == "False"
    assert ("Normal", "Suspended") in events_of(kube)


@pytest.mark.asyncio
async def test_the_deadline_fails_the_run_and_stops_its_pod(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(activeDeadlineSeconds=1), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Running")
        await eventually(phase_is(kube, "Failed"), timeout=5)

    assert condition(status_of(kube), "Failed")["reason"] == "DeadlineExceeded"
    assert pod_of(kube, 1) is None


@pytest.mark.asyncio
async def test_deleting_a_run_deletes_everything_it_owns(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        kube.delete_object(GRPORUNS, NS, "run")
        await eventually(lambda: run_of(kube) is None)

    assert pod_of(kube, 1) is None
    assert all(kube.read_object(resource, NS, getattr(manifests.resource_names("run"), builder)) is None
               for resource, builder in OWNED.items())


@pytest.mark.asyncio
async def test_a_finished_run_is_deleted_after_its_ttl(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(ttlSecondsAfterFinished=1), NS)
        await eventually(lambda: pod_of(kube, 1))
        end(kube, 1, "completed")
        await eventually(phase_is(kube, "Succeeded"))
        succeeded_at = asyncio.get_running_loop().time()
        await eventually(lambda: run_of(kube) is None, timeout=5)

    assert asyncio.get_running_loop().time() - succeeded_at > 0.5
    assert not [name for name, versions in pods_ever(kube).items() if versions[-1] is not None]


@pytest.mark.asyncio
async def test_api_errors_are_retried(kube: KubeEmulator):
    kube.fail(2, 500, verb="create", resource="pods")
    kube.fail(1, 503, verb="patch", resource="grporuns/status")
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: condition(status_of(kube), "Created").get("status") == "True")

    assert list(pods_ever(kube)) == [pod_name("run", 1)]


@pytest.mark.asyncio
async def test_a_restarted_operator_adopts_the_pod_whose_status_it_never_wrote(kube: KubeEmulator):
    kill = kube.fail(10**9, 503, verb="patch", resource="grporuns/status")
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        await eventually(lambda: kill.times < 10**9)  # the status patch after it failed
    assert not status_of(kube)
    kill.times = 0

    async with operator(kube):
        await eventually(lambda: condition(status_of(kube), "Created").get("status") == "True")
    assert status_of(kube)["attempt"] == 1 and list(pods_ever(kube)) == [pod_name("run", 1)]


def operator_calls(kube: KubeEmulator, since: int, call: ApiCall) -> int:
    """How many of the requests from the ``since``-th on were this call, made by the operator's reconcile."""
    return sum(1 for r in list(kube)[since:] if r.headers.get("User-Agent") == USER_AGENT and api_call(r) == call)


@contextlib.asynccontextmanager
async def operator_listing_late(kube: KubeEmulator, resource: str = "pods") -> AsyncIterator[Fault]:
    """The operator, with kopf's listing of the ``resource`` held back until the test sets the fault
    yielded to 0 times: answered 429 Too Many Requests, which kopf retries for as long as it takes."""
    held = kube.fail(10**9, 429, verb="list", resource=resource, when=lambda r: r.headers.get("User-Agent") != USER_AGENT)
    configuration = kubernetes.client.Configuration(host=str(kube.url).rstrip("/"))
    memo = kopf.Memo(cluster=Cluster(kubernetes.client.ApiClient(configuration)), namespaces=[NS])
    async with running_operator(str(kube.url), kopf.get_default_registry(), namespaces=[NS], memo=memo):
        yield held


@pytest.mark.asyncio
async def test_a_restarted_operator_passes_each_run_once(kube: KubeEmulator):
    """kopf's first listing of the pods sends an event for each, here after every run's first
    pass: none of them wakes a run whose pass read that version of its pod. The first passes take
    the runs as kopf listed them, without reading them again."""
    names = [f"run-{index}" for index in range(4)]
    async with operator(kube):
        for name in names:
            kube.create_object(GRPORUNS, manifest(name), NS)
        await eventually(lambda: all(condition(status_of(kube, name), "Created").get("status") == "True" for name in names))
    for name in names:  # while the operator is down, the pods start
        kube.set_pod_status(NS, pod_name(name, 1), "Running")

    passes, calls = metric("grpo_operator_reconcile_passes_total"), len(list(kube))
    async with operator_listing_late(kube) as listing:
        await eventually(lambda: all(status_of(kube, name).get("phase") == "Running" for name in names))
        listing.times = 0
        # A change after the listing wakes its run, once kopf has handled the listing's events.
        kube.set_pod_status(NS, pod_name(names[0], 1), "Succeeded", containers={"trainer": terminated(0, message=COMPLETED)})
        await eventually(lambda: status_of(kube, names[0]).get("phase") == "Succeeded")

    assert metric("grpo_operator_reconcile_passes_total") - passes == len(names) + 1
    assert operator_calls(kube, calls, ApiCall("list", "pods")) == len(names) + 1
    assert operator_calls(kube, calls, ApiCall("get", "grporuns")) == 1  # the second pass of names[0]


@pytest.mark.asyncio
async def test_a_pod_changed_between_a_pass_and_kopfs_listing_wakes_its_run(kube: KubeEmulator):
    """The version kopf lists is not the one the run's pass read: the run is passed again at
    once, not at the 5-minute resync."""
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: condition(status_of(kube), "Created").get("status") == "True")
    report(kube, 1, "Running")  # while the operator is down

    async with operator_listing_late(kube) as listing:
        await eventually(phase_is(kube, "Running"))  # the run's first pass
        end(kube, 1, "completed")  # no watch tells the operator yet
        await asyncio.sleep(0.2)
        assert status_of(kube)["phase"] == "Running"
        listing.times = 0
        await eventually(phase_is(kube, "Succeeded"))


def new_run_watch_is_watching(kube: KubeEmulator) -> bool:
    return any(api_call(r) == ApiCall("watch", "grporuns") and r.headers.get("User-Agent") == USER_AGENT for r in kube)


@pytest.mark.asyncio
async def test_a_new_run_gets_its_pod_while_kopf_is_still_listing_the_runs(kube: KubeEmulator):
    """kopf serves a run applied during its first listing only once it has handled every listed
    run (seconds, with a thousand resident): the new-run watch passes it at once. The run's loop,
    once kopf starts it, posts that pass's events and goes on from what the pass left."""
    async with operator_listing_late(kube, "grporuns") as listing:
        await eventually(lambda: new_run_watch_is_watching(kube))
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: condition(status_of(kube), "Created").get("status") == "True")
        status = status_of(kube)
        assert (status["phase"], status["attempt"], status["observedGeneration"]) == ("Pending", 1, 1)
        assert events_of(kube) == [], "kopf posts the events, from the run's loop, which has not started"
        assert "finalizers" not in run_of(kube)["metadata"]
        listing.times = 0
        await eventually(lambda: events_of(kube) and run_of(kube)["metadata"].get("finalizers"))
        report(kube, 1, "Running")  # the loop goes on as usual
        await eventually(phase_is(kube, "Running"))
        await eventually(lambda: len(events_of(kube)) == 2)

    assert list(pods_ever(kube)) == [pod_name("run", 1)]
    assert events_of(kube) == [("Normal", "AttemptCreated"), ("Normal", "Started")]


@pytest.mark.asyncio
async def test_the_new_run_watch_watches_again_after_an_expired_version_or_an_error(kube: KubeEmulator, monkeypatch):
    """410 Gone: the version is listed again (what was applied meanwhile waits for kopf); any other
    error: the same version is watched again after a pause."""
    from grpo_operator import new_runs

    monkeypatch.setattr(new_runs, "RETRY_SECONDS", 0.05)
    ours = {"verb": "watch", "resource": "grporuns", "when": lambda r: r.headers.get("User-Agent") == USER_AGENT}
    faults = [kube.fail(1, 410, **ours), kube.fail(1, 500, **ours)]
    since = len(list(kube))
    async with operator_listing_late(kube, "grporuns"):
        await eventually(lambda: not any(fault.times for fault in faults) and new_run_watch_is_watching(kube))
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        assert operator_calls(kube, since, ApiCall("list", "grporuns")) == 2
        assert operator_calls(kube, since, ApiCall("watch", "grporuns")) >= 3


def test_the_new_run_watch_and_the_runs_loop_never_pass_a_run_at_once():
    from grpo_operator.new_runs import FirstPasses

    first = FirstPasses()
    claimed = first.claim("a")
    assert claimed is not None and first.claim("a") is None, "claimed once"
    assert first.loop_starts("a") is claimed, "the loop waits for the watch's pass"
    assert first.claim("a") is None, "the loop has started"
    first.loop_ends("a")
    assert first.loop_starts("b") is None and first.claim("b") is None, "the loop went first"
    assert first.claim("c") is not None
    first.forget("c")  # deleted before its loop started
    assert first.loop_starts("c") is None


def test_a_namespace_glob_is_left_to_kopf(caplog):
    from grpo_operator.new_runs import FirstPasses, NewRunWatch

    watch = NewRunWatch(Cluster(kubernetes.client.ApiClient()), FirstPasses(), manifests.DEFAULT_IMAGES)
    with caplog.at_level("INFO", logger="grpo_operator.new_runs"):
        watch.start(["team-*"])
    assert not watch._threads
    assert "new runs in 'team-*' wait for kopf" in caplog.text


@pytest.mark.slow
@pytest.mark.asyncio
async def test_fifty_runs_at_once_each_get_one_pod(kube: KubeEmulator):
    names = [f"run-{index}" for index in range(50)]
    async with operator(kube):
        for name in names:
            kube.create_object(GRPORUNS, manifest(name), NS)
        await eventually(lambda: all(status_of(kube, name).get("phase") == "Pending" for name in names), timeout=60)

    assert {name: list(pods_ever(kube, name)) for name in names} == {name: [pod_name(name, 1)] for name in names}


def metric(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.asyncio
async def test_metrics_count_runs_by_phase_reconcile_passes_errors_and_pod_recreations(kube: KubeEmulator):
    names = (
        "grpo_operator_reconcile_passes_total",
        "grpo_operator_reconcile_errors_total",
        "grpo_operator_pod_recreations_total",
    )
    before = {name: metric(name) for name in names}
    kube.fail(1, 500, verb="create", resource="pods")
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1))
        assert metric("grpo_operator_runs", phase="Pending") == 1
        report(kube, 1, "Running")
        await eventually(lambda: metric("grpo_operator_runs", phase="Running") == 1)
        end(kube, 1, "crash")
        await eventually(lambda: pod_of(kube, 2))
        assert (metric("grpo_operator_runs", phase="Pending"), metric("grpo_operator_runs", phase="Running")) == (1, 0)
        kube.delete_object(GRPORUNS, NS, "run")
        await eventually(lambda: run_of(kube) is None)

    passes, errors, recreations = (metric(name) - before[name] for name in names)
    assert (errors, recreations) == (1, 1) and passes >= 4
    assert metric("grpo_operator_runs", phase="Pending") == 0, "a deleted run is no longer counted"


# ------------------------------------------------------------------------------ killed and restarted


class Kill:
    """Kill the operator once it has made ``calls`` more API calls: every call from then on fails
    and changes nothing, so what it would have done next never reaches the cluster."""

    def __init__(self, kube: KubeEmulator, calls: int):
        self.left = calls
        self.fault = kube.fail(10**9, 503, when=self._due)

    def _due(self, _request: Any) -> bool:
        self.left -= 1
        return self.left < 0

    @property
    def done(self) -> bool:
        return self.left < 0

    def disarm(self) -> None:
        self.fault.times = 0


def lifetime(versions: list[Any]) -> tuple[int, float]:
    """The resourceVersions at which a pod was created and at which it finished or went."""
    version = [None if v is None else int(v["metadata"]["resourceVersion"]) for v in versions]
    finished = [version[i] for i, v in enumerate(versions) if v is not None and v["status"]["phase"] in ("Succeeded", "Failed")]
    deleted = [version[i - 1] for i, v in enumerate(versions) if v is None]
    return version[0], min(finished + deleted, default=math.inf)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(50))
@pytest.mark.asyncio
async def test_an_operator_killed_anywhere_never_runs_two_pods_nor_loses_status(kube: KubeEmulator, seed: int):
    """A seeded schedule: a run lives through up to three attempts, and in each step of it the
    operator is killed at a random API call to come (restarted if that came before it was done).
    The run must end as it would have without the kills."""
    rng = random.Random(seed)
    endings = [rng.choice(["crash", "oom", "evicted", "deleted", "preempted"]) for _ in range(rng.randint(0, 2))]
    endings.append("completed")

    running = contextlib.AsyncExitStack()  # the operator now running, to stop and start anew

    async def step(act: Callable[[], object], done: Callable[[], bool]) -> None:
        """Act as the world does, with a kill armed at a random API call to come; if it comes
        before the operator is done, restart the operator, which must finish the job."""
        nonlocal running
        kill = Kill(kube, rng.randint(0, 12))
        act()
        await eventually(lambda: done() or kill.done)
        if kill.done:
            await running.aclose()
            kill.disarm()
            running = contextlib.AsyncExitStack()
            await running.enter_async_context(operator(kube))
            await eventually(done)
        kill.disarm()

    def started(attempt: int) -> Callable[[], bool]:
        def check() -> bool:
            status = status_of(kube)
            created = condition(status, "Created").get("reason") == "PodCreated"
            return created and status.get("attempt") == attempt and pod_of(kube, attempt) is not None

        return check

    def live_through(attempt: int, ending: str) -> None:
        report(kube, attempt, "Running")
        report_progress(kube, step=10 * attempt)
        end(kube, attempt, ending)

    await running.enter_async_context(operator(kube))
    try:
        await step(lambda: kube.create_object(GRPORUNS, manifest(), NS), started(1))
        for attempt, ending in enumerate(endings, start=1):
            finished = phase_is(kube, "Succeeded") if ending == "completed" else started(attempt + 1)
            await step(lambda attempt=attempt, ending=ending: live_through(attempt, ending), finished)
    finally:
        await running.aclose()

    pods = pods_ever(kube)
    assert list(pods) == [pod_name("run", attempt) for attempt in range(1, len(endings) + 1)]
    assert not any(a is None and b is not None for versions in pods.values() for a, b in itertools.pairwise(versions)), \
        "no pod was created twice"
    spans = sorted(lifetime(versions) for versions in pods.values())
    assert all(later[0] > earlier[1] for earlier, later in itertools.pairwise(spans)), f"two pods at once: {spans}"
    status = status_of(kube)
    failures = sum(ending in RETRIED for ending in endings)
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Succeeded", len(endings), failures)
    assert status["progress"]["step"] == 10 * len(endings), "the trainer's report survives"


# ------------------------------------------------------------------------------ evaluation

EVALUATION = {"checkpoints": "final", "benchmarks": ["aime24", "math500"]}
ROOT = "s3://grpo-checkpoints/cpu/run"


def checkpoint(step: int) -> CheckpointRef:
    return CheckpointRef(step=step, uri=f"{ROOT}/checkpoints/step-{step:08d}")


def trained(kube: KubeEmulator, attempt: int, step: int = 60) -> None:
    """The trainer completes at ``step``, naming its final checkpoint."""
    said = TerminationMessage(Outcome.COMPLETED, step=step, checkpoint_uri=checkpoint(step).uri).to_json()
    report(kube, attempt, "Succeeded", terminated(0, message=said))


def saved(kube: KubeEmulator, step: int) -> None:
    """What the trainer writes into its run's status after each checkpoint."""
    latest = checkpoint(step).model_dump(mode="json", by_alias=True, exclude_none=True)
    kube.patch_object(GRPORUNS, NS, "run", {"status": {"latestCheckpoint": latest}}, "status")


def job_of(kube: KubeEmulator, step: int) -> dict[str, Any] | None:
    return kube.read_object(JOBS, NS, job_name("run", step))


def jobs_ever(kube: KubeEmulator) -> dict[str, int]:
    """How many times each evaluation Job of the run was created."""
    return {
        name: sum(1 for a, b in itertools.pairwise([None, *obj.history]) if a is None and b is not None)
        for (resource, _, name), obj in kube.objects.items() if resource == JOBS
    }


def evaluated_message(step: int, **scores: float) -> str:
    rows = tuple(
        BenchmarkScore(benchmark=benchmark, checkpoint_step=step, score=score, ci_low=score / 2, ci_high=(1 + score) / 2, n=30)
        .model_dump(mode="json", by_alias=True, exclude_none=True)
        for benchmark, score in scores.items()
    )
    return TerminationMessage(Outcome.EVALUATED, step=step, checkpoint_uri=checkpoint(step).uri, scores=rows).to_json()


def evaluate(kube: KubeEmulator, step: int, **scores: float) -> None:
    """The Job controller starts the Job's pod, grpo eval in it reports the scores, the Job completes."""
    pod = kube.start_job_pod(NS, job_name("run", step))
    kube.set_pod_status(NS, pod["metadata"]["name"], "Succeeded",
                        containers={"eval": terminated(0, message=evaluated_message(step, **scores))})
    kube.set_job_status(NS, job_name("run", step), job_finished("Complete"))


def scores_of(status: dict[str, Any]) -> dict[tuple[int, str], float]:
    return {(row["checkpointStep"], row["benchmark"]): row["score"] for row in status.get("evaluations", [])}


@pytest.mark.asyncio
async def test_a_trained_run_is_evaluated_then_succeeds_with_its_scores_and_best_checkpoint(kube: KubeEmulator):
    storage = {"storage": "s3://grpo-checkpoints/cpu", "credentialsSecret": "s3-credentials"}
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(evaluation=EVALUATION, checkpoints=storage), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Running")
        await eventually(phase_is(kube, "Running"))
        trained(kube, 1)
        await eventually(phase_is(kube, "Evaluating"))
        job = await eventually(lambda: job_of(kube, 60))
        run = state.validate_body(run_of(kube))
        assert without_server_fields(job) == manifests.evaluation_job(run, checkpoint(60))
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[3:5] == ["eval", checkpoint(60).uri]
        assert command[command.index("--output") + 1] == f"{ROOT}/evaluations/step-00000060"
        account = kube.read_object(SERVICEACCOUNTS, NS, "run-eval")
        assert without_server_fields(account) == manifests.evaluation_service_account(run)

        pod = kube.start_job_pod(NS, job_name("run", 60))
        kube.set_pod_status(NS, pod["metadata"]["name"], "Running")
        await asyncio.sleep(0.3)
        assert status_of(kube)["phase"] == "Evaluating" and "evaluating step 60" in status_of(kube)["message"]

        kube.set_pod_status(NS, pod["metadata"]["name"], "Succeeded",
                            containers={"eval": terminated(0, message=evaluated_message(60, aime24=0.3, math500=0.7))})
        await eventually(phase_is(kube, "Succeeded"))
        kube.set_job_status(NS, job_name("run", 60), job_finished("Complete"))  # after the pod: changes nothing
        await eventually(lambda: ("Normal", "Evaluated") in events_of(kube))
        await asyncio.sleep(0.2)

    status = status_of(kube)
    GRPORunStatus.model_validate(status)
    assert scores_of(status) == {(60, "aime24"): 0.3, (60, "math500"): 0.7}
    assert status["evaluations"][0] == {"benchmark": "aime24", "checkpointStep": 60, "score": 0.3, "ciLow": 0.15,
                                        "ciHigh": 0.65, "n": 30, "samplesPerProblem": 1}
    assert status["scores"] == {"aime24": 0.3, "math500": 0.7}
    assert status["bestCheckpoint"] == {"step": 60, "uri": checkpoint(60).uri}
    assert (condition(status, "Succeeded")["status"], condition(status, "Succeeded")["reason"]) == ("True", "Evaluated")
    assert "completionTime" in status and not condition(status, "EvaluationFailed")
    assert jobs_ever(kube) == {job_name("run", 60): 1}
    assert events_of(kube)[-2:] in ([("Normal", "Evaluated")] * 2,)


@pytest.mark.parametrize("failure", ["backoff limit", "bad input", "deadline"])
@pytest.mark.asyncio
async def test_a_failed_evaluation_is_a_condition_with_its_reason_and_the_run_still_succeeds(kube: KubeEmulator, failure):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(evaluation=EVALUATION), NS)
        await eventually(lambda: pod_of(kube, 1))
        trained(kube, 1)
        await eventually(lambda: job_of(kube, 60))
        name = job_name("run", 60)
        match failure:
            case "backoff limit":  # every try crashes; the Job controller gives up after backoffLimit retries
                for _ in range(manifests.EVALUATION_BACKOFF_LIMIT + 1):
                    pod = kube.start_job_pod(NS, name)
                    crash = terminated(1, message="Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory")
                    kube.set_pod_status(NS, pod["metadata"]["name"], "Failed", containers={"eval": crash})
                ended = job_finished("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            case "bad input":  # exit 2: podFailurePolicy fails the Job at once
                pod = kube.start_job_pod(NS, name)
                said = TerminationMessage(Outcome.INVALID, reason="CheckpointError", message="no complete checkpoint there")
                kube.set_pod_status(NS, pod["metadata"]["name"], "Failed",
                                    containers={"eval": terminated(EXIT_INVALID, message=said.to_json())})
                ended = job_finished("Failed", "PodFailurePolicy", "Container eval for pod failed with exit code 2")
            case "deadline":
                pod = kube.start_job_pod(NS, name)
                kube.set_pod_status(NS, pod["metadata"]["name"], "Running")
                ended = job_finished("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        await asyncio.sleep(0.2)
        assert status_of(kube)["phase"] == "Evaluating", "a failed pod the Job retries is no failed evaluation"
        kube.set_job_status(NS, name, ended)
        await eventually(phase_is(kube, "Succeeded"))
        await eventually(lambda: ("Warning", ended["conditions"][-1]["reason"]) in events_of(kube))

    status = status_of(kube)
    failed = condition(status, "EvaluationFailed")
    reason = {"backoff limit": "BackoffLimitExceeded", "bad input": "PodFailurePolicy", "deadline": "DeadlineExceeded"}[failure]
    assert (failed["status"], failed["reason"]) == ("True", reason)
    detail = {"backoff limit": "CUDA out of memory", "bad input": "no complete checkpoint there", "deadline": "deadline"}[failure]
    assert "step 60" in failed["message"] and detail in failed["message"]
    assert condition(status, "Succeeded")["status"] == "True" and not condition(status, "Failed")
    assert status["evaluations"] == [] and "bestCheckpoint" not in status and "scores" not in status
    assert jobs_ever(kube) == {name: 1}, "a failed evaluation is not tried again"


@pytest.mark.asyncio
async def test_every_checkpoint_is_evaluated_while_training_goes_on_and_no_score_is_lost(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(evaluation={**EVALUATION, "checkpoints": "every"}), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Running")
        await eventually(phase_is(kube, "Running"))
        for step in (10, 20, 40):
            saved(kube, step)
            await eventually(lambda step=step: job_of(kube, step))
        evaluate(kube, 10, aime24=0.1, math500=0.1)
        await eventually(lambda: status_of(kube).get("bestCheckpoint", {}).get("step") == 10)
        assert status_of(kube)["phase"] == "Running"

        # Two Jobs finish, and the trainer completes at 60 and reports its progress, all at the
        # same moment, and the operator's first status patch after that fails: one writer, which
        # reads every finished Job again on each pass, so nothing overwrites or loses anything.
        fault = kube.fail(1, 500, verb="patch", resource="grporuns/status")
        pods = {step: kube.start_job_pod(NS, job_name("run", step)) for step in (20, 40)}
        saved(kube, 60)
        for step, scores in ((20, {"aime24": 0.1, "math500": 0.4}), (40, {"aime24": 0.5, "math500": 0.6})):
            kube.set_pod_status(NS, pods[step]["metadata"]["name"], "Succeeded",
                                containers={"eval": terminated(0, message=evaluated_message(step, **scores))})
        trained(kube, 1)
        report_progress(kube, step=60)
        await eventually(lambda: job_of(kube, 60))
        await eventually(phase_is(kube, "Evaluating"))
        evaluate(kube, 60, aime24=0.4, math500=0.6)
        await eventually(phase_is(kube, "Succeeded"))

    assert fault.times == 0
    status = status_of(kube)
    assert scores_of(status) == {(10, "aime24"): 0.1, (10, "math500"): 0.1, (20, "aime24"): 0.1, (20, "math500"): 0.4,
                                 (40, "aime24"): 0.5, (40, "math500"): 0.6, (60, "aime24"): 0.4, (60, "math500"): 0.6}
    assert status["bestCheckpoint"] == {"step": 40, "uri": checkpoint(40).uri}
    assert status["scores"] == {"aime24": 0.5, "math500": 0.6}
    assert status["progress"]["step"] == 60 and status["latestCheckpoint"]["step"] == 60, "the trainer's fields stay its own"
    assert jobs_ever(kube) == {job_name("run", step): 1 for step in (10, 20, 40, 60)}, "one Job per checkpoint"
    writes = [
        r for r in kube if r.headers.get("User-Agent") == USER_AGENT and r.resource == GRPORUNS and r.subresource == "status"
    ]
    assert writes and all(set(r.data["status"]) <= {"phase", "conditions", "observedGeneration", "attempt", "restarts",
                                                    "startTime", "completionTime", "message", "evaluations", "scores",
                                                    "bestCheckpoint", "validatedSpec"} for r in writes)


@pytest.mark.asyncio
async def test_deleting_a_run_deletes_its_evaluation_jobs_and_their_pods(kube: KubeEmulator):
    async with operator(kube):
        kube.create_object(GRPORUNS, manifest(evaluation=EVALUATION), NS)
        await eventually(lambda: pod_of(kube, 1))
        trained(kube, 1)
        await eventually(lambda: job_of(kube, 60))
        pod = kube.start_job_pod(NS, job_name("run", 60))
        assert pod["metadata"]["labels"][JOB_NAME_LABEL] == job_name("run", 60)
        kube.delete_object(GRPORUNS, NS, "run")
        await eventually(lambda: run_of(kube) is None)

    assert job_of(kube, 60) is None and kube.read_object(PODS, NS, pod["metadata"]["name"]) is None
    assert kube.read_object(SERVICEACCOUNTS, NS, "run-eval") is None


# ------------------------------------------------------------------------------ the command line


def test_operator_command_takes_a_namespace_or_all_of_them():
    assert grpo_parser().parse_args(["operator", "-n", "a", "-n", "b"]).namespace == ["a", "b"]
    assert grpo_parser().parse_args(["operator", "--all-namespaces", "-v"]).all_namespaces
    ports = grpo_parser().parse_args(["operator", "-A", "--metrics-port=8080", "--health-port", "8081"])
    assert (ports.metrics_port, ports.health_port) == (8080, 8081)
    for wrong in (["operator"], ["operator", "-n", "a", "-A"], ["operator", "-A", "--metrics-port=0"]):
        with pytest.raises(SystemExit):
            grpo_parser().parse_args(wrong)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_grpo_operator_runs_the_operator_with_the_kubeconfig(kube: KubeEmulator, tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(kube.url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "any"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
    }))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "grpo_trainer.cli", "operator", "--namespace", NS,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: pod_of(kube, 1) or process.returncode is not None, timeout=30)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        _, stderr = await process.communicate()
    assert pod_of(kube, 1), stderr.decode()[-3000:]
    assert new_run_watch_is_watching(kube), "the command starts the new-run watch on its namespace"


@pytest.mark.asyncio
async def test_urgent_passes_go_before_every_waiting_routine_pass():
    """A new run's first pass waits for a free worker, not for the catch-up passes queued before it."""
    from grpo_operator.handlers import Passes

    passes, started, busy = Passes(1), [], threading.Event()

    async def submit(name: str, urgent: bool) -> None:
        async with passes.turn(urgent):
            started.append(name)

    async def hold() -> None:
        async with passes.turn(False):
            await asyncio.to_thread(busy.wait)

    first = asyncio.create_task(hold())  # the one worker, busy till the rest wait
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(submit(name, urgent)) for name, urgent in
               (("resident-1", False), ("resident-2", False), ("new", True), ("resident-3", False))]
    cancelled = asyncio.create_task(submit("cancelled", True))
    await asyncio.sleep(0)
    cancelled.cancel()
    busy.set()
    await asyncio.gather(first, *waiting)
    assert started == ["new", "resident-1", "resident-2", "resident-3"]


def test_a_pod_wakes_its_run_only_in_a_version_the_last_pass_did_not_read():
    from grpo_operator.handlers import Wakeup

    def woken(wakeup: Wakeup) -> bool:
        return wakeup._event.is_set()

    wakeup = Wakeup()
    wakeup.pass_begins()
    wakeup.watched("pod", "7")  # during the pass: judged once it is done
    wakeup.watched("job", "8")
    assert not woken(wakeup)
    wakeup.pass_ended(read={"pod": "7", "job": "8"})
    assert not woken(wakeup), "the pass read both versions"
    wakeup.watched("pod", "7")  # kopf's listing, after the pass
    assert not woken(wakeup)
    wakeup.watched("pod", "9")
    assert woken(wakeup)

    wakeup.pass_begins()
    wakeup.watched("pod", "10")  # a version newer than the one the pass reads
    wakeup.pass_ended(read={"pod": "9"})
    assert woken(wakeup)

    wakeup.pass_begins()
    wakeup.watched("pod", "11")
    wakeup.pass_ended(read=None)  # the pass failed: what the last one read stands
    assert woken(wakeup)

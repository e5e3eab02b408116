"""The operator under the chart's RBAC, in the API emulator with RBAC enforced: every call it makes
is allowed, every grant is used (or needed to create the trainer's Role), and the operator, run
exactly as the chart's Deployment runs it, takes a GRPORun from creation to deletion."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
import yaml
from helm_chart import one, render
from kube_emulator import (
    CONFIGMAPS,
    GRPORUNS,
    NAMESPACES,
    PODS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    KubeEmulator,
    eventually,
    running_operator,
)
from rbac import Grant, Permissions, access_of, grants_of
from test_operator import (
    NS,
    evaluate,
    job_of,
    manifest,
    phase_is,
    pod_of,
    quick_backoff,  # noqa: F401  (autouse: backoffs of tenths of a second)
    report,
    run_of,
    saved,
    status_of,
    trained,
)

import grpo_operator.handlers  # noqa: F401  (registers the handlers with kopf's default registry)
from grpo_operator import manifests, state
from grpo_operator.cluster import Cluster

MODES = {"every namespace": {}, "listed namespaces": {"watchNamespaces": [NS, "other"]}}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}


def operator_permissions(objects: list[dict[str, Any]]) -> Permissions:
    account = one(objects, "ServiceAccount")["metadata"]
    return Permissions.of(objects, account["namespace"], account["name"])


def enforce(kube: KubeEmulator, permissions: Permissions) -> None:
    kube.authorize(functools.partial(permissions.denial, read=kube.read_object))


def kind(grant: Grant) -> tuple[str, str, str]:
    return grant.verb, grant.group, grant.resource


@contextlib.asynccontextmanager
async def operator_in(kube: KubeEmulator, namespaces: list[str]) -> AsyncIterator[None]:
    """The operator watching ``namespaces`` (all: none listed), from when it watches pods."""
    configuration = kubernetes.client.Configuration(host=str(kube.url).rstrip("/"))
    client = kubernetes.client.ApiClient(configuration)
    memo = kopf.Memo(cluster=Cluster(client), namespaces=namespaces or None)  # the new-run watch's too
    async with running_operator(str(kube.url), kopf.get_default_registry(), namespaces=namespaces, memo=memo):
        await eventually(lambda: any(r.resource == PODS and "watch" in r.params for r in kube))
        yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.asyncio
async def test_the_operator_uses_every_grant_of_the_chart_and_is_refused_nothing(kube: KubeEmulator, mode: str):
    """One run through every path that calls the API: an attempt, a failure and a recreated pod
    (which adopts the run's objects), evaluations of every checkpoint, a suspension and a resume,
    success, and deletion by its TTL."""
    values = MODES[mode]
    kube.create_object(NAMESPACES, {"metadata": {"name": "other"}})
    permissions = operator_permissions(render(values))
    enforce(kube, permissions)
    every = {"checkpoints": "every", "benchmarks": ["aime24"]}
    async with operator_in(kube, values.get("watchNamespaces", [])):
        kube.create_object(GRPORUNS, manifest(evaluation=every, ttlSecondsAfterFinished=1), NS)
        await eventually(lambda: pod_of(kube, 1))
        report(kube, 1, "Failed")
        await eventually(lambda: pod_of(kube, 2))
        report(kube, 2, "Running")
        for step in (10, 20):
            saved(kube, step)
            await eventually(lambda step=step: job_of(kube, step))
        kube.patch_object(GRPORUNS, NS, "run", {"spec": {"suspend": True}})
        await eventually(phase_is(kube, "Suspended"))
        kube.patch_object(GRPORUNS, NS, "run", {"spec": {"suspend": False}})
        await eventually(lambda: pod_of(kube, 3))
        trained(kube, 3)
        await eventually(lambda: job_of(kube, 60))
        for step in (10, 20, 60):
            evaluate(kube, step, aime24=step / 100)
        await eventually(lambda: run_of(kube) is None, timeout=15)

    assert kube.denials == []
    used = {kind(Grant(a.verb, a.group, a.resource, None)) for request in kube if (a := access_of(request))}
    run = state.validate_body({**manifest(), "metadata": {"name": "run", "namespace": NS, "uid": "u", "generation": 1}})
    for_the_trainer = {kind(grant) for grant in grants_of(manifests.role(run)["rules"], NS)}
    granted = {kind(grant) for grant in permissions.grants}
    assert granted == used | for_the_trainer, "granted = used + what the trainer's Role grants"
    namespaced = {grant.namespace for grant in permissions.grants if grant.resource not in CLUSTER_SCOPED}
    assert namespaced == (set(values["watchNamespaces"]) if values else {None})


@pytest.mark.asyncio
async def test_a_call_the_chart_does_not_grant_is_refused(kube: KubeEmulator):
    """The enforcement the test above relies on: without the grant to create pods, the run gets none."""
    objects = render({"watchNamespaces": [NS]})
    role = one(objects, "Role")
    role["rules"] = [rule for rule in role["rules"] if rule["resources"] != ["pods"]] + [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "delete"]}]
    enforce(kube, operator_permissions(objects))
    async with operator_in(kube, [NS]):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: kube.denials)
    call, reason = kube.denials[0]
    assert (call.verb, call.resource) == ("create", "pods") and 'cannot create resource "pods" in API group ""' in reason
    assert pod_of(kube, 1) is None


@pytest.mark.asyncio
async def test_the_operator_may_not_grant_what_it_does_not_hold(kube: KubeEmulator):
    objects = render({"watchNamespaces": [NS]})
    role = one(objects, "Role")
    role["rules"] = [rule for rule in role["rules"] if rule["resources"] != ["grporuns/status"]] + [
        {"apiGroups": ["grpo.dev"], "resources": ["grporuns/status"], "verbs": ["patch"]}]
    enforce(kube, operator_permissions(objects))
    async with operator_in(kube, [NS]):
        kube.create_object(GRPORUNS, manifest(), NS)
        await eventually(lambda: kube.denials)
    call, reason = kube.denials[0]
    assert (call.verb, call.resource) == ("create", "roles") and "not currently held" in reason and "'get'" in reason


# ------------------------------------------------------------------------------ as deployed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_operator_as_the_chart_deploys_it_runs_a_run_from_creation_to_deletion(kube: KubeEmulator, tmp_path: Path):
    """The Deployment's command, arguments and environment, and the RBAC of its account: the
    operator process creates the run's pod with the chart's images, writes its status, serves
    its health and metrics on the chart's ports, and the deleted run leaves nothing behind."""
    ports = {"metrics": free_port(), "health": free_port()}
    values = {"watchNamespaces": [NS], "images": {"registry": "registry.local/ml", "tag": "9.9.9"},
              "metrics": {"port": ports["metrics"], "serviceMonitor": {"enabled": False}}, "health": {"port": ports["health"]}}
    objects = render(values)
    enforce(kube, operator_permissions(objects))
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "grpo"  # the package's entry point: run here as this interpreter's
    command = [sys.executable, "-m", "grpo_trainer.cli", *container["command"][1:], *container["args"]]
    kubeconfig = tmp_path / "kubeconfig"  # in a cluster: the pod's ServiceAccount token
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(kube.url).rstrip("/")}}],
        "users": [{"name": "operator", "user": {"token": "operator"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
    }))
    env = {**os.environ, **{entry["name"]: entry["value"] for entry in container["env"]}, "KUBECONFIG": str(kubeconfig)}
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        kube.create_object(GRPORUNS, manifest(resources={}), NS)  # on GPUs: a trainer and a vLLM sidecar
        pod = await eventually(lambda: pod_of(kube, 1) or process.returncode is not None, timeout=30)
        assert process.returncode is None
        assert pod["spec"]["containers"][0]["image"] == "registry.local/ml/trainer:9.9.9"
        assert pod["spec"]["initContainers"][0]["image"] == "registry.local/ml/vllm:9.9.9"
        await eventually(lambda: status_of(kube).get("phase") == "Pending")
        health = f"http://127.0.0.1:{ports['health']}/healthz"
        assert await eventually(lambda: asyncio.to_thread(fetch, health)) is not None
        metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{ports['metrics']}/metrics")
        assert 'grpo_operator_runs{phase="Pending"} 1.0' in metrics

        kube.delete_object(GRPORUNS, NS, "run")
        await eventually(lambda: run_of(kube) is None, timeout=30)
    finally:
        if process.returncode is None:
            process.terminate()
        _, stderr = await process.communicate()
    log = stderr.decode()[-3000:]
    assert kube.denials == [], log
    names = manifests.resource_names("run")
    owned = [(CONFIGMAPS, names.config_map), (SERVICEACCOUNTS, names.service_account), (ROLES, names.role),
             (ROLEBINDINGS, names.role_binding), (PODS, manifests.pod_name("run", 1))]
    leftovers = {(resource.plural, name) for resource, name in owned if kube.read_object(resource, NS, name) is not None}
    assert leftovers == set(), log

"""The Kubernetes API emulator (tests/kube_emulator.py) does what the API server does in the ways the
operator relies on, and kopf runs an operator end to end against it."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import yaml
from kube_emulator import (
    CONFIGMAPS,
    CRDS,
    EVENTS,
    GRPORUNS,
    JOB_NAME_LABEL,
    JOBS,
    NAMESPACES,
    PODS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    ApiCall,
    KubeEmulator,
    eventually,
    fast_settings,
    job_finished,
    label_selector,
    merge_patch,
    resource_path,
    running_operator,
    terminated,
    waiting,
)

REPO = Path(__file__).resolve().parent.parent
RUN = yaml.safe_load((REPO / "examples" / "cpu-smollm2.yaml").read_text())
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


async def call(kube: KubeEmulator, method: str, path: str, body: Any = None, content_type: str = "application/json"):
    """An API call as kopf makes it: the status code and the decoded body."""
    headers = {"Content-Type": content_type}
    async with kube.request(method, path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def watch(kube: KubeEmulator, resource, namespace: str | None = None, **params: str) -> list[dict[str, Any]]:
    """The events of one watch request, read until the server ends it (pass timeoutSeconds)."""
    async with kube.get(resource_path(resource, namespace), params={"watch": "true", **params}) as response:
        assert response.status == 200
        return [json.loads(line) async for line in response.content if line.strip()]


def owner_references(*owners: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
         "uid": owner["metadata"]["uid"]}
        for owner in owners
    ]


def configmap(name: str, *owners: dict[str, Any], finalizers: tuple[str, ...] = ()) -> dict[str, Any]:
    metadata = {"name": name, "ownerReferences": owner_references(*owners), "finalizers": list(finalizers)}
    return {"metadata": metadata, "data": {"key": name}}


def pod(name: str, *containers: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"containers": [{"name": c, "image": f"{c}:1"} for c in containers]}}


def version(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


# ------------------------------------------------------------------------------ resourceVersion, identity


@pytest.mark.asyncio
async def test_every_write_takes_the_next_cluster_wide_resource_version(kube: KubeEmulator):
    start = kube.resource_version
    status, created = await call(kube, "POST", resource_path(CONFIGMAPS, "default"), configmap("a"))
    assert status == 201
    _, other = await call(kube, "POST", resource_path(PODS, "default"), pod("p", "main"))
    _, patched = await call(kube, "PATCH", resource_path(CONFIGMAPS, "default", "a"), {"data": {"k": "v"}}, MERGE)
    _, deleted = await call(kube, "DELETE", resource_path(CONFIGMAPS, "default", "a"))
    versions = [version(created), version(other), version(patched), version(deleted)]
    assert versions == [start + 1, start + 2, start + 3, start + 4]

    # A watch from `start` replays this resource's events with those versions, then ends on timeoutSeconds.
    events = await watch(kube, CONFIGMAPS, "default", resourceVersion=str(start), timeoutSeconds="0.2")
    assert [(event["type"], version(event["object"])) for event in events] == [
        ("ADDED", start + 1), ("MODIFIED", start + 3), ("DELETED", start + 4)
    ]
    # A watch from a later version resumes there; a watch without one starts with what exists.
    resumed = await watch(kube, CONFIGMAPS, "default", resourceVersion=str(start + 3), timeoutSeconds="0.1")
    assert [event["type"] for event in resumed] == ["DELETED"]
    present = await watch(kube, PODS, "default", timeoutSeconds="0.1")
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in present] == [("ADDED", "p")]


@pytest.mark.asyncio
async def test_create_sets_identity_and_generation_counts_only_content_changes(kube: KubeEmulator):
    created = kube.create_object(GRPORUNS, {**RUN, "status": {"phase": "Done"}}, "default")
    metadata = created["metadata"]
    assert len(metadata["uid"]) == 32 and metadata["creationTimestamp"].endswith("Z")
    assert metadata["generation"] == 1 and metadata["namespace"] == "default"
    assert "status" not in created, "status is set through /status only"
    name = metadata["name"]

    labelled = kube.patch_object(GRPORUNS, "default", name, {"metadata": {"labels": {"team": "a"}}})
    reported = kube.patch_object(GRPORUNS, "default", name, {"status": {"phase": "Running"}}, "status")
    assert labelled["metadata"]["generation"] == reported["metadata"]["generation"] == 1
    assert version(created) < version(labelled) < version(reported)

    changed = kube.patch_object(GRPORUNS, "default", name, {"spec": {"grpo": {"beta": 0.04}}})
    assert changed["metadata"]["generation"] == 2

    # Nothing changes: nothing is written, so no new version and no watch event.
    unchanged = kube.patch_object(GRPORUNS, "default", name, {"spec": {"grpo": {"beta": 0.04}}})
    assert unchanged == changed and kube.resource_version == version(changed)

    # Without a status subresource, a status change is a content change like any other.
    kube.create_object(CONFIGMAPS, configmap("c"), "default")
    assert kube.patch_object(CONFIGMAPS, "default", "c", {"status": "x"})["metadata"]["generation"] == 2


@pytest.mark.asyncio
async def test_create_names_and_namespaces_as_the_api_server_does(kube: KubeEmulator):
    path = resource_path(CONFIGMAPS, "default")
    status, generated = await call(kube, "POST", path, {"metadata": {"generateName": "kopf-event-"}})
    assert status == 201 and generated["metadata"]["name"].startswith("kopf-event-")
    assert len(generated["metadata"]["name"]) == len("kopf-event-") + 5

    assert (await call(kube, "POST", path, configmap("same")))[0] == 201
    status, body = await call(kube, "POST", path, configmap("same"))
    assert (status, body["reason"]) == (409, "AlreadyExists")
    status, body = await call(kube, "POST", resource_path(CONFIGMAPS, "nowhere"), configmap("x"))
    assert status == 404 and "nowhere" in body["message"]
    kube.create_object(NAMESPACES, {"metadata": {"name": "nowhere"}})
    assert (await call(kube, "POST", resource_path(CONFIGMAPS, "nowhere"), configmap("x")))[0] == 201
    status, body = await call(kube, "POST", path, {"data": {}})
    assert status == 422 and "metadata.name" in body["message"]
    status, _ = await call(kube, "GET", resource_path(kmock.resource("apps", "v1", "deployments"), "default"))
    assert status == 404


@pytest.mark.asyncio
async def test_namespaces_are_served_as_cluster_scoped_objects(kube: KubeEmulator):
    status, created = await call(kube, "POST", resource_path(NAMESPACES), {"metadata": {"name": "team-a"}})
    assert status == 201 and "namespace" not in created["metadata"]
    _, listed = await call(kube, "GET", resource_path(NAMESPACES))
    assert [item["metadata"]["name"] for item in listed["items"]] == ["default", "team-a"]
    path = resource_path(NAMESPACES, None, "team-a")
    assert (await call(kube, "GET", path))[1] == created
    _, labelled = await call(kube, "PATCH", path, {"metadata": {"labels": {"a": "b"}}}, MERGE)
    assert labelled["metadata"]["labels"] == {"a": "b"}
    since = created["metadata"]["resourceVersion"]
    events = await watch(kube, NAMESPACES, resourceVersion=since, timeoutSeconds="0.1")
    assert [event["type"] for event in events] == ["MODIFIED"]
    assert kube.api_calls()[ApiCall("list", "namespaces")] == 1


# ------------------------------------------------------------------------------ status subresource


@pytest.mark.asyncio
@pytest.mark.parametrize("resource, body", [(GRPORUNS, RUN), (PODS, pod("cpu-smollm2", "trainer"))])
async def test_status_is_written_only_through_its_subresource(kube: KubeEmulator, resource, body):
    created = kube.create_object(resource, body, "default")
    initial_status = created.get("status")
    assert initial_status == ({"phase": "Pending"} if resource == PODS else None)
    name = created["metadata"]["name"]
    path = resource_path(resource, "default", name)
    spec = {"spec": {"nodeName": "n1"}} if resource == PODS else {"spec": {"grpo": {"beta": 0.1}}}

    # The object's endpoint changes all but the status.
    _, patched = await call(kube, "PATCH", path, {**spec, "status": {"phase": "Hacked"}}, MERGE)
    assert patched["spec"] == merge_patch(created["spec"], spec["spec"]) and patched.get("status") == initial_status
    ops = [
        {"op": "add", "path": "/status", "value": {"phase": "Hacked"}},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
    ]
    _, patched = await call(kube, "PATCH", path, ops, JSON_PATCH)
    assert patched.get("status") == initial_status and patched["metadata"]["labels"] == {"a": "b"}
    _, replaced = await call(kube, "PUT", path, {**patched, "status": {"phase": "Hacked"}})
    assert replaced.get("status") == initial_status

    # /status changes the status and nothing else.
    unchanged = kube.read_object(resource, "default", name)
    everything = {"status": {"phase": "Running"}, "spec": {"x": 1}, "metadata": {"labels": {"a": "c"}}}
    _, reported = await call(kube, "PATCH", f"{path}/status", everything, MERGE)
    assert reported["status"]["phase"] == "Running"
    assert reported["spec"] == unchanged["spec"] and reported["metadata"]["labels"] == {"a": "b"}
    _, replaced = await call(kube, "PUT", f"{path}/status", {**reported, "status": {"phase": "Succeeded"}, "spec": {}})
    assert replaced["status"] == {**reported["status"], "phase": "Succeeded"} and replaced["spec"] == unchanged["spec"]
    assert (await call(kube, "GET", f"{path}/status"))[1] == replaced


@pytest.mark.asyncio
async def test_json_patch_tests_the_resource_version_as_kopf_does(kube: KubeEmulator):
    created = kube.create_object(GRPORUNS, RUN, "default")
    path = resource_path(GRPORUNS, "default", "cpu-smollm2")
    kube.patch_object(GRPORUNS, "default", "cpu-smollm2", {"metadata": {"labels": {"moved": "on"}}})

    def add_finalizer(resource_version: str) -> list[dict[str, Any]]:
        test = {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}
        return [test, {"op": "add", "path": "/metadata/finalizers", "value": ["grpo.dev/run"]}]

    status, body = await call(kube, "PATCH", path, add_finalizer(created["metadata"]["resourceVersion"]), JSON_PATCH)
    assert (status, body["reason"]) == (422, "Invalid")
    assert "finalizers" not in kube.read_object(GRPORUNS, "default", "cpu-smollm2")["metadata"]
    latest = str(kube.resource_version)
    status, body = await call(kube, "PATCH", path, add_finalizer(latest), JSON_PATCH)
    assert status == 200 and body["metadata"]["finalizers"] == ["grpo.dev/run"]

    strategic = "application/strategic-merge-patch+json"
    status, body = await call(kube, "PATCH", path, {"metadata": {"labels": None}}, strategic)
    assert status == 415 and "not emulated" in body["message"]


@pytest.mark.asyncio
async def test_put_refuses_a_stale_resource_version(kube: KubeEmulator):
    stale = kube.create_object(CONFIGMAPS, configmap("c"), "default")
    kube.patch_object(CONFIGMAPS, "default", "c", {"data": {"key": "newer"}})
    path = resource_path(CONFIGMAPS, "default", "c")
    status, body = await call(kube, "PUT", path, {**stale, "data": {"key": "lost"}})
    assert status == 409 and "modified" in body["message"]
    assert kube.read_object(CONFIGMAPS, "default", "c")["data"] == {"key": "newer"}


# RFC 7386, appendix A.
@pytest.mark.parametrize(
    "target, patch, result",
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7386(target, patch, result):
    assert merge_patch(target, patch) == result


# ------------------------------------------------------------------------------ label selectors

LABELLED = {
    "plain": {},
    "a": {"app": "grpo"},
    "ab": {"app": "grpo", "tier": "trainer"},
    "ac": {"app": "grpo", "tier": "sidecar"},
    "x": {"app": "other", "tier": "trainer"},
}


@pytest.mark.parametrize(
    "selector, names",
    [
        ("", {"plain", "a", "ab", "ac", "x"}),
        ("app=grpo", {"a", "ab", "ac"}),
        ("app==grpo", {"a", "ab", "ac"}),
        ("app!=grpo", {"plain", "x"}),
        ("tier", {"ab", "ac", "x"}),
        ("!tier", {"plain", "a"}),
        ("tier in (trainer, sidecar)", {"ab", "ac", "x"}),
        ("tier notin (trainer)", {"plain", "a", "ac"}),
        ("app=grpo,tier!=sidecar", {"a", "ab"}),
        ("app = grpo, tier in (trainer,sidecar), !missing", {"ab", "ac"}),
    ],
)
def test_label_selector_matches_as_kubernetes_does(selector, names):
    matches = label_selector(selector)
    assert {name for name, labels in LABELLED.items() if matches(labels)} == names


@pytest.mark.asyncio
async def test_list_and_watch_return_only_what_the_label_selector_selects(kube: KubeEmulator):
    start = kube.resource_version
    for name, labels in LABELLED.items():
        kube.create_object(CONFIGMAPS, {"metadata": {"name": name, "labels": labels}}, "default")
    params = {"labelSelector": "app=grpo,tier in (trainer,sidecar)"}
    async with kube.get(resource_path(CONFIGMAPS, "default"), params=params) as response:
        listed = await response.json()
    assert {item["metadata"]["name"] for item in listed["items"]} == {"ab", "ac"}
    assert listed["kind"] == "ConfigMapList" and int(listed["metadata"]["resourceVersion"]) == kube.resource_version
    events = await watch(kube, CONFIGMAPS, resourceVersion=str(start), timeoutSeconds="0.1", **params)
    assert [event["object"]["metadata"]["name"] for event in events] == ["ab", "ac"]

    status, body = await call(kube, "GET", resource_path(CONFIGMAPS) + "?labelSelector=app%3D%3D%3Dx")
    assert status == 400 and "labelSelector" in body["message"]


@pytest.mark.asyncio
async def test_a_list_with_a_limit_returns_its_first_page(kube: KubeEmulator):
    for name in ("c", "a", "b"):
        kube.create_object(CONFIGMAPS, {"metadata": {"name": name}}, "default")
    path = resource_path(CONFIGMAPS, "default")
    _, page = await call(kube, "GET", path + "?limit=2")
    assert [item["metadata"]["name"] for item in page["items"]] == ["a", "b"]
    assert page["metadata"]["remainingItemCount"] == 1 and page["metadata"]["continue"]
    assert int(page["metadata"]["resourceVersion"]) == kube.resource_version
    _, whole = await call(kube, "GET", path + "?limit=3")
    assert len(whole["items"]) == 3 and "continue" not in whole["metadata"]
    status, body = await call(kube, "GET", path + "?limit=2&continue=" + page["metadata"]["continue"])
    assert status == 400 and "continue" in body["message"]


@pytest.mark.asyncio
async def test_lists_by_label_return_what_a_scan_of_every_object_would_through_label_changes(kube: KubeEmulator):
    """Lists that select by label read an index by label: it follows labels added, changed and
    removed, deletions and re-creations, and lists come in the order of namespace and name."""
    kube.create_object(NAMESPACES, {"metadata": {"name": "other"}})
    for namespace in ("other", "default"):
        for name, labels in reversed(LABELLED.items()):
            kube.create_object(CONFIGMAPS, {"metadata": {"name": name, "labels": labels}}, namespace)
    kube.patch_object(CONFIGMAPS, "default", "a", {"metadata": {"labels": {"app": None, "tier": "trainer"}}})
    kube.patch_object(CONFIGMAPS, "default", "x", {"metadata": {"labels": {"app": "grpo"}}})
    kube.delete_object(CONFIGMAPS, "other", "ab")
    kube.create_object(CONFIGMAPS, {"metadata": {"name": "ab", "labels": {"app": "other"}}}, "other")
    kube.delete_object(CONFIGMAPS, "other", "ac")

    async def listed(namespace: str | None, selector: str) -> list[tuple[str, str]]:
        async with kube.get(resource_path(CONFIGMAPS, namespace), params={"labelSelector": selector}) as response:
            return [(item["metadata"]["namespace"], item["metadata"]["name"]) for item in (await response.json())["items"]]

    stored = [obj.raw for (resource, _, _), obj in kube.objects.items() if resource == CONFIGMAPS and not obj.deleted]
    for selector in ("app=grpo", "app=grpo,tier=trainer", "tier==trainer,app!=grpo", "app=other", "app=gone", "tier", ""):
        matches = label_selector(selector)
        scanned = sorted((obj["metadata"]["namespace"], obj["metadata"]["name"])
                         for obj in stored if matches(obj["metadata"].get("labels") or {}))
        assert await listed(None, selector) == scanned, selector
        assert await listed("other", selector) == [key for key in scanned if key[0] == "other"], selector
    assert await listed(None, "app=grpo") == [("default", "ab"), ("default", "ac"), ("default", "x"), ("other", "a")]


@pytest.mark.asyncio
async def test_what_the_emulator_takes_and_returns_are_copies_of_what_it_stores(kube: KubeEmulator):
    body = {"metadata": {"name": "c", "labels": {"app": "grpo"}}, "data": {"k": "v"}}
    created = kube.create_object(CONFIGMAPS, body, "default")
    patched = kube.patch_object(CONFIGMAPS, "default", "c", {"data": {"k2": "v2"}})
    for returned in (body, created, patched, kube.read_object(CONFIGMAPS, "default", "c")):
        returned["data"]["k"] = "changed"
        returned["metadata"]["labels"]["app"] = "changed"

    assert kube.read_object(CONFIGMAPS, "default", "c")["data"] == {"k": "v", "k2": "v2"}
    assert [dict(version["data"]) for version in kube.objects[CONFIGMAPS, "default", "c"].history] == [
        {"k": "v"}, {"k": "v", "k2": "v2"}
    ]
    _, listed = await call(kube, "GET", resource_path(CONFIGMAPS, "default") + "?labelSelector=app%3Dgrpo")
    assert [item["data"] for item in listed["items"]] == [{"k": "v", "k2": "v2"}]


# ------------------------------------------------------------------------------ deletion


@pytest.mark.asyncio
async def test_deleting_an_owner_deletes_what_it_alone_owns(kube: KubeEmulator):
    run = kube.create_object(GRPORUNS, RUN, "default")
    other = kube.create_object(CONFIGMAPS, configmap("other"), "default")
    config = kube.create_object(CONFIGMAPS, configmap("config", run), "default")
    worker = pod("worker", "main")
    worker["metadata"]["ownerReferences"] = owner_references(config)
    kube.create_object(PODS, worker, "default")
    kube.create_object(CONFIGMAPS, configmap("shared", run, other), "default")

    status, _ = await call(kube, "DELETE", resource_path(GRPORUNS, "default", "cpu-smollm2"))
    assert status == 200
    assert kube.read_object(GRPORUNS, "default", "cpu-smollm2") is None
    assert kube.read_object(CONFIGMAPS, "default", "config") is None
    assert kube.read_object(PODS, "default", "worker") is None, "dependents of dependents go too"
    assert kube.read_object(CONFIGMAPS, "default", "shared") is not None, "its other owner remains"
    assert kube.read_object(CONFIGMAPS, "default", "other") is not None


@pytest.mark.asyncio
async def test_finalizers_hold_an_object_being_deleted(kube: KubeEmulator):
    held = {**RUN, "metadata": {**RUN["metadata"], "finalizers": ["grpo.dev/run"]}}
    run = kube.create_object(GRPORUNS, held, "default")
    kube.create_object(CONFIGMAPS, configmap("config", run), "default")

    _, marked = await call(kube, "DELETE", resource_path(GRPORUNS, "default", "cpu-smollm2"))
    assert marked["metadata"]["deletionTimestamp"] and marked["metadata"]["finalizers"] == ["grpo.dev/run"]
    assert kube.read_object(GRPORUNS, "default", "cpu-smollm2") == marked
    assert kube.read_object(CONFIGMAPS, "default", "config") is not None, "in background, dependents wait"
    again = kube.delete_object(GRPORUNS, "default", "cpu-smollm2")
    assert again == marked, "deleting it again changes nothing"

    kube.patch_object(GRPORUNS, "default", "cpu-smollm2", {"metadata": {"finalizers": []}})
    assert kube.read_object(GRPORUNS, "default", "cpu-smollm2") is None
    assert kube.read_object(CONFIGMAPS, "default", "config") is None
    types = [event["type"] for event in await watch(kube, GRPORUNS, resourceVersion="1", timeoutSeconds="0.1")]
    assert types == ["ADDED", "MODIFIED", "DELETED"]


@pytest.mark.asyncio
async def test_foreground_deletion_deletes_the_dependents_first(kube: KubeEmulator):
    run = kube.create_object(GRPORUNS, RUN, "default")
    kube.create_object(CONFIGMAPS, configmap("config", run, finalizers=("grpo.dev/keep",)), "default")
    kube.create_object(CONFIGMAPS, configmap("plain", run), "default")

    path = resource_path(GRPORUNS, "default", "cpu-smollm2")
    _, marked = await call(kube, "DELETE", path, {"propagationPolicy": "Foreground"})
    assert marked["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert kube.read_object(CONFIGMAPS, "default", "plain") is None
    held = kube.read_object(CONFIGMAPS, "default", "config")
    assert held["metadata"]["deletionTimestamp"], "the dependent is being deleted, held by its finalizer"
    assert kube.read_object(GRPORUNS, "default", "cpu-smollm2") is not None, "the owner waits for it"

    kube.patch_object(CONFIGMAPS, "default", "config", {"metadata": {"finalizers": None}})
    assert kube.read_object(CONFIGMAPS, "default", "config") is None
    assert kube.read_object(GRPORUNS, "default", "cpu-smollm2") is None


@pytest.mark.asyncio
async def test_an_object_whose_owner_is_gone_is_collected(kube: KubeEmulator):
    ghost = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPORun", "metadata": {"name": "gone", "uid": "0" * 32}}
    kube.create_object(CONFIGMAPS, configmap("orphan", ghost), "default")
    assert kube.read_object(CONFIGMAPS, "default", "orphan") is None
    assert [bool(v) for v in kube.objects[CONFIGMAPS, "default", "orphan"].history] == [True, True, False]


# ------------------------------------------------------------------------------ discovery


@pytest.mark.asyncio
async def test_discovery_lists_every_served_resource_as_kopf_reads_it(kube: KubeEmulator):
    async with kube.get("/apis") as response:
        groups = {group["name"]: group for group in (await response.json())["groups"]}
    assert groups["grpo.dev"]["preferredVersion"]["version"] == "v1alpha1"

    expected = {
        NAMESPACES: (False, "Namespace"), EVENTS: (True, "Event"), CONFIGMAPS: (True, "ConfigMap"),
        SERVICEACCOUNTS: (True, "ServiceAccount"), PODS: (True, "Pod"), JOBS: (True, "Job"), ROLES: (True, "Role"),
        ROLEBINDINGS: (True, "RoleBinding"), CRDS: (False, "CustomResourceDefinition"), GRPORUNS: (True, "GRPORun"),
    }
    for resource, (namespaced, kind) in expected.items():
        path = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
        async with kube.get(path) as response:
            entries = {entry["name"]: entry for entry in (await response.json())["resources"]}
        entry = entries[resource.plural]
        assert (entry["namespaced"], entry["kind"]) == (namespaced, kind)
        assert {"get", "list", "watch", "create", "patch", "update", "delete"} <= set(entry["verbs"])
        subresources = {name.partition("/")[2] for name in entries if name.startswith(f"{resource.plural}/")}
        assert subresources == ({"status"} if resource in (GRPORUNS, PODS, JOBS, NAMESPACES, CRDS) else set())


# ------------------------------------------------------------------------------ faults, call counts


@pytest.mark.asyncio
async def test_a_fault_fails_the_next_matching_calls_and_changes_nothing(kube: KubeEmulator):
    kube.create_object(GRPORUNS, RUN, "default")
    path = resource_path(GRPORUNS, "default", "cpu-smollm2")
    fault = kube.fail(2, 503, verb="patch", resource="grporuns/status")
    conflict = kube.fail(1, 409, verb="create", when=lambda request: request.data["metadata"]["name"] == "b")

    results = []
    for phase in ("one", "two", "three"):
        status, _ = await call(kube, "PATCH", f"{path}/status", {"status": {"phase": phase}}, MERGE)
        results.append((status, kube.read_object(GRPORUNS, "default", "cpu-smollm2").get("status")))
        assert (await call(kube, "GET", path))[0] == 200, "other calls pass"
    assert results == [(503, None), (503, None), (200, {"phase": "three"})]
    assert fault.times == 0

    statuses = [(await call(kube, "POST", resource_path(CONFIGMAPS, "default"), configmap(n)))[0] for n in "abb"]
    assert statuses == [201, 409, 201], "the refused b was not created"
    assert conflict.times == 0


@pytest.mark.asyncio
async def test_api_calls_are_counted_per_verb_and_resource(kube: KubeEmulator):
    kube.create_object(GRPORUNS, RUN, "default")  # not an API call: the test's own doing
    path = resource_path(GRPORUNS, "default", "cpu-smollm2")
    await call(kube, "GET", "/apis/grpo.dev/v1alpha1")  # discovery: not counted
    await call(kube, "GET", path)
    await call(kube, "GET", resource_path(GRPORUNS, "default"))
    await call(kube, "PATCH", f"{path}/status", {"status": {"phase": "x"}}, MERGE)
    await call(kube, "PATCH", f"{path}/status", {"status": {"phase": "y"}}, MERGE)
    await call(kube, "PUT", path, kube.read_object(GRPORUNS, "default", "cpu-smollm2"))
    await call(kube, "POST", resource_path(PODS, "default"), pod("p", "main"))
    await call(kube, "DELETE", resource_path(PODS, "default", "p"))
    assert kube.api_calls() == collections.Counter({
        ApiCall("get", "grporuns"): 1,
        ApiCall("list", "grporuns"): 1,
        ApiCall("patch", "grporuns/status"): 2,
        ApiCall("update", "grporuns"): 1,
        ApiCall("create", "pods"): 1,
        ApiCall("delete", "pods"): 1,
    })


# ------------------------------------------------------------------------------ the kubelet's side


@pytest.mark.asyncio
async def test_pod_status_is_reported_as_a_kubelet_would(kube: KubeEmulator):
    created = kube.create_object(PODS, pod("run-0", "trainer", "vllm"), "default")

    running = kube.set_pod_status("default", "run-0", "Running")
    assert running["status"]["phase"] == "Running"
    assert [(s["name"], s["ready"], list(s["state"])) for s in running["status"]["containerStatuses"]] == [
        ("trainer", True, ["running"]), ("vllm", True, ["running"])
    ]

    failed = kube.set_pod_status(
        "default", "run-0", "Failed",
        containers={"trainer": terminated(137, "OOMKilled", "out of memory"), "vllm": waiting("Terminating")},
        reason="Evicted",
    )
    states = {s["name"]: s["state"] for s in failed["status"]["containerStatuses"]}
    assert states["trainer"]["terminated"] | {"startedAt": None, "finishedAt": None} == {
        "exitCode": 137, "reason": "OOMKilled", "message": "out of memory", "startedAt": None, "finishedAt": None
    }
    assert states["vllm"] == {"waiting": {"reason": "Terminating"}}
    assert failed["status"]["reason"] == "Evicted" and failed["spec"] == created["spec"]
    since = created["metadata"]["resourceVersion"]
    events = await watch(kube, PODS, "default", resourceVersion=since, timeoutSeconds="0.1")
    assert [event["object"]["status"]["phase"] for event in events] == ["Running", "Failed"]

    with pytest.raises(ValueError, match="no containers named"):
        kube.set_pod_status("default", "run-0", "Failed", containers={"sidecar": terminated(1)})
    with pytest.raises(ValueError, match="phase"):
        kube.set_pod_status("default", "run-0", "Crashed")


# ------------------------------------------------------------------------------ the Job controller's side


@pytest.mark.asyncio
async def test_jobs_are_served_and_their_pods_made_as_the_job_controller_makes_them(kube: KubeEmulator):
    run = kube.create_object(GRPORUNS, RUN, "default")
    template = {"metadata": {"labels": {"grpo.dev/run": "cpu-smollm2"}}, "spec": pod("x", "eval")["spec"]}
    job = {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": template, "backoffLimit": 2},
           "metadata": {"name": "eval-50", "ownerReferences": owner_references(run), "labels": {"grpo.dev/run": "cpu-smollm2"}}}
    status, created = await call(kube, "POST", resource_path(JOBS, "default"), {**job, "status": {"failed": 9}})
    assert status == 201 and "status" not in created, "status is written through its subresource only"

    first, second = kube.start_job_pod("default", "eval-50"), kube.start_job_pod("default", "eval-50")
    assert first["metadata"]["name"].startswith("eval-50-") and first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["labels"] == {"grpo.dev/run": "cpu-smollm2", JOB_NAME_LABEL: "eval-50",
                                           "batch.kubernetes.io/controller-uid": created["metadata"]["uid"]}
    assert first["metadata"]["ownerReferences"][0] | {"controller": None, "blockOwnerDeletion": None} == {
        "apiVersion": "batch/v1", "kind": "Job", "name": "eval-50", "uid": created["metadata"]["uid"],
        "controller": None, "blockOwnerDeletion": None,
    }
    assert first["spec"] == template["spec"] and first["status"]["phase"] == "Pending"
    kube.set_pod_status("default", first["metadata"]["name"], "Failed", containers={"eval": terminated(2)})

    failed = kube.set_job_status("default", "eval-50", job_finished("Failed", "PodFailurePolicy", "exit code 2"))
    assert [(c["type"], c["reason"]) for c in failed["status"]["conditions"]] == [
        ("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy")]
    assert failed["spec"] == created["spec"]
    status, listed = await call(kube, "GET", resource_path(JOBS, "default") + "?labelSelector=grpo.dev%2Frun%3Dcpu-smollm2")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["eval-50"]
    with pytest.raises(ValueError, match="Complete or Failed"):
        job_finished("Succeeded")

    kube.delete_object(GRPORUNS, "default", "cpu-smollm2")
    assert kube.read_object(JOBS, "default", "eval-50") is None
    assert all(kube.read_object(PODS, "default", p["metadata"]["name"]) is None for p in (first, second)), \
        "the run's Jobs go with it, and their pods with them"


# ------------------------------------------------------------------------------ kopf end to end


@pytest.mark.asyncio
async def test_kopf_runs_an_operator_end_to_end(kube: KubeEmulator):
    url = str(kube.url)
    registry = kopf.OperatorRegistry()
    calls: collections.Counter[str] = collections.Counter()
    on = dict(group=GRPORUNS.group, version=GRPORUNS.version, plural=GRPORUNS.plural, registry=registry)

    # Two create handlers: kopf runs one per cycle and stores its progress in between.
    @kopf.on.create(**on, id="create_config")
    async def create_config(name: str, namespace: str, **_: Any) -> dict[str, str]:
        calls["create_config"] += 1
        config = {"metadata": {"name": f"{name}-config"}, "data": {"run": name}}
        kopf.adopt(config)
        async with aiohttp.ClientSession(url) as session:
            async with session.post(resource_path(CONFIGMAPS, namespace), json=config) as response:
                response.raise_for_status()
        return {"configMap": config["metadata"]["name"]}

    @kopf.on.create(**on, id="report_started")
    async def report_started(patch: kopf.Patch, **_: Any) -> None:
        calls["report_started"] += 1
        patch.status["phase"] = "Started"

    @kopf.on.delete(**on, id="say_goodbye")
    async def say_goodbye(**_: Any) -> None:
        calls["say_goodbye"] += 1

    settings = fast_settings()
    # Had a patched resourceVersion not come back through the watch, kopf would wait this long.
    settings.persistence.consistency_timeout = 60

    def handled() -> dict[str, Any] | None:
        # kopf's last patch goes in two calls: the object's (annotations), then its status.
        run = kube.read_object(GRPORUNS, "default", "cpu-smollm2")
        annotated = "grpo.dev/last-handled-configuration" in run["metadata"].get("annotations", {})
        return run if annotated and run.get("status", {}).get("phase") == "Started" else None

    async with running_operator(url, registry, namespaces=["default"], settings=settings):
        kube.create_object(GRPORUNS, RUN, "default")
        run = await eventually(handled, timeout=30)
        assert kube.read_object(CONFIGMAPS, "default", "cpu-smollm2-config")["data"] == {"run": "cpu-smollm2"}
        kube.delete_object(GRPORUNS, "default", "cpu-smollm2")
        await eventually(lambda: kube.read_object(GRPORUNS, "default", "cpu-smollm2") is None, timeout=30)

    assert calls == {"create_config": 1, "report_started": 1, "say_goodbye": 1}
    assert run["status"] == {"phase": "Started", "create_config": {"configMap": "cpu-smollm2-config"}}
    assert run["metadata"]["finalizers"] == [settings.persistence.finalizer]
    history = [v for v in kube.objects[GRPORUNS, "default", "cpu-smollm2"].history if v is not None]
    progress = [v for v in history if "grpo.dev/create_config" in v["metadata"].get("annotations", {})]
    assert progress, "kopf stored create_config's progress before running report_started"
    assert "grpo.dev/create_config" not in run["metadata"]["annotations"], "and purged it when all were done"
    assert kube.read_object(CONFIGMAPS, "default", "cpu-smollm2-config") is None, "garbage-collected with its run"
    assert kube.api_calls()[ApiCall("patch", "grporuns/status")] >= 1

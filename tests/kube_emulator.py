"""A Kubernetes API server in the test process, for running the operator end to end.

kmock serves Kubernetes' discovery and routes each request to a handler; this module adds the parts
of the API server that kopf and the operator rely on and kmock's own KubernetesEmulator leaves out:

- one cluster-wide resourceVersion, bumped by every write and carried by watch events, so kopf's
  consistency checks pass and a watch resumes from the version it last saw;
- uid, creationTimestamp and generation (bumped only when more than metadata and status changes);
- the status subresource of GRPORuns and pods: writes to the object ignore .status, writes to
  /status change nothing but .status; merge patches and JSON patches (with kopf's `test` of the
  resourceVersion), and PUT with its resourceVersion precondition;
- label selectors on list and watch; a list's limit (its first page only: no continue);
- finalizers and owner-reference garbage collection (background and foreground cascades);
- faults for the next N matching calls, and a count of calls per verb and resource;
- an authorizer, when a test sets one (``kube.authorize``; tests/rbac.py decides as RBAC does):
  the calls it refuses are answered 403 Forbidden and kept in ``kube.denials``.

The garbage collector runs inside the request that makes garbage, so tests never wait for it.
Pods are deleted at once (no grace period) and nothing schedules or runs them: a test plays the
kubelet with ``set_pod_status``, and the Job controller with ``start_job_pod`` (a pod from a
batch/v1 Job's template, owned by the Job) and ``set_job_status`` (e.g. ``job_finished("Failed",
"DeadlineExceeded")``). Objects live in kmock's ObjectsArray, with every version kept:
``kube.objects[GRPORUNS, "default", "run"].history``.

Use the ``kube`` fixture (``pytest_plugins = ["kube_emulator"]``) and ``running_operator``::

    async with running_operator(str(kube.url), registry, namespaces=["default"]):
        kube.create_object(GRPORUNS, manifest)
        await eventually(lambda: kube.read_object(PODS, "default", "run-0"))
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import copy
import dataclasses
import datetime
import functools
import re
import secrets
import string
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest_asyncio
import yaml

if TYPE_CHECKING:
    import kopf

CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "grporun.yaml"

NAMESPACES = kmock.resource("", "v1", "namespaces")
EVENTS = kmock.resource("", "v1", "events")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
SERVICEACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
PODS = kmock.resource("", "v1", "pods")
JOBS = kmock.resource("batch", "v1", "jobs")
ROLES = kmock.resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = kmock.resource("rbac.authorization.k8s.io", "v1", "rolebindings")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
BUILTINS = (NAMESPACES, EVENTS, CONFIGMAPS, SERVICEACCOUNTS, PODS, JOBS, ROLES, ROLEBINDINGS, CRDS)
"""What the operator creates or kopf reads; a CRD created in CRDS adds its resource to these."""

VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
FOREGROUND = "foregroundDeletion"
"""The finalizer that holds an owner deleted in the foreground until its dependents are gone."""

# Kubernetes' StatusReason where it is not the HTTP phrase without spaces.
_REASONS = {409: "Conflict", 410: "Expired", 422: "Invalid", 500: "InternalError", 504: "Timeout"}


def api_error(code: int, message: str, reason: str | None = None, **details: Any) -> kmock.KubernetesError:
    """The Status an API server answers a failed request with (kmock renders the body)."""
    reason = reason or _REASONS.get(code) or HTTPStatus(code).phrase.replace(" ", "").replace("-", "")
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"causes": []})


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else resource.version


def resource_path(resource: kmock.resource, namespace: str | None = None, *name_and_subresource: str) -> str:
    """The URL path of a resource's collection, or of one object (and its subresource)."""
    root = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return "/".join([f"{root}{scope}/{resource.plural}", *name_and_subresource])


# ------------------------------------------------------------------------------ resources


@functools.cache
def grporun_crd() -> dict[str, Any]:
    """crds/grporun.yaml, as `kubectl apply` would send it."""
    return yaml.load(CRD_FILE.read_text(), Loader=yaml.CSafeLoader)


def crd_resource(crd: Mapping[str, Any]) -> tuple[kmock.resource, kmock.ResourceInfo]:
    """The resource a CustomResourceDefinition serves (its storage version) and its discovery entry."""
    spec = crd["spec"]
    names = spec["names"]
    version = next(version for version in spec["versions"] if version.get("storage"))
    resource = kmock.resource(spec["group"], version["name"], names["plural"])
    info = kmock.ResourceInfo(
        namespaced=spec["scope"] == "Namespaced",
        kind=names["kind"],
        singular=names.get("singular", names["kind"].lower()),
        shortnames=names.get("shortNames", []),
        categories=names.get("categories", []),
        verbs=VERBS,
        subresources=set(version.get("subresources", {})) & {"status"},
    )
    return resource, info


GRPORUNS, _ = crd_resource(grporun_crd())


@functools.cache
def _builtin_discovery() -> kmock.ResourcesArray:
    # kmock bundles the discovery documents of a K3s cluster: kinds, verbs, scopes as a cluster says.
    resources = kmock.ResourcesArray()
    with warnings.catch_warnings():  # kmock reads the file with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        resources.load_bundled()
    return resources


def builtin_info(resource: kmock.resource) -> kmock.ResourceInfo:
    """A builtin's discovery entry, listing only the subresource served here (status)."""
    info = copy.deepcopy(_builtin_discovery()[resource])
    info.subresources = info.subresources & {"status"}
    return info


# ------------------------------------------------------------------------------ pure object logic


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, null removes a key, anything else
    (lists included) replaces the target."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 JSON patch; a failed `test` (kopf's resourceVersion check) or a bad path is a 422."""
    try:
        return jsonpatch.apply_patch(target, operations)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise api_error(422, f"the JSON patch was not applied: {error}") from None


_PATCHES: dict[str, Callable[[dict[str, Any], Any], Any]] = {
    "application/merge-patch+json": merge_patch,
    "application/json-patch+json": json_patch,
}
"""What kopf sends (it merge-patches, and JSON-patches finalizers with a resourceVersion test)."""

# Fields only the API server writes: whatever a client sends for them is ignored.
_SYSTEM_METADATA = (
    "name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
    "deletionTimestamp", "deletionGracePeriodSeconds",
)
# Omitted when empty, as the API server's omitempty does.
_OMITTED_WHEN_EMPTY = ("labels", "annotations", "finalizers", "ownerReferences")


def with_status_of(body: dict[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    """`body` with the status of `source` (none if it has none); it shares both's parts."""
    result = {key: value for key, value in body.items() if key != "status"}
    if "status" in source:
        result["status"] = source["status"]
    return result


def settle_metadata(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` with the server-owned metadata of `old` and without empty lists and maps."""
    metadata = dict(new.get("metadata") or {})
    for key in _SYSTEM_METADATA:
        metadata.pop(key, None)
        if key in old["metadata"]:
            metadata[key] = old["metadata"][key]
    return {**new, "metadata": omit_empty(metadata), "apiVersion": old["apiVersion"], "kind": old["kind"]}


def omit_empty(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata without empty lists and maps, as the API server stores it (kopf expects this)."""
    return {key: value for key, value in metadata.items() if value or key not in _OMITTED_WHEN_EMPTY}


def content(body: Mapping[str, Any], status_is_subresource: bool) -> dict[str, Any]:
    """What a change of bumps the generation: all but metadata (and status, where it is separate)."""
    skipped = {"metadata", "status"} if status_is_subresource else {"metadata"}
    return {key: value for key, value in body.items() if key not in skipped}


Requirement = Callable[[Mapping[str, str]], bool]


def _label_requirement(text: str) -> tuple[Requirement, tuple[str, str] | None]:
    """The requirement, and the label it requires an object to carry if it is an equality."""
    key = r"(?P<key>[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?)"
    value = r"[-A-Za-z0-9_.]*"
    if match := re.fullmatch(rf"(?P<negated>!)?\s*{key}", text):
        exists = match["negated"] is None
        return (lambda labels: (match["key"] in labels) == exists), None
    if match := re.fullmatch(rf"{key}\s*(?P<op>==|=|!=)\s*(?P<value>{value})", text):
        equal = match["op"] != "!="
        return (lambda labels: (labels.get(match["key"]) == match["value"]) == equal), (
            (match["key"], match["value"]) if equal else None
        )
    if match := re.fullmatch(rf"{key}\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)", text):
        values = {item.strip() for item in match["values"].split(",")}
        inside = match["op"] == "in"
        return (lambda labels: (labels.get(match["key"], None) in values) == inside), None
    raise api_error(400, f"labelSelector: unable to parse requirement {text!r}")


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector: called with an object's labels, whether it selects them."""

    requirements: tuple[Requirement, ...]
    carried: frozenset[tuple[str, str]]
    """The labels (key, value) its equality requirements name: every object it selects carries
    them all, so an index by label finds its candidates."""

    def __call__(self, labels: Mapping[str, str]) -> bool:
        return all(requirement(labels) for requirement in self.requirements)


def label_selector(text: str) -> LabelSelector:
    """Kubernetes' label selector syntax: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.

    As in Kubernetes, `!=` and `notin` also match objects without the label."""
    parts = [part.strip() for part in re.split(r",(?![^()]*\))", text)] if text.strip() else []
    parsed = [_label_requirement(part) for part in parts]
    return LabelSelector(tuple(requirement for requirement, _ in parsed), frozenset(label for _, label in parsed if label))


def labels_of(body: Mapping[str, Any]) -> Mapping[str, str]:
    return body.get("metadata", {}).get("labels") or {}


# ------------------------------------------------------------------------------ the kubelet's side


def running() -> dict[str, Any]:
    """A container state: running since now."""
    return {"running": {"startedAt": now()}}


def waiting(reason: str, message: str | None = None) -> dict[str, Any]:
    """A container state: not started, e.g. waiting("ImagePullBackOff", "...")."""
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


def terminated(exit_code: int, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    """A container state: exited, e.g. terminated(137, "OOMKilled")."""
    state = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": now(),
        "finishedAt": now(),
    }
    if message:
        state["message"] = message
    return {"terminated": state}


_DEFAULT_STATES: dict[str, Callable[[], dict[str, Any]]] = {
    "Pending": lambda: waiting("ContainerCreating"),
    "Running": running,
    "Succeeded": lambda: terminated(0),
    "Failed": lambda: terminated(1),
}


def pod_status(
    pod: Mapping[str, Any],
    phase: str,
    containers: Mapping[str, Mapping[str, Any]] | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """The status a kubelet reports: `phase`, and for each container of the pod's spec the state
    given in `containers` (by container name) or the usual one for the phase."""
    if phase not in _DEFAULT_STATES:
        raise ValueError(f"phase must be one of {sorted(_DEFAULT_STATES)}, not {phase!r}")
    specs = pod.get("spec", {}).get("containers", [])
    unknown = set(containers or {}) - {spec["name"] for spec in specs}
    if unknown:
        raise ValueError(f"pod {pod['metadata']['name']} has no containers named {sorted(unknown)}")
    statuses = []
    for spec in specs:
        state = dict((containers or {}).get(spec["name"]) or _DEFAULT_STATES[phase]())
        statuses.append({
            "name": spec["name"],
            "image": spec.get("image", ""),
            "ready": "running" in state,
            "started": "running" in state,
            "restartCount": 0,
            "state": state,
        })
    status: dict[str, Any] = {"phase": phase, "containerStatuses": statuses, "startTime": now()}
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


# ------------------------------------------------------------------------------ the Job controller's side

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"


def job_pod(job: Mapping[str, Any]) -> dict[str, Any]:
    """A pod of `job` as the Job controller makes it: from the template, named after the Job with
    a random suffix, labelled with the Job's name and uid, owned by the Job."""
    metadata, template = job["metadata"], job["spec"]["template"]
    name, uid = metadata["name"], metadata["uid"]
    labels = {**(template.get("metadata") or {}).get("labels", {}), JOB_NAME_LABEL: name, JOB_UID_LABEL: uid}
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid, "controller": True, "blockOwnerDeletion": True}
    return {
        "metadata": {"generateName": f"{name}-", "labels": labels, "ownerReferences": [owner]},
        "spec": copy.deepcopy(template["spec"]),
    }


def job_finished(condition: str, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    """A Job's status as the Job controller reports its end: condition Complete, or Failed with its
    reason (BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy) and message."""
    if condition not in ("Complete", "Failed"):
        raise ValueError(f"a Job ends Complete or Failed, not {condition!r}")
    # Since Kubernetes 1.31 the controller sets SuccessCriteriaMet / FailureTarget first.
    first = "SuccessCriteriaMet" if condition == "Complete" else "FailureTarget"
    reason = reason or ("CompletionsReached" if condition == "Complete" else "BackoffLimitExceeded")
    conditions = [
        {"type": kind, "status": "True", "reason": reason, "message": message or reason, "lastTransitionTime": now()}
        for kind in (first, condition)
    ]
    counts = {"succeeded": 1} if condition == "Complete" else {"failed": 1}
    return {"conditions": conditions, "startTime": now(), "completionTime": now(), **counts}


# ------------------------------------------------------------------------------ the API server


@dataclasses.dataclass(frozen=True)
class ApiCall:
    verb: str
    """As in RBAC: get, list, watch, create, update (PUT), patch, delete."""
    resource: str
    """The plural name, with the subresource if any: "grporuns/status"."""


_ACTION_VERBS = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
}


def api_call(request: kmock.Request) -> ApiCall | None:
    """The API call a request makes; None for discovery and anything else not about a resource."""
    if request.resource is None or not request.resource.plural:
        return None
    if request.method == kmock.method.PUT and request.name:
        verb = "update"
    elif request.method == kmock.method.DELETE and not request.name:
        verb = "deletecollection"
    elif request.action in _ACTION_VERBS:
        verb = _ACTION_VERBS[request.action]
    else:
        return None
    subresource = f"/{request.subresource}" if request.subresource else ""
    return ApiCall(verb, request.resource.plural + subresource)


@dataclasses.dataclass
class Fault:
    """The next `times` matching calls are answered with HTTP `status` and change nothing."""

    times: int
    status: int
    when: Callable[[kmock.Request], bool]


@dataclasses.dataclass(frozen=True)
class _Event:
    resource_version: int
    resource: kmock.resource
    type: str
    object: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Selection:
    """What a list or watch request asks for; called with an object, whether it is one."""

    resource: kmock.resource
    namespace: str | None
    name: str | None
    labels: LabelSelector

    def __call__(self, resource: kmock.resource, obj: Mapping[str, Any]) -> bool:
        metadata = obj["metadata"]
        return (
            resource == self.resource
            and (self.namespace is None or metadata.get("namespace") == self.namespace)
            and (self.name is None or metadata["name"] == self.name)
            and self.labels(labels_of(obj))
        )


# kmock reads /api/v1/namespaces/X as namespace X's scope (and fails on /api/v1/namespaces), so it
# cannot parse requests for Namespace objects; it parses them under a stand-in plural instead.
_NAMESPACE_OBJECTS = re.compile(r"/api/v1/namespaces(?P<rest>(/[^/]+(/(status|finalize))?)?)/?")
_NAMESPACES_STAND_IN = kmock.resource("", "v1", "namespace-objects")


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesScaffold):
    """A Kubernetes API server: kmock's discovery and routing, this module's storage and rules.

    Its own methods act as kubectl, the kubelet or another controller would: their changes go
    through the same rules and watches see them, but they are not API calls (not counted, never
    failed). Run it with ``kmock.Server(emulator)``; its URL is then ``emulator.url``.
    """

    _objects: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray, init=False)
    # The latest version of every object that exists, by resource and (namespace, name), and their
    # uids: kmock's ObjectsArray keeps every version, and reading the latest from it costs tens of
    # microseconds an object, too slow to scan on each list (thousands of objects in benchmarks).
    _existing_objects: dict[kmock.resource, dict[tuple[str | None, str], dict[str, Any]]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _existing_uids: set[str] = attrs.field(factory=set, init=False)
    _labelled: dict[kmock.resource, dict[tuple[str, str], set[tuple[str | None, str]]]] = attrs.field(
        factory=dict, init=False
    )
    """The (namespace, name) of the existing objects that carry each label (key, value), by resource:
    a list that selects by label reads only those, as the API server's watch cache is indexed (a
    thousand runs' pods, each run listing its own, made a scan of every pod per list the
    emulator's largest cost)."""
    _garbage_possible: bool = attrs.field(default=False, init=False)
    """Whether a write since the last collection may have made garbage: a deletion, or an owner
    reference to no existing object. Other writes make none, so they skip the collector's scan."""
    _events: list[_Event] = attrs.field(factory=list, init=False)
    _events_grew: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)
    _shutting_down: bool = attrs.field(default=False, init=False)
    _reactions: dict[Any, Any] = attrs.field(factory=dict, init=False)
    _authorizer: Callable[[kmock.Request], str | None] | None = attrs.field(default=None, init=False)
    denials: list[tuple[ApiCall, str]] = attrs.field(factory=list, init=False)
    """The calls the authorizer refused, with why."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource in BUILTINS:
            self.resources[resource] = builtin_info(resource)
        # By action, or by method where kmock guesses no action (PUT). kmock would find these by
        # replaying every request served so far through each reaction's filters, a cost that grows
        # with each request; _handle calls them directly instead (faults: kube.fail).
        self._reactions = {
            kmock.action.LIST: self.fallback[kmock.action.LIST] << self._serve_list,
            kmock.action.WATCH: self.fallback[kmock.action.WATCH] << self._serve_watch,
            kmock.action.FETCH: self.fallback[kmock.action.FETCH] << self._serve_get,
            kmock.action.CREATE: self.fallback[kmock.action.CREATE] << self._serve_create,
            kmock.action.UPDATE: self.fallback[kmock.action.UPDATE] << self._serve_patch,
            kmock.method.PUT: self.fallback[kmock.method.PUT] << self._serve_update,
            kmock.action.DELETE: self.fallback[kmock.action.DELETE] << self._serve_delete,
        }

    @property
    def objects(self) -> kmock.ObjectsArray:
        """Every object ever stored, by (resource, namespace, name), with all its versions."""
        return self._objects

    @property
    def resource_version(self) -> int:
        """The cluster's latest resourceVersion: how many writes there have been."""
        return self._events[-1].resource_version if self._events else 0

    # -------------------------------------------------------------------------- tests' controls

    def fail(
        self,
        times: int,
        status: int,
        *,
        verb: str | None = None,
        resource: str | None = None,
        when: Callable[[kmock.Request], bool] | None = None,
    ) -> Fault:
        """Answer the next `times` API calls with this verb, on this resource ("pods",
        "grporuns/status"), and for which `when` holds, with HTTP `status` and no change."""

        def matches(request: kmock.Request) -> bool:
            call = api_call(request)
            return (
                call is not None
                and (verb is None or call.verb == verb)
                and (resource is None or call.resource == resource)
                and (when is None or when(request))
            )

        fault = Fault(times, status, matches)
        self._faults.append(fault)
        return fault

    def authorize(self, authorizer: Callable[[kmock.Request], str | None] | None) -> None:
        """From now on answer every API call for which ``authorizer`` gives a reason with 403
        Forbidden and that reason, changing nothing; None authorizes everything again."""
        self._authorizer = authorizer

    def end_watches(self) -> None:
        """End every watch now, as an API server shutting down does; the HTTP server's shutdown
        would otherwise wait for each to run out its timeoutSeconds."""
        self._shutting_down = True
        self._events_grew.set()

    def requests_since(self, index: int) -> list[kmock.Request]:
        """The requests served from the ``index``-th on, in order: what a poll for new calls reads
        (``list(kube)`` copies every request ever served)."""
        return self._requests[index:]

    def api_calls(self) -> collections.Counter[ApiCall]:
        """How many API calls were made, per verb and resource (discovery is not counted)."""
        return collections.Counter(call for request in self if (call := api_call(request)))

    # -------------------------------------------------------------------------- kubectl's side

    def read_object(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object as stored now; None if there is none."""
        stored = self._stored(resource, namespace, name)
        return None if stored is None else copy.deepcopy(stored)

    def create_object(
        self, resource: kmock.resource, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        """Store a new object as POST does; returns it as stored."""
        info = self._served(resource)
        if not isinstance(body, Mapping):
            raise api_error(400, "the request body must be an object")
        body = dict(body)  # _write copies what it stores
        metadata = {key: value for key, value in (body.get("metadata") or {}).items() if key not in _SYSTEM_METADATA}
        namespace = self._creation_namespace(info, namespace, body)
        name = (body.get("metadata") or {}).get("name") or self._generated_name(resource, namespace, metadata)
        if self._stored(resource, namespace, name) is not None:
            raise api_error(409, f'{resource.plural} "{name}" already exists', "AlreadyExists", name=name)
        metadata |= {"name": name, "uid": secrets.token_hex(16), "creationTimestamp": now(), "generation": 1}
        if namespace is not None:
            metadata["namespace"] = namespace
        body |= {"apiVersion": api_version(resource), "kind": info.kind, "metadata": omit_empty(metadata)}
        if "status" in info.subresources:
            body.pop("status", None)  # set through /status only, as on update
        if resource == PODS:
            body["status"] = {"phase": "Pending"}
        stored = self._write(resource, body, "ADDED")
        if resource == CRDS:
            served, served_info = crd_resource(stored)
            self.resources[served] = served_info
        self._collect_garbage()  # an owner that is already gone
        return copy.deepcopy(stored)

    def patch_object(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        patch: Any,
        subresource: str | None = None,
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        """Patch an object as PATCH does; returns it as stored."""
        if content_type not in _PATCHES:
            raise api_error(415, f"Content-Type {content_type!r} is not emulated; use one of {sorted(_PATCHES)}")
        apply = _PATCHES[content_type]
        return copy.deepcopy(self._update(resource, namespace, name, lambda old: apply(old, patch), subresource))

    def replace_object(
        self, resource: kmock.resource, namespace: str | None, name: str, body: Any, subresource: str | None = None
    ) -> dict[str, Any]:
        """Replace an object as PUT does, refusing with 409 if body's resourceVersion is not the
        latest; returns it as stored."""
        if not isinstance(body, Mapping):
            raise api_error(400, "the request body must be an object")
        expected = (body.get("metadata") or {}).get("resourceVersion")

        def replace(old: dict[str, Any]) -> Any:
            if expected is not None and expected != old["metadata"]["resourceVersion"]:
                message = f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been modified'
                raise api_error(409, message, name=name)
            return dict(body)

        return copy.deepcopy(self._update(resource, namespace, name, replace, subresource))

    def delete_object(
        self, resource: kmock.resource, namespace: str | None, name: str, propagation: str = "Background"
    ) -> dict[str, Any]:
        """Delete an object as DELETE does: at once, or (with finalizers) mark it deleted and keep
        it until they are removed; its dependents go then (Background) or first (Foreground)."""
        if propagation not in ("Background", "Foreground"):
            raise api_error(400, f"propagationPolicy {propagation!r} is not emulated (Background, Foreground are)")
        self._served(resource)
        obj = self._existing(resource, namespace, name)
        deleted = self._delete(resource, obj, propagation)
        self._collect_garbage()
        return copy.deepcopy(deleted)

    # -------------------------------------------------------------------------- the kubelet's side

    def set_pod_status(
        self,
        namespace: str,
        name: str,
        phase: str,
        *,
        containers: Mapping[str, Mapping[str, Any]] | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> dict[str, Any]:
        """Report a pod's status as its kubelet would (see pod_status); returns the pod."""
        pod = self._existing(PODS, namespace, name)
        status = pod_status(pod, phase, containers, reason, message)
        return copy.deepcopy(self._update(PODS, namespace, name, lambda old: {**old, "status": status}, "status"))

    # -------------------------------------------------------------------------- the Job controller's side

    def start_job_pod(self, namespace: str, job_name: str) -> dict[str, Any]:
        """Create the next pod of a Job, as the Job controller would (see job_pod); returns it."""
        return self.create_object(PODS, job_pod(self._existing(JOBS, namespace, job_name)), namespace)

    def set_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Report a Job's status as its controller would (see job_finished); returns the Job."""
        return copy.deepcopy(self._update(JOBS, namespace, name, lambda old: {**old, "status": dict(status)}, "status"))

    # -------------------------------------------------------------------------- storage

    def _served(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise api_error(404, f"the server could not find the requested resource {resource}")
        return self.resources[resource]

    def _stored(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object as stored, to read, not to change (see _write); None if there is none."""
        return self._existing_objects.get(resource, {}).get((namespace, name))

    def _existing(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any]:
        """The object as stored, to read, not to change; 404 if there is none."""
        obj = self._stored(resource, namespace, name)
        if obj is None:
            raise api_error(404, f'{resource.plural} "{name}" not found', name=name, kind=resource.plural)
        return obj

    def _creation_namespace(
        self, info: kmock.ResourceInfo, namespace: str | None, body: Mapping[str, Any]
    ) -> str | None:
        if not info.namespaced:
            return None
        in_body = (body.get("metadata") or {}).get("namespace")
        if namespace and in_body and in_body != namespace:
            raise api_error(400, f"the namespace of the object ({in_body}) does not match the request ({namespace})")
        namespace = namespace or in_body
        if not namespace:
            raise api_error(400, "a namespaced object needs a namespace, in the URL or metadata.namespace")
        if self._stored(NAMESPACES, None, namespace) is None:
            raise api_error(404, f'namespaces "{namespace}" not found', name=namespace, kind="namespaces")
        return namespace

    def _generated_name(self, resource: kmock.resource, namespace: str | None, metadata: Mapping[str, Any]) -> str:
        prefix = metadata.get("generateName")
        if not prefix:
            raise api_error(422, "metadata.name: Required value: name or generateName is required")
        alphabet = string.ascii_lowercase + string.digits
        while True:  # as the API server: 5 random characters after the prefix
            name = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
            if self._stored(resource, namespace, name) is None:
                return name

    def _live(self) -> Iterator[tuple[kmock.resource, dict[str, Any]]]:
        """Every object that exists, as stored: to read, not to change."""
        for kind in list(self._existing_objects):
            for obj in list(self._existing_objects[kind].values()):
                yield kind, obj

    def _write(self, resource: kmock.resource, obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        """The one place state changes: a new resourceVersion, a new version of the object (or its
        removal), and a watch event. What it stores is a copy, never changed in place afterwards,
        so the watch event, lists and gets share it; it returns that, to read, not to change."""
        version = self.resource_version + 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(version)
        key = (resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in self._objects:
            self._objects[key].history.append(obj)
        else:
            self._objects[key] = obj
        if event_type == "DELETED":
            self._objects[key].delete()
        self._index(resource, obj, event_type)
        self._events.append(_Event(version, resource, event_type, obj))
        self._events_grew.set()
        self._events_grew = asyncio.Event()
        return obj

    def _index(self, resource: kmock.resource, obj: dict[str, Any], event_type: str) -> None:
        metadata = obj["metadata"]
        key = (metadata.get("namespace"), metadata["name"])
        old = self._existing_objects[resource].get(key)
        old_labels = labels_of(old).items() if old is not None else set()
        new_labels = labels_of(obj).items() if event_type != "DELETED" else set()
        labelled = self._labelled.setdefault(resource, {})
        for label in old_labels - new_labels:
            labelled[label].discard(key)
            if not labelled[label]:
                del labelled[label]
        for label in new_labels - old_labels:
            labelled.setdefault(label, set()).add(key)
        if event_type == "DELETED":
            self._existing_objects[resource].pop(key, None)
            self._existing_uids.discard(metadata["uid"])
            self._garbage_possible = True
            return
        self._existing_objects[resource][key] = obj
        self._existing_uids.add(metadata["uid"])
        owners = {ref.get("uid") for ref in metadata.get("ownerReferences", [])}
        if metadata.get("deletionTimestamp") or FOREGROUND in metadata.get("finalizers", []) or owners - self._existing_uids:
            self._garbage_possible = True

    def _settle(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a changed object; one being deleted whose last finalizer went is removed instead."""
        metadata = obj["metadata"]
        gone = bool(metadata.get("deletionTimestamp")) and not metadata.get("finalizers")
        return self._write(resource, obj, "DELETED" if gone else "MODIFIED")

    def _update(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        change: Callable[[dict[str, Any]], Any],
        subresource: str | None,
    ) -> dict[str, Any]:
        info = self._served(resource)
        has_status = "status" in info.subresources
        if subresource is not None and not (subresource == "status" and has_status):
            raise api_error(404, f"{resource.plural}/{subresource} is not served")
        old = self._existing(resource, namespace, name)
        new = change(old)  # each change builds a new object and leaves old as stored
        if not isinstance(new, dict):
            raise api_error(422, f"the {resource.plural} {name} would not be an object after this change")
        if has_status:  # each endpoint changes only its own part
            new = with_status_of(old, new) if subresource == "status" else with_status_of(new, old)
        new = settle_metadata(old, new)
        if new == old:
            return old  # nothing written: no new resourceVersion, no event
        if content(new, has_status) != content(old, has_status):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        stored = self._settle(resource, new)
        self._collect_garbage()
        return stored

    def _delete(self, resource: kmock.resource, obj: dict[str, Any], propagation: str) -> dict[str, Any]:
        metadata = obj["metadata"]
        if metadata.get("deletionTimestamp"):
            return obj  # already being deleted
        finalizers = [*metadata.get("finalizers", []), *([FOREGROUND] if propagation == "Foreground" else [])]
        if not finalizers:
            return self._write(resource, obj, "DELETED")
        marked = {**metadata, "finalizers": finalizers, "deletionTimestamp": now(), "deletionGracePeriodSeconds": 0}
        return self._write(resource, {**obj, "metadata": marked}, "MODIFIED")

    def _collect_garbage(self) -> None:
        """Do what the garbage collector would, until there is nothing left to do: delete objects
        none of whose owners remains (an owner deleted in the foreground does not count), and let
        an owner deleted in the foreground go once it owns nothing."""
        if not self._garbage_possible:
            return
        while self._collect_garbage_once():
            pass
        self._garbage_possible = False

    def _collect_garbage_once(self) -> bool:
        live = list(self._live())
        by_uid = {obj["metadata"]["uid"]: obj for _, obj in live}
        owner_uids = {ref.get("uid") for _, obj in live for ref in obj["metadata"].get("ownerReferences", [])}

        def holds(owner: dict[str, Any] | None) -> bool:
            return owner is not None and FOREGROUND not in owner["metadata"].get("finalizers", [])

        for resource, obj in live:
            metadata = obj["metadata"]
            owners = [by_uid.get(ref.get("uid")) for ref in metadata.get("ownerReferences", [])]
            if owners and not metadata.get("deletionTimestamp") and not any(map(holds, owners)):
                self._delete(resource, obj, "Background")
                return True
            if FOREGROUND in metadata.get("finalizers", []) and metadata["uid"] not in owner_uids:
                finalizers = [finalizer for finalizer in metadata["finalizers"] if finalizer != FOREGROUND]
                released = {**obj, "metadata": {**metadata, "finalizers": finalizers}}
                self._settle(resource, settle_metadata(obj, released))
                return True
        return False

    # -------------------------------------------------------------------------- HTTP

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if match := _NAMESPACE_OBJECTS.fullmatch(raw_request.path):
            stand_in = f"{resource_path(_NAMESPACES_STAND_IN)}{match['rest']}?{raw_request.query_string}"
            raw_request = raw_request.clone(rel_url=stand_in)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource == _NAMESPACES_STAND_IN:
            request = attrs.evolve(request, resource=NAMESPACES)
            self._requests[request.id] = request  # the log of requests tells the truth too
        call = api_call(request)
        if call is not None and self._authorizer is not None and (reason := self._authorizer(request)):
            self.denials.append((call, reason))
            return await self._render_error(api_error(403, reason))
        for fault in self._faults:
            if fault.times > 0 and fault.when(request):
                fault.times -= 1
                error = api_error(fault.status, f"injected by the test: HTTP {fault.status}")
                return await self._render_error(error)
        reaction = self._reactions.get(request.action or request.method) if call else None
        if reaction is not None:
            return await reaction(request)
        return await super()._handle(request)  # discovery, and what is not served: 404

    @staticmethod
    def _selected(request: kmock.Request) -> _Selection:
        if "fieldSelector" in request.params:
            raise api_error(400, "fieldSelector is not emulated; use labelSelector")
        selector = label_selector(request.params.get("labelSelector", ""))
        return _Selection(request.resource, request.namespace, request.name, selector)

    def _listed(self, request: kmock.Request) -> list[dict[str, Any]]:
        """The existing objects a list request asks for (and a watch from no version starts with),
        as stored, in the order of their namespace and name, as the API server lists them."""
        selected = self._selected(request)
        stored = self._existing_objects.get(request.resource, {})
        if selected.labels.carried:  # only the objects that carry each of these labels can be selected
            labelled = self._labelled.get(request.resource, {})
            keys = set.intersection(*(labelled.get(label, set()) for label in selected.labels.carried))
        else:
            keys = stored.keys()
        return [stored[key] for key in sorted(keys) if selected(request.resource, stored[key])]

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        info = self._served(request.resource)
        if "continue" in request.params:
            raise api_error(400, "continue is not emulated: list without limit")
        items = self._listed(request)
        metadata: dict[str, Any] = {"resourceVersion": str(self.resource_version)}
        limit = int(request.params.get("limit") or 0)
        if 0 < limit < len(items):  # the first page: the rest would come with the continue token
            items, metadata["continue"], metadata["remainingItemCount"] = items[:limit], "emulated", len(items) - limit
        return {"apiVersion": api_version(request.resource), "kind": f"{info.kind}List", "metadata": metadata, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        self._served(request.resource)
        selected = self._selected(request)
        since = request.params.get("resourceVersion", "")
        if not since.isdigit() and since:
            raise api_error(400, f"resourceVersion must be a number, not {since!r}")
        timeout = request.params.get("timeoutSeconds")
        deadline = None if timeout is None else asyncio.get_running_loop().time() + float(timeout)
        yield b""  # send the headers now: a watch with nothing to tell yet is still a watch
        seen = int(since or 0)
        if seen == 0:  # no version: the present state first, as ADDED events
            seen = self.resource_version
            for obj in self._listed(request):
                yield {"type": "ADDED", "object": obj}
        while not self._shutting_down:
            grew = self._events_grew
            start = bisect.bisect_right(self._events, seen, key=lambda event: event.resource_version)
            for event in self._events[start:]:
                seen = event.resource_version
                if selected(event.resource, event.object):
                    yield {"type": event.type, "object": event.object}
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(grew.wait(), remaining)
            except TimeoutError:
                return  # timeoutSeconds is up: the client reconnects from the version it last saw

    async def _serve_get(self, request: kmock.Request) -> dict[str, Any]:
        self._served(request.resource)
        if request.subresource not in (None, "status"):
            raise api_error(404, f"{request.resource.plural}/{request.subresource} is not served")
        return self._existing(request.resource, request.namespace, request.name)

    async def _serve_create(self, request: kmock.Request) -> kmock.Response:
        created = self.create_object(request.resource, request.data, request.namespace)
        return kmock.Response(status=201, payload=created)

    async def _serve_patch(self, request: kmock.Request) -> dict[str, Any]:
        headers = {key.lower(): value for key, value in request.headers.items()}
        content_type = headers.get("content-type", "").split(";")[0].strip()
        return self.patch_object(
            request.resource, request.namespace, request.name, request.data, request.subresource, content_type
        )

    async def _serve_update(self, request: kmock.Request) -> dict[str, Any]:
        if request.resource is None or not request.name:
            raise kmock.KubernetesEndpointNotFoundError()
        return self.replace_object(request.resource, request.namespace, request.name, request.data, request.subresource)

    async def _serve_delete(self, request: kmock.Request) -> dict[str, Any]:
        options = request.data if isinstance(request.data, dict) else {}
        propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
        return self.delete_object(request.resource, request.namespace, request.name, propagation)


# ------------------------------------------------------------------------------ kopf
# kopf is imported where it is used: importing it takes 0.3 s (it loads the kubernetes client), and
# this plugin is loaded by every test run.


def fast_settings() -> kopf.OperatorSettings:
    """kopf's settings for tests: the operator's persistence (annotations under grpo.dev), and
    timings in tenths of a second where kopf's defaults are seconds to minutes."""
    import kopf

    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="grpo.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="grpo.dev", key="last-handled-configuration"
    )
    settings.watching.server_timeout = 5  # the emulator ends watches then; kopf resumes them
    settings.watching.client_timeout = 10
    settings.watching.reconnect_backoff = 0.05
    settings.networking.error_backoffs = [0.05, 0.1, 0.2]
    settings.networking.request_timeout = 10
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.execution.default_backoff = 0.2
    settings.process.ultimate_exiting_timeout = None  # never SIGKILL the test process
    return settings


@contextlib.asynccontextmanager
async def running_operator(
    url: str,
    registry: kopf.OperatorRegistry,
    *,
    namespaces: Collection[str] = (),
    settings: kopf.OperatorSettings | None = None,
    memo: object | None = None,
) -> AsyncIterator[None]:
    """Run kopf with the handlers in `registry` against the API at `url` (cluster-wide unless
    `namespaces` are given) until the block exits; an error of the operator is raised on exit.
    `memo` is the operator's memo, as kopf.run(memo=...) takes it: what the handlers are given.

    kopf runs in a thread with its own event loop, so that its shutdown, which cancels every task
    started after it, leaves the emulator's alone. While it runs, the test must await (not block)
    so the emulator can answer."""
    import kopf

    # kopf has no public name for its credentials vault; a filled one spares the registry a login handler.
    from kopf._cogs.structs.credentials import Vault

    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:
        vault = Vault({"kube-emulator": kopf.ConnectionInfo(server=url, insecure=True)})
        asyncio.run(kopf.operator(
            registry=registry,
            settings=settings or fast_settings(),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            vault=vault,
            memo=memo,
            stop_flag=stop,
            ready_flag=ready,
        ))

    operator = asyncio.create_task(asyncio.to_thread(serve))
    try:
        while not ready.is_set():
            if operator.done():
                await operator
                raise RuntimeError("kopf stopped before it was ready")
            await asyncio.sleep(0.01)
        yield
    finally:
        stop.set()
        await operator


T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.02) -> T:
    """The first truthy result of `check`, polled every `interval` seconds for up to `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s: {getattr(check, '__name__', check)}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def emulated_cluster() -> AsyncIterator[KubeEmulator]:
    """An empty cluster on a free localhost port (``kube.url``): namespace default and the GRPORun
    CRD. Fails on exit if the emulator itself broke (an error that is not an API answer)."""
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        emulator.create_object(NAMESPACES, {"metadata": {"name": "default"}})
        emulator.create_object(CRDS, grporun_crd())
        yield emulator
        emulator.end_watches()
        broken = [error for error in emulator.errors if not isinstance(error, kmock.KubernetesError)]
        assert not broken, f"the emulator failed: {broken!r}"


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """A cluster of its own for the test: see emulated_cluster."""
    async with emulated_cluster() as emulator:
        yield emulator

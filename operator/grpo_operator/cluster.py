"""The operator's calls to the Kubernetes API, through the official client.

Objects go in and come out as plain dicts, as :mod:`grpo_operator.manifests` builds them and
:mod:`grpo_operator.state` reads them; the client's typed models are skipped
(``_preload_content=False``). The client is synchronous: the reconcile that makes these calls runs
in a worker thread, off kopf's event loop.

Every write carries the operator's field manager; the trainer patches its run's status under its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import kubernetes
import kubernetes.watch

from grpo_operator.manifests import run_labels
from grpo_trainer.spec import API_GROUP, API_VERSION, PLURAL

FIELD_MANAGER = "grpo-operator"
USER_AGENT = "grpo-operator"  # kopf's own calls say kopf/<version>
MERGE_PATCH = "application/merge-patch+json"

ApiException = kubernetes.client.ApiException


class Cluster:
    """The API calls of the reconcile: read a run, its evaluation Jobs and its pods, create what it
    owns, patch its status."""

    def __init__(self, client: kubernetes.client.ApiClient):
        client.user_agent = USER_AGENT
        core = kubernetes.client.CoreV1Api(client)
        rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        batch = kubernetes.client.BatchV1Api(client)
        self._core = core
        self._batch = batch
        self._runs = kubernetes.client.CustomObjectsApi(client)
        self._create: dict[str, Callable[..., Any]] = {
            "ConfigMap": core.create_namespaced_config_map,
            "ServiceAccount": core.create_namespaced_service_account,
            "Role": rbac.create_namespaced_role,
            "RoleBinding": rbac.create_namespaced_role_binding,
            "Pod": core.create_namespaced_pod,
            "Job": batch.create_namespaced_job,
        }
        self._patch: dict[str, Callable[..., Any]] = {
            "ConfigMap": core.patch_namespaced_config_map,
            "ServiceAccount": core.patch_namespaced_service_account,
            "Role": rbac.patch_namespaced_role,
            "RoleBinding": rbac.patch_namespaced_role_binding,
        }

    @classmethod
    def connect(cls) -> Cluster:
        """Log in as kopf's own login does: with the pod's service account inside a cluster, else
        with the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        """Close the client's connections."""
        self._core.api_client.close()

    def read_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The GRPORun as stored now; None if it is gone."""
        try:
            return cast(dict[str, Any], self._runs.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def runs_version(self, namespace: str | None) -> str:
        """The resourceVersion of the runs in the namespace (None: every namespace) as of now: a
        watch from it tells only what changes from now on. Lists one run at most."""
        if namespace is None:
            response = self._runs.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL, limit=1, _preload_content=False)
        else:
            response = self._runs.list_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, limit=1, _preload_content=False
            )
        return _json(response)["metadata"]["resourceVersion"]

    def watch_runs(self, namespace: str | None, version: str, timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """The runs' watch events (type, run) after ``version``, until the API server ends the watch
        (``timeout_seconds`` at most). An expired version raises ApiException 410."""
        if namespace is None:
            listing, args = self._runs.list_cluster_custom_object, (API_GROUP, API_VERSION, PLURAL)
        else:
            listing, args = self._runs.list_namespaced_custom_object, (API_GROUP, API_VERSION, namespace, PLURAL)
        stream = kubernetes.watch.Watch().stream(
            listing, *args, resource_version=version, timeout_seconds=timeout_seconds,
            _request_timeout=timeout_seconds + 30,  # a connection that went silent ends too
        )
        for event in cast(Iterator[dict[str, Any]], stream):  # a watch's are dicts (a log's would be lines)
            yield event["type"], event["raw_object"]

    def list_pods(self, run: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The pods with the run's labels: its own, its evaluation Jobs', and any that a deleted run
        of the same name left for the garbage collector (state.owned tells them apart)."""
        metadata = run["metadata"]
        response = self._core.list_namespaced_pod(metadata["namespace"], label_selector=_selector(run), _preload_content=False)
        return _items(response)

    def list_jobs(self, run: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The Jobs with the run's labels: its evaluation Jobs, and any that a deleted run of the
        same name left."""
        metadata = run["metadata"]
        response = self._batch.list_namespaced_job(metadata["namespace"], label_selector=_selector(run), _preload_content=False)
        return _items(response)

    def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create an object; False if one of its name exists already."""
        try:
            self._create[manifest["kind"]](
                manifest["metadata"]["namespace"], manifest, field_manager=FIELD_MANAGER, _preload_content=False
            )
        except ApiException as error:
            if error.status == 409:  # AlreadyExists
                return False
            raise
        return True

    def apply(self, manifest: Mapping[str, Any]) -> None:
        """Create an object, or make an existing one of its name what the manifest says. A merge
        patch replaces lists whole, so its owner references become the manifest's: it is adopted."""
        if not self.create(manifest):
            metadata = manifest["metadata"]
            self._patch[manifest["kind"]](
                metadata["name"], metadata["namespace"], manifest,
                field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH, _preload_content=False,
            )

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch the run's status subresource: the fields given change, null removes one,
        the rest (the trainer's) stay."""
        try:
            self._runs.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status},
                field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH,
            )
        except ApiException as error:
            if error.status != 404:  # a deleted run has no status to keep
                raise

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod with its grace period: the kubelet sends SIGTERM, the trainer checkpoints."""
        self._delete(self._core.delete_namespaced_pod, name, namespace, _preload_content=False)

    def delete_run(self, namespace: str, name: str) -> None:
        """Delete the run; the garbage collector deletes what it owns."""
        self._delete(self._runs.delete_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name)

    @staticmethod
    def _delete(delete: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            delete(*args, **kwargs)
        except ApiException as error:
            if error.status != 404:  # already gone
                raise


def describe(error: Exception) -> str:
    """An API call's error in a line: the client's own text spans its response's headers and body."""
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return str(error)


def _selector(run: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in run_labels(run["metadata"]["name"]).items())


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a list made with _preload_content=False."""
    return _json(response)["items"]


def _json(response: Any) -> dict[str, Any]:
    """The body of a call made with _preload_content=False: urllib3's response, read as JSON without
    building the client's models (the client's annotations name the models, not this)."""
    return json.loads(response.data)

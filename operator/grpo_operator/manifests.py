"""The Kubernetes objects of a GRPORun, as pure functions of the validated run.

One run owns a ConfigMap (its manifest, which the trainer reads), the RBAC that lets the trainer
report status, and one pod per attempt: the trainer container under torchrun on ``trainerGpus``
GPUs and a vLLM server on the other ``vllmGpus``, as a native sidecar. Every builder returns a plain
JSON-able dict with an owner reference to the run, so deleting the run deletes them all; nothing
here talks to a cluster, so tests render and check them without one.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import yaml

from grpo_trainer import vllm_server
from grpo_trainer.spec import API_GROUP, API_VERSION, KIND, PLURAL, GRPORun

APP_LABEL = {"app.kubernetes.io/name": "grpo-operator"}
RUN_LABEL = f"{API_GROUP}/run"
ATTEMPT_LABEL = f"{API_GROUP}/attempt"

CONFIG_DIR = "/etc/grpo"
CONFIG_KEY = "run.yaml"
HOME = "/home/grpo"  # HOME of both containers: an emptyDir, as their root filesystems are read-only
USER_ID = 1000

VLLM_PORT = vllm_server.DEFAULT_PORT
VLLM_URL = f"http://{vllm_server.HOST}:{VLLM_PORT}"
VLLM_HEALTH_URL = f"{VLLM_URL}/health"
VLLM_STARTUP_SECONDS = 600  # downloading and loading a 1.5B model, compiling CUDA graphs

# On SIGTERM the trainer checkpoints and exits within spec.checkpoints.preemptionGraceSeconds (its
# own watchdog ends it then). torchrun, which passed the signal on, waits a little longer before it
# kills a worker, and the kubelet longer still before it kills the pod, so the trainer's bound is the
# one that acts and torchrun has time to exit after its workers.
LAUNCHER_MARGIN_SECONDS = 5
POD_MARGIN_SECONDS = 15


class RunResources(NamedTuple):
    """Names of the objects a run owns besides its pods; handlers look them up by these."""

    config_map: str
    service_account: str
    role: str
    role_binding: str


def resource_names(run_name: str) -> RunResources:
    trainer = f"{run_name}-trainer"
    return RunResources(config_map=f"{run_name}-config", service_account=trainer, role=trainer, role_binding=trainer)


def pod_name(run_name: str, attempt: int) -> str:
    """``<run>-<attempt>``, or for a name too long for that a prefix of it and a hash of the whole,
    so the name stays a DNS label (at most 63 characters) and two long runs never share a pod."""
    if attempt < 0:
        raise ValueError(f"attempt must be at least 0, got {attempt}")
    name = f"{run_name}-{attempt}"
    if len(name) <= 63:
        return name
    suffix = f"-{hashlib.sha256(run_name.encode()).hexdigest()[:8]}-{attempt}"
    return run_name[: 63 - len(suffix)] + suffix


def run_labels(run_name: str) -> dict[str, str]:
    return {**APP_LABEL, RUN_LABEL: run_name}


def owner_reference(run: GRPORun) -> dict[str, Any]:
    """The reference that makes the run own an object; the run must come from the API server (it needs a uid)."""
    uid = (run.metadata.model_extra or {}).get("uid")
    if not uid:
        raise ValueError(
            f"GRPORun {run.metadata.name!r} has no metadata.uid: "
            "build manifests from the object the API server returned"
        )
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": run.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(run: GRPORun, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": labels or run_labels(run.metadata.name),
        "ownerReferences": [owner_reference(run)],
    }
    if run.metadata.namespace:
        metadata["namespace"] = run.metadata.namespace
    return metadata


# ------------------------------------------------------------------------------ config and RBAC


def config_map(run: GRPORun) -> dict[str, Any]:
    """The run's manifest as the trainer and the vLLM sidecar read it (``grpo train
    /etc/grpo/run.yaml``): the validated spec with its defaults, and no server-side metadata or
    status. The pod always has the sidecar, so its trainer samples from it (spec.rollout.backend
    server) whatever the manifest says for runs outside a pod."""
    manifest = run.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={"api_version": True, "kind": True, "metadata": {"name", "namespace"}, "spec": True},
    )
    manifest["spec"]["rollout"]["backend"] = "server"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, resource_names(run.metadata.name).config_map),
        "data": {CONFIG_KEY: yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)},
    }


def service_account(run: GRPORun) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(run, resource_names(run.metadata.name).service_account),
    }


def role(run: GRPORun) -> dict[str, Any]:
    """What the trainer may do: read and patch the status of its own run, and record events. Nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(run, resource_names(run.metadata.name).role),
        "rules": [
            {
                "apiGroups": [API_GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [run.metadata.name],
                "verbs": ["get", "patch"],
            },
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ],
    }


def role_binding(run: GRPORun) -> dict[str, Any]:
    names = resource_names(run.metadata.name)
    subject = {"kind": "ServiceAccount", "name": names.service_account}
    if run.metadata.namespace:
        subject["namespace"] = run.metadata.namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(run, names.role_binding),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [subject],
    }


# ---------------------------------------------------------------------------------------- pod


def trainer_command(run: GRPORun) -> list[str]:
    """torchrun rather than the ``deepspeed`` launcher: as the container's PID 1 it must pass the
    kubelet's SIGTERM on to the workers so they checkpoint, and deepspeed's single-node runner
    installs no SIGTERM handler (PID 1 then ignores the signal until SIGKILL). DeepSpeed itself joins
    the process group torchrun sets up."""
    return [
        "torchrun",
        "--standalone",
        f"--nproc-per-node={run.spec.resources.trainer_gpus}",
        f"--shutdown-timeout={run.spec.checkpoints.preemption_grace_seconds + LAUNCHER_MARGIN_SECONDS}",
        "-m",
        "grpo_trainer.cli",
        "train",
        f"{CONFIG_DIR}/{CONFIG_KEY}",
    ]


def vllm_command() -> list[str]:
    """The generation server: it reads the run's manifest, as the trainer does, and runs ``vllm
    serve`` as vllm_server.serve_command builds it, on the pod's loopback only."""
    return ["python", "-m", "grpo_trainer.vllm_server", f"{CONFIG_DIR}/{CONFIG_KEY}", f"--port={VLLM_PORT}"]


def _vllm_health_probe(failure_threshold: int) -> dict[str, Any]:
    """An exec probe: the kubelet's httpGet would dial the pod IP, where the server does not listen."""
    check = (
        "import urllib.request; "  # urlopen raises on any status other than 2xx, so the exit code says it all
        f"urllib.request.urlopen({VLLM_HEALTH_URL!r}, timeout=4)"
    )
    return {
        "exec": {"command": ["python", "-c", check]},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": failure_threshold,
    }


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def _scratch_mounts() -> list[dict[str, Any]]:
    """The writable places of both containers: /dev/shm for NCCL and the DataLoader, HOME for the
    caches (Hugging Face, torch extensions, Triton, vLLM) and /tmp. HOME is shared, so the trainer
    finds the weights the sidecar downloaded before it started."""
    return [
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "home", "mountPath": HOME},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def _gpus(count: int) -> dict[str, str]:
    return {"nvidia.com/gpu": str(count)}


def _nccl_env() -> list[dict[str, Any]]:
    """The NCCL settings of both containers, identical in each: the weights go from the trainer to
    the sidecar over NCCL, whose two ends must agree (see vllm_server.NCCL_ENVIRONMENT)."""
    return [{"name": name, "value": value} for name, value in vllm_server.NCCL_ENVIRONMENT.items()]


def _credentials_env(run: GRPORun) -> list[dict[str, Any]]:
    """The S3 credentials from spec.checkpoints.credentialsSecret: the trainer's store, and an
    s3:// model the sidecar downloads."""
    secret = run.spec.checkpoints.credentials_secret
    if not secret:
        return []
    env = []
    keys = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
    for key, optional in keys:
        reference = {"name": secret, "key": key} | ({"optional": True} if optional else {})
        env.append({"name": key, "valueFrom": {"secretKeyRef": reference}})
    return env


def _trainer_env(run: GRPORun) -> list[dict[str, Any]]:
    return [
        {"name": "GRPO_RUN_NAME", "value": run.metadata.name},
        {"name": "GRPO_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": vllm_server.SERVER_URL_VARIABLE, "value": VLLM_URL},
        {"name": "HOME", "value": HOME},
        *_nccl_env(),
        *_credentials_env(run),
    ]


def _trainer_container(run: GRPORun) -> dict[str, Any]:
    resources = run.spec.resources
    return {
        "name": "trainer",
        "image": resources.images.trainer,
        "imagePullPolicy": resources.images.pull_policy,
        "command": trainer_command(run),
        "env": _trainer_env(run),
        # No CPU limit: throttling the data and reward workers would only slow the GPUs down.
        # The device plugin picks the GPUs per container, so CUDA_VISIBLE_DEVICES is left alone.
        "resources": {
            "requests": {"cpu": resources.cpu, "memory": resources.memory, **_gpus(resources.trainer_gpus)},
            "limits": {"memory": resources.memory, **_gpus(resources.trainer_gpus)},
        },
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, *_scratch_mounts()],
        # The trainer writes its JSON outcome to /dev/termination-log; the log tail is the fallback.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # No liveness probe: the trainer serves nothing to probe, and the hang one would catch (a
        # stuck NCCL collective) already ends the process through the NCCL timeout.
        "securityContext": _container_security(),
    }


def _vllm_sidecar(run: GRPORun) -> dict[str, Any]:
    """A native sidecar (an init container that keeps running): the kubelet starts the trainer only
    once its startup probe passes, and stops it after the trainer exits."""
    resources = run.spec.resources
    return {
        "name": "vllm",
        "image": resources.images.vllm,
        "imagePullPolicy": resources.images.pull_policy,
        "restartPolicy": "Always",
        "command": vllm_command(),
        "env": [{"name": "HOME", "value": HOME}, *_nccl_env(), *_credentials_env(run)],
        "resources": {"requests": _gpus(resources.vllm_gpus), "limits": _gpus(resources.vllm_gpus)},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, *_scratch_mounts()],
        "startupProbe": _vllm_health_probe(failure_threshold=VLLM_STARTUP_SECONDS // 10),
        "readinessProbe": _vllm_health_probe(failure_threshold=3),
        # No liveness probe: a restarted server would come back with the base weights, not the
        # policy the trainer has synced into it, and sample from the wrong model.
        "securityContext": _container_security(),
    }


def termination_grace_seconds(run: GRPORun) -> int:
    return run.spec.checkpoints.preemption_grace_seconds + POD_MARGIN_SECONDS


def pod(run: GRPORun, *, attempt: int) -> dict[str, Any]:
    """The pod of one attempt at the run. The operator, not the kubelet, restarts a failed attempt
    (restartPolicy Never) so it can count restarts and back off, and it enforces the run's deadline
    across attempts, so the pod has no activeDeadlineSeconds."""
    resources = run.spec.resources
    names = resource_names(run.metadata.name)
    labels = {**run_labels(run.metadata.name), ATTEMPT_LABEL: str(attempt)}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": names.service_account,
        "automountServiceAccountToken": True,  # the trainer patches the run's status
        "terminationGracePeriodSeconds": termination_grace_seconds(run),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [_vllm_sidecar(run)],
        "containers": [_trainer_container(run)],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
            {"name": "home", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if resources.gpu_product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": resources.gpu_product}
    if resources.tolerations:
        spec["tolerations"] = [
            toleration.model_dump(mode="json", by_alias=True, exclude_none=True) for toleration in resources.tolerations
        ]
    if resources.priority_class_name:
        spec["priorityClassName"] = resources.priority_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(run, pod_name(run.metadata.name, attempt), labels),
        "spec": spec,
    }

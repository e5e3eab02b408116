"""The Kubernetes objects of a GRPORun, as pure functions of the validated run.

One run owns a ConfigMap (its manifest, which the trainer reads), the RBAC that lets the trainer
report status, one pod per attempt: the trainer container under torchrun on ``trainerGpus``
GPUs and a vLLM server on the other ``vllmGpus``, as a native sidecar, and one batch/v1 Job per
evaluated checkpoint, running ``grpo eval`` under a ServiceAccount of its own that may do nothing
in the API (the operator reads the scores from the Job pod's termination message). Every builder
returns a plain JSON-able dict with an owner reference to the run, so deleting the run deletes them
all; nothing here talks to a cluster, so tests render and check them without one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import yaml

from grpo_trainer import vllm_server
from grpo_trainer.scores import evaluation_prefix
from grpo_trainer.spec import API_GROUP, API_VERSION, DEFAULT_IMAGES, KIND, PLURAL, CheckpointRef, GRPORun
from grpo_trainer.termination import EXIT_INVALID

APP_LABEL = {"app.kubernetes.io/name": "grpo-operator"}
RUN_LABEL = f"{API_GROUP}/run"
ATTEMPT_LABEL = f"{API_GROUP}/attempt"
EVALUATION_LABEL = f"{API_GROUP}/evaluation-step"
"""On an evaluation Job and its pods: the step of the checkpoint it evaluates."""
CHECKPOINT_ANNOTATION = f"{API_GROUP}/checkpoint-uri"
"""On an evaluation Job: the URI of the checkpoint it evaluates."""

CONFIG_DIR = "/etc/grpo"
CONFIG_KEY = "run.yaml"
HOME = "/home/grpo"  # HOME of both containers: an emptyDir, as their root filesystems are read-only
USER_ID = 1000

VLLM_PORT = vllm_server.DEFAULT_PORT
VLLM_URL = f"http://{vllm_server.HOST}:{VLLM_PORT}"
VLLM_HEALTH_URL = f"{VLLM_URL}/health"
VLLM_STARTUP_SECONDS = 600  # downloading and loading a 1.5B model, compiling CUDA graphs

EVALUATION_BACKOFF_LIMIT = 2
"""Pod failures an evaluation Job retries (a lost node, an OOM); bad input (exit 2) fails it at once."""

# On SIGTERM the trainer checkpoints and exits within spec.checkpoints.preemptionGraceSeconds (its
# own watchdog ends it then). torchrun, which passed the signal on, waits a little longer before it
# kills a worker, and the kubelet longer still before it kills the pod, so the trainer's bound is the
# one that acts and torchrun has time to exit after its workers.
LAUNCHER_MARGIN_SECONDS = 5
POD_MARGIN_SECONDS = 15


IMAGE_VARIABLES = {"trainer": "GRPO_TRAINER_IMAGE", "vllm": "GRPO_VLLM_IMAGE"}
"""The operator's environment variables (the Helm chart sets them) naming the images of runs that name none."""


def default_images(environment: Mapping[str, str]) -> dict[str, str]:
    """The images of runs that name none: those the environment names, else DEFAULT_IMAGES."""
    return {image: environment.get(variable) or DEFAULT_IMAGES[image] for image, variable in IMAGE_VARIABLES.items()}


def _image(run: GRPORun, image: str, default_images: Mapping[str, str]) -> str:
    return getattr(run.spec.resources.images, image) or default_images[image]


class RunResources(NamedTuple):
    """Names of the objects a run owns besides its pods; handlers look them up by these."""

    config_map: str
    service_account: str
    role: str
    role_binding: str


def resource_names(run_name: str) -> RunResources:
    trainer = f"{run_name}-trainer"
    return RunResources(config_map=f"{run_name}-config", service_account=trainer, role=trainer, role_binding=trainer)


def evaluation_service_account_name(run_name: str) -> str:
    return f"{run_name}-eval"


def pod_name(run_name: str, attempt: int) -> str:
    """``<run>-<attempt>``, or for a name too long for that a prefix of it and a hash of the whole,
    so the name stays a DNS label (at most 63 characters) and two long runs never share a pod."""
    if attempt < 0:
        raise ValueError(f"attempt must be at least 0, got {attempt}")
    return _dns_label(run_name, str(attempt))


def job_name(run_name: str, step: int) -> str:
    """``<run>-eval-<step>``: the evaluation Job of one checkpoint, a DNS label as pod_name makes it
    (a Job's name is also the value of its pods' job-name label, at most 63 characters)."""
    if step < 0:
        raise ValueError(f"step must be at least 0, got {step}")
    return _dns_label(run_name, f"eval-{step}")


def _dns_label(run_name: str, tail: str) -> str:
    name = f"{run_name}-{tail}"
    if len(name) <= 63:
        return name
    suffix = f"-{hashlib.sha256(run_name.encode()).hexdigest()[:8]}-{tail}"
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


def _metadata(
    run: GRPORun, name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": labels or run_labels(run.metadata.name),
        **({"annotations": annotations} if annotations else {}),
        "ownerReferences": [owner_reference(run)],
    }
    if run.metadata.namespace:
        metadata["namespace"] = run.metadata.namespace
    return metadata


# ------------------------------------------------------------------------------ config and RBAC


def config_map(run: GRPORun) -> dict[str, Any]:
    """The run's manifest as the trainer and the vLLM sidecar read it (``grpo train
    /etc/grpo/run.yaml``): the validated spec with its defaults, and no server-side metadata or
    status. A GPU pod has the sidecar, so its trainer samples from it (spec.rollout.backend
    server) whatever the manifest says for runs outside a pod; a CPU pod (gpus: 0) samples in-process."""
    manifest = run.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={"api_version": True, "kind": True, "metadata": {"name", "namespace"}, "spec": True},
    )
    manifest["spec"]["rollout"]["backend"] = "in-process" if run.spec.resources.on_cpu else "server"
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


def evaluation_service_account(run: GRPORun) -> dict[str, Any]:
    """The evaluation Jobs' account: no Role binds it and no token is mounted, so a Job can do
    nothing in the API. It needs nothing there: the operator reads the scores from the pod."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(run, evaluation_service_account_name(run.metadata.name)),
        "automountServiceAccountToken": False,
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
    the process group torchrun sets up. On CPU the one trainer process is PID 1 itself and
    checkpoints on SIGTERM as ``grpo train`` does on a laptop."""
    if run.spec.resources.on_cpu:
        return ["python", "-m", "grpo_trainer.cli", "train", f"{CONFIG_DIR}/{CONFIG_KEY}"]
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
    return {"nvidia.com/gpu": str(count)} if count else {}


def _nccl_env() -> list[dict[str, Any]]:
    """The NCCL settings of both containers, identical in each: the weights go from the trainer to
    the sidecar over NCCL, whose two ends must agree (see vllm_server.NCCL_ENVIRONMENT)."""
    return [{"name": name, "value": value} for name, value in vllm_server.NCCL_ENVIRONMENT.items()]


def _trainer_env(run: GRPORun) -> list[dict[str, Any]]:
    return [
        {"name": "GRPO_RUN_NAME", "value": run.metadata.name},
        {"name": "GRPO_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # No sidecar on CPU: without a server to reach, the trainer samples in-process.
        *([] if run.spec.resources.on_cpu else [{"name": vllm_server.SERVER_URL_VARIABLE, "value": VLLM_URL}]),
        {"name": "HOME", "value": HOME},
        *_nccl_env(),
        *_s3_credentials(run),
    ]


def _s3_credentials(run: GRPORun) -> list[dict[str, Any]]:
    """The store's credentials from spec.checkpoints.credentialsSecret, as boto3 reads them."""
    secret = run.spec.checkpoints.credentials_secret
    if not secret:
        return []
    keys = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key} | ({"optional": True} if optional else {})}}
        for key, optional in keys
    ]


def _trainer_container(run: GRPORun, default_images: Mapping[str, str]) -> dict[str, Any]:
    resources = run.spec.resources
    return {
        "name": "trainer",
        "image": _image(run, "trainer", default_images),
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


def _vllm_sidecar(run: GRPORun, default_images: Mapping[str, str]) -> dict[str, Any]:
    """A native sidecar (an init container that keeps running): the kubelet starts the trainer only
    once its startup probe passes, and stops it after the trainer exits."""
    resources = run.spec.resources
    return {
        "name": "vllm",
        "image": _image(run, "vllm", default_images),
        "imagePullPolicy": resources.images.pull_policy,
        "restartPolicy": "Always",
        "command": vllm_command(),
        "env": [{"name": "HOME", "value": HOME}, *_nccl_env(), *_s3_credentials(run)],
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


def pod(run: GRPORun, *, attempt: int, default_images: Mapping[str, str] = DEFAULT_IMAGES) -> dict[str, Any]:
    """The pod of one attempt at the run. The operator, not the kubelet, restarts a failed attempt
    (restartPolicy Never) so it can count restarts and back off, and it enforces the run's deadline
    across attempts, so the pod has no activeDeadlineSeconds. Images the run leaves out are
    ``default_images``."""
    names = resource_names(run.metadata.name)
    labels = {**run_labels(run.metadata.name), ATTEMPT_LABEL: str(attempt)}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": names.service_account,
        "automountServiceAccountToken": True,  # the trainer patches the run's status
        "terminationGracePeriodSeconds": termination_grace_seconds(run),
        "securityContext": _pod_security(),
        **({} if run.spec.resources.on_cpu else {"initContainers": [_vllm_sidecar(run, default_images)]}),
        "containers": [_trainer_container(run, default_images)],
        "volumes": [{"name": "config", "configMap": {"name": names.config_map}}, *_scratch_volumes(run)],
        **_placement(run),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(run, pod_name(run.metadata.name, attempt), labels),
        "spec": spec,
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _scratch_volumes(run: GRPORun) -> list[dict[str, Any]]:
    """The emptyDirs behind _scratch_mounts."""
    return [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": run.spec.resources.shm_size}},
        {"name": "home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]


def _placement(run: GRPORun) -> dict[str, Any]:
    """Where the run's pods may go: its GPU product, tolerations and priority class."""
    resources = run.spec.resources
    placement: dict[str, Any] = {}
    if resources.gpu_product and not resources.on_cpu:
        placement["nodeSelector"] = {"nvidia.com/gpu.product": resources.gpu_product}
    if resources.tolerations:
        placement["tolerations"] = [
            toleration.model_dump(mode="json", by_alias=True, exclude_none=True) for toleration in resources.tolerations
        ]
    if resources.priority_class_name:
        placement["priorityClassName"] = resources.priority_class_name
    return placement


# -------------------------------------------------------------------------------- evaluation

_CHECKPOINT_URI = re.compile(r"(?P<root>.+)/checkpoints/step-(?P<step>\d+)/?")


def checkpoint_uri(run: GRPORun, step: int) -> str:
    """Where the trainer writes checkpoint ``step`` of the run (trainer/checkpoint.py's layout)."""
    return f"{run.spec.checkpoints.storage.rstrip('/')}/{run.metadata.name}/checkpoints/step-{step:08d}"


def evaluated_uri(run: GRPORun, checkpoint: CheckpointRef) -> str:
    """The checkpoint's URI as the trainer reported it, which holds a file:// store's path as the
    trainer resolved it; the spec's own if the report names no checkpoint of that step."""
    match = _CHECKPOINT_URI.fullmatch(checkpoint.uri)
    return checkpoint.uri if match and int(match["step"]) == checkpoint.step else checkpoint_uri(run, checkpoint.step)


def evaluation_output(run: GRPORun, checkpoint: CheckpointRef) -> str:
    """``<run root>/evaluations/step-N``, beside ``<run root>/checkpoints/step-N`` (scores.py)."""
    root = evaluated_uri(run, checkpoint).rstrip("/").rsplit("/checkpoints/", 1)[0]
    return f"{root}/{evaluation_prefix(checkpoint.step)}"


def evaluation_args(run: GRPORun, checkpoint: CheckpointRef) -> list[str]:
    """``grpo eval``'s arguments: the checkpoint (only its model/ is downloaded), the benchmarks and
    sampling of spec.evaluation, and where the full results go."""
    evaluation = run.spec.evaluation
    args = [
        "eval",
        evaluated_uri(run, checkpoint),
        "--benchmarks", ",".join(evaluation.benchmarks),
        "--samples-per-problem", str(evaluation.samples_per_problem),
        "--temperature", str(evaluation.temperature),
        "--top-p", str(evaluation.top_p),
        "--max-new-tokens", str(evaluation.max_new_tokens),
        "--output", evaluation_output(run, checkpoint),
        "--backend", "vllm",
        "--gpus", str(evaluation.gpus),
    ]
    if run.spec.checkpoints.endpoint_url:
        args += ["--endpoint-url", run.spec.checkpoints.endpoint_url]
    return args


def _evaluation_container(run: GRPORun, checkpoint: CheckpointRef, default_images: Mapping[str, str]) -> dict[str, Any]:
    resources, gpus = run.spec.resources, run.spec.evaluation.gpus
    return {
        "name": "eval",
        "image": _image(run, "vllm", default_images),  # vLLM, and this package beside it
        "imagePullPolicy": resources.images.pull_policy,
        "command": ["python", "-m", "grpo_trainer.cli", *evaluation_args(run, checkpoint)],
        "env": [{"name": "HOME", "value": HOME}, *_s3_credentials(run)],
        "resources": {"requests": _gpus(gpus), "limits": _gpus(gpus)},
        "volumeMounts": _scratch_mounts(),
        # grpo eval writes its scores as JSON to /dev/termination-log; the log tail is the fallback.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }


def evaluation_job(
    run: GRPORun, checkpoint: CheckpointRef, *, default_images: Mapping[str, str] = DEFAULT_IMAGES
) -> dict[str, Any]:
    """The Job that evaluates one checkpoint. A failed pod is retried EVALUATION_BACKOFF_LIMIT
    times, except for bad input (exit 2: a missing checkpoint, say), which fails the Job at once; a
    pod disrupted by preemption or a drain is retried without counting. The Job fails for good
    after spec.evaluation.deadlineSeconds, retries included. Its image, if the run names none, is
    ``default_images``' vllm."""
    labels = {**run_labels(run.metadata.name), EVALUATION_LABEL: str(checkpoint.step)}
    template_spec = {
        "restartPolicy": "Never",  # the Job retries a failed pod; podFailurePolicy requires Never
        "serviceAccountName": evaluation_service_account_name(run.metadata.name),
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [_evaluation_container(run, checkpoint, default_images)],
        "volumes": _scratch_volumes(run),
        **_placement(run),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            run, job_name(run.metadata.name, checkpoint.step), labels,
            {CHECKPOINT_ANNOTATION: evaluated_uri(run, checkpoint)},
        ),
        "spec": {
            "backoffLimit": EVALUATION_BACKOFF_LIMIT,
            "activeDeadlineSeconds": run.spec.evaluation.deadline_seconds,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onExitCodes": {"containerName": "eval", "operator": "In", "values": [EXIT_INVALID]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": template_spec},
        },
    }

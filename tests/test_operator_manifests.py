"""The objects a GRPORun becomes: valid for every Kubernetes version we support, and shaped as the
trainer, the vLLM sidecar and the scheduler need (checked field by field, without a cluster)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor
from packaging.version import Version

from grpo_operator import manifests
from grpo_operator.manifests import job_name, pod_name, resource_names
from grpo_trainer.cli import parser as grpo_parser
from grpo_trainer.model import ModelLocation
from grpo_trainer.spec import DEFAULT_IMAGES, DNS_LABEL_PATTERN, CheckpointRef, GRPORun
from grpo_trainer.termination import EXIT_INVALID
from grpo_trainer.validation import load_manifest, validate_manifest
from grpo_trainer.vllm_server import NCCL_ENVIRONMENT, serve_command
from grpo_trainer.vllm_server import parser as sidecar_parser

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "exp2-open-rs.yaml"
UID = "0b9f6c2e-3d4a-4f1b-9c55-7e2a1d8f6a10"
NAMESPACE = "research"
LONG_NAME = "open-rs-exp2-cosine-ablation-" + "a" * 34  # the longest name a run can have: 63
# Every minor version from 1.29 that kubernetes-validate ships schemas for.
VERSIONS = sorted({major_minor(v) for v in all_versions() if Version(v) >= Version("1.29")}, key=Version)


def make_run(name: str | None = None, **spec_edits) -> GRPORun:
    """exp2-open-rs as the API server would hand it to the operator (with a uid and namespace),
    with ``section={field: value}`` edits merged into spec.<section>."""
    manifest = load_manifest(EXAMPLE).model_dump(mode="json", by_alias=True, exclude_none=True)
    manifest["metadata"] |= {"uid": UID, "namespace": NAMESPACE} | ({"name": name} if name else {})
    for section, fields in spec_edits.items():
        manifest["spec"][section] = {key: value for key, value in {**manifest["spec"][section], **fields}.items()
                                     if value is not None}
    return validate_manifest(manifest)


VARIANTS = {
    "exp2": {},
    "no-credentials": {"checkpoints": {"storage": "file:///data/runs", "credentialsSecret": None}},
    "scheduling": {"resources": {
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300},
        ],
        "priorityClassName": "training-high",
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    }},
    "any-gpu": {"resources": {"gpuProduct": ""}},
    "8-gpus-slow-checkpoint": {"resources": {"gpus": 8, "trainerGpus": 7, "vllmGpus": 1},
                               "checkpoints": {"preemptionGraceSeconds": 300}},
    "long-name": {"name": LONG_NAME},
    "own-images": {"resources": {"images": {"trainer": "registry.local/trainer:fix", "vllm": "registry.local/vllm:fix"}}},
    "evaluation": {"evaluation": {"gpus": 2, "deadlineSeconds": 3600, "benchmarks": ["aime24", "math500"],
                                  "samplesPerProblem": 8, "selectBy": "aime24"},
                   "checkpoints": {"endpointUrl": "http://minio.storage:9000"}},
}


CPU_RUN = make_run(resources={"gpus": 0, "trainerGpus": 0, "vllmGpus": 0, "cpu": "2", "memory": "6Gi", "shmSize": "1Gi"})
"""A run on CPU (kind, minikube): not among VARIANTS, whose pods all have the vLLM sidecar."""


@functools.cache
def variant(name: str) -> GRPORun:
    return make_run(**VARIANTS[name])


@pytest.fixture(params=VARIANTS)
def run(request) -> GRPORun:
    return variant(request.param)


def checkpoint_of(run: GRPORun, step: int) -> CheckpointRef:
    """A checkpoint of the run as the trainer reports it."""
    return CheckpointRef(step=step, uri=manifests.checkpoint_uri(run, step))


def all_objects(run: GRPORun, attempt: int = 0) -> list[dict]:
    return [
        manifests.config_map(run),
        manifests.service_account(run),
        manifests.role(run),
        manifests.role_binding(run),
        manifests.pod(run, attempt=attempt),
        manifests.evaluation_service_account(run),
        manifests.evaluation_job(run, checkpoint_of(run, 500)),
    ]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def trainer_and_sidecar(pod: dict) -> tuple[dict, dict]:
    (trainer,) = pod["spec"]["containers"]
    (sidecar,) = pod["spec"]["initContainers"]
    return trainer, sidecar


def served_command(run: GRPORun) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` argv and added environment the rendered pod's sidecar execs: its command
    parsed as grpo_trainer.vllm_server parses it, reading the manifest the ConfigMap mounts where
    the command says (a hub-id model resolves to itself, as it does in the sidecar)."""
    _, sidecar = trainer_and_sidecar(manifests.pod(run, attempt=0))
    assert sidecar["command"][:3] == ["python", "-m", "grpo_trainer.vllm_server"]
    args = sidecar_parser().parse_args(sidecar["command"][3:])
    mount = next(m for m in sidecar["volumeMounts"] if args.manifest.startswith(m["mountPath"] + "/"))
    assert mount["name"] == "config" and mount["readOnly"]
    key = args.manifest.removeprefix(mount["mountPath"] + "/")
    mounted = validate_manifest(yaml.safe_load(manifests.config_map(run)["data"][key]))
    model = ModelLocation(source=mounted.spec.model.source, path=mounted.spec.model.source,
                          revision=mounted.spec.model.revision)
    command = serve_command(mounted, model, port=args.port)
    return command.argv, command.env


# ------------------------------------------------------------------------------ API validity


@pytest.mark.usefixtures("cached_schemas")
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_the_kubernetes_version(version):
    for run in [*map(variant, VARIANTS), CPU_RUN]:
        for obj in all_objects(run, attempt=12):
            kubernetes_validate.validate(obj, version, strict=True)


def test_versions_cover_1_29_to_the_newest_schema():
    assert VERSIONS[0] == "1.29" and VERSIONS[-1] == major_minor(all_versions()[-1]) and len(VERSIONS) >= 9


def test_the_validator_catches_a_malformed_job():
    job = manifests.evaluation_job(variant("exp2"), checkpoint_of(variant("exp2"), 50))
    job["spec"]["podFailurePolicy"]["rules"][0]["action"] = "Fail"
    job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicyy"] = "File"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def test_the_validator_catches_a_malformed_pod():
    """The strict schemas reject a field the API does not have, so the test above can fail."""
    pod = manifests.pod(variant("exp2"), attempt=0)
    pod["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, VERSIONS[-1], strict=True)


# ------------------------------------------------------------------------- ownership and names


def test_every_object_is_owned_by_the_run_and_labelled_with_it(run):
    for obj in all_objects(run):
        metadata = obj["metadata"]
        assert metadata["ownerReferences"] == [{
            "apiVersion": "grpo.dev/v1alpha1", "kind": "GRPORun", "name": run.metadata.name, "uid": UID,
            "controller": True, "blockOwnerDeletion": True,
        }], obj["kind"]
        assert metadata["namespace"] == NAMESPACE
        assert metadata["labels"]["app.kubernetes.io/name"] == "grpo-operator"
        assert metadata["labels"]["grpo.dev/run"] == run.metadata.name


def test_a_run_without_uid_is_refused_by_name():
    run = load_manifest(EXAMPLE)
    with pytest.raises(ValueError, match=r"'open-rs-exp2'.*metadata\.uid"):
        manifests.config_map(run)


@pytest.mark.parametrize("name", ["open-rs-exp2", LONG_NAME, LONG_NAME[:60], "a" * 51 + "-" + "b" * 11])
@pytest.mark.parametrize("attempt", [0, 7, 1234])
def test_pod_name_is_a_dns_label_unique_per_run_and_attempt(name, attempt):
    got = pod_name(name, attempt)
    assert len(got) <= 63 and re.fullmatch(DNS_LABEL_PATTERN, got), got
    assert got == pod_name(name, attempt) != pod_name(name, attempt + 1)
    assert got.endswith(f"-{attempt}")
    if len(name) + len(str(attempt)) < 63:
        assert got == f"{name}-{attempt}"
    else:  # the truncated prefix is shared with other names; the hash of the whole name tells them apart
        other = name[:-1] + ("z" if name[-1] != "z" else "q")
        assert pod_name(other, attempt) != got


def test_pod_name_rejects_a_negative_attempt():
    with pytest.raises(ValueError, match="attempt"):
        pod_name("run", -1)


def test_pod_carries_its_attempt_and_the_names_handlers_look_up():
    run = variant("exp2")
    pod = manifests.pod(run, attempt=4)
    names = resource_names(run.metadata.name)
    assert pod["metadata"]["name"] == pod_name(run.metadata.name, 4)
    assert pod["metadata"]["labels"]["grpo.dev/attempt"] == "4"
    assert pod["spec"]["serviceAccountName"] == names.service_account
    assert {"name": "config", "configMap": {"name": names.config_map}} in pod["spec"]["volumes"]
    assert [manifests.config_map(run)["metadata"]["name"], manifests.service_account(run)["metadata"]["name"],
            manifests.role(run)["metadata"]["name"], manifests.role_binding(run)["metadata"]["name"]] == list(names)


# --------------------------------------------------------------------------------- config, RBAC


def test_config_map_holds_exactly_the_validated_run(run):
    data = manifests.config_map(run)["data"]
    assert list(data) == ["run.yaml"]
    manifest = yaml.safe_load(data["run.yaml"])
    assert manifest["metadata"] == {"name": run.metadata.name, "namespace": NAMESPACE}  # no uid, no server fields
    assert "status" not in manifest
    # ...except that the pod's trainer samples from the pod's sidecar.
    assert manifest["spec"]["rollout"]["backend"] == "server"
    server_rollout = run.spec.rollout.model_copy(update={"backend": "server"})
    assert validate_manifest(manifest).spec == run.spec.model_copy(update={"rollout": server_rollout})


def test_trainer_may_only_read_and_patch_its_own_status_and_record_events(run):
    role = manifests.role(run)
    assert role["rules"] == [
        {"apiGroups": ["grpo.dev"], "resources": ["grporuns/status"], "resourceNames": [run.metadata.name],
         "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    binding = manifests.role_binding(run)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                    "name": manifests.service_account(run)["metadata"]["name"]}]
    assert manifests.pod(run, attempt=0)["spec"]["automountServiceAccountToken"] is True


# ------------------------------------------------------------------------------------------ pod


def test_gpus_are_split_between_trainer_and_sidecar(run):
    trainer, sidecar = trainer_and_sidecar(manifests.pod(run, attempt=0))
    resources = run.spec.resources
    for container, gpus in ((trainer, resources.trainer_gpus), (sidecar, resources.vllm_gpus)):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert container["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
        assert "CUDA_VISIBLE_DEVICES" not in env_of(container)
    assert resources.trainer_gpus + resources.vllm_gpus == resources.gpus
    assert f"--tensor-parallel-size={resources.vllm_gpus}" in served_command(run)[0]
    assert trainer["resources"]["requests"]["cpu"] == resources.cpu
    assert trainer["resources"]["requests"]["memory"] == trainer["resources"]["limits"]["memory"] == resources.memory


def test_a_cpu_run_is_one_trainer_process_that_samples_in_process_on_any_node():
    pod = manifests.pod(CPU_RUN, attempt=1)["spec"]
    (trainer,) = pod["containers"]
    assert "initContainers" not in pod and "nodeSelector" not in pod, "no sidecar, no GPU node"
    assert trainer["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"memory": "6Gi"}}
    assert "GRPO_VLLM_URL" not in env_of(trainer), "nothing to reach: the trainer samples in-process"
    read = yaml.safe_load(manifests.config_map(CPU_RUN)["data"][manifests.CONFIG_KEY])
    assert read["spec"]["rollout"]["backend"] == "in-process"
    gpu_read = yaml.safe_load(manifests.config_map(variant("exp2"))["data"][manifests.CONFIG_KEY])
    assert gpu_read["spec"]["rollout"]["backend"] == "server"
    assert trainer["command"] == ["python", "-m", "grpo_trainer.cli", "train", f"{manifests.CONFIG_DIR}/{manifests.CONFIG_KEY}"]
    assert grpo_parser().parse_args(trainer["command"][3:]).manifest == trainer["command"][-1]


def test_trainer_command_is_what_torchrun_and_the_cli_accept():
    from torch.distributed.run import get_args_parser

    run = variant("8-gpus-slow-checkpoint")
    pod = manifests.pod(run, attempt=0)
    trainer, _ = trainer_and_sidecar(pod)
    assert trainer["command"][0] == "torchrun"
    args = get_args_parser().parse_args(trainer["command"][1:])
    assert (args.standalone, args.nproc_per_node, args.module, args.training_script) == (True, "7", True,
                                                                                        "grpo_trainer.cli")
    assert "SIGTERM" in args.signals_to_handle.split(",")
    # The trainer's own bound acts first, then torchrun's, then the kubelet's SIGKILL.
    assert 300 < args.shutdown_timeout < pod["spec"]["terminationGracePeriodSeconds"] <= 300 + 30
    cli = grpo_parser().parse_args(args.training_script_args)
    assert cli.command == "train"
    config_mount = next(m for m in trainer["volumeMounts"] if m["name"] == "config")
    assert config_mount == {"name": "config", "mountPath": "/etc/grpo", "readOnly": True}
    assert cli.manifest == f"{config_mount['mountPath']}/{manifests.CONFIG_KEY}"


def test_vllm_is_a_native_sidecar_on_loopback_that_the_trainer_reaches(run):
    trainer, sidecar = trainer_and_sidecar(manifests.pod(run, attempt=0))
    assert sidecar["restartPolicy"] == "Always"
    images = run.spec.resources.images
    assert sidecar["image"] == (images.vllm or DEFAULT_IMAGES["vllm"])
    assert trainer["image"] == (images.trainer or DEFAULT_IMAGES["trainer"])
    assert sidecar["imagePullPolicy"] == trainer["imagePullPolicy"] == run.spec.resources.images.pull_policy
    command, _ = served_command(run)
    assert "--host=127.0.0.1" in command
    port = next(arg.split("=")[1] for arg in command if arg.startswith("--port="))
    assert env_of(trainer)["GRPO_VLLM_URL"]["value"] == f"http://127.0.0.1:{port}"
    for probe in ("startupProbe", "readinessProbe"):
        assert set(sidecar[probe]) & {"httpGet", "tcpSocket", "grpc"} == set()
        assert f"127.0.0.1:{port}/health" in " ".join(sidecar[probe]["exec"]["command"])
    startup = sidecar["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600  # time to load a 1.5B model
    assert "livenessProbe" not in sidecar and "livenessProbe" not in trainer
    assert trainer["terminationMessagePolicy"] == "FallbackToLogsOnError"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, passes", [(200, True), (503, False)])
def test_the_exec_probe_passes_only_on_a_healthy_server(status, passes):
    handler = type("Health", (_Health,), {"status": status})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _, sidecar = trainer_and_sidecar(manifests.pod(variant("exp2"), attempt=0))
        url = f"http://127.0.0.1:{server.server_address[1]}"
        command = [arg.replace(manifests.VLLM_URL, url) for arg in sidecar["readinessProbe"]["exec"]["command"]]
        assert command[0] == "python"
        result = subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30)
        server.shutdown()
    assert (result.returncode == 0) is passes, result.stderr


def test_the_sidecar_serves_the_run_with_exactly_this_vllm_configuration():
    """The whole command line, flag by flag (docs/vllm-sidecar.md says why each is there)."""
    run = make_run(rollout={"gpuMemoryUtilization": 0.6}, grpo={"seed": 7})
    argv, env = served_command(run)
    assert argv == [
        "vllm", "serve", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "--revision=main",
        "--host=127.0.0.1", "--port=8000", "--dtype=bfloat16", "--seed=7", "--tensor-parallel-size=1",
        "--gpu-memory-utilization=0.6", "--max-model-len=4096", "--logprobs-mode=processed_logprobs",
        "--generation-config=vllm", '--weight-transfer-config={"backend":"nccl"}', "--disable-uvicorn-access-log",
    ]
    assert env == {"VLLM_SERVER_DEV_MODE": "1"}  # the weight-transfer routes; safe only on loopback


def test_both_containers_share_the_nccl_settings_weights_cross_over(run):
    """Two containers of one pod: no CUDA P2P between them (NVIDIA/nccl#1647), the same cuMem
    settings on both ends, and the one Memory-backed /dev/shm that NCCL's SHM transport uses."""
    trainer, sidecar = trainer_and_sidecar(manifests.pod(run, attempt=0))
    nccl = [{name: entry["value"] for name, entry in env_of(c).items() if name.startswith("NCCL_")}
            for c in (trainer, sidecar)]
    assert nccl[0] == nccl[1] == NCCL_ENVIRONMENT
    assert NCCL_ENVIRONMENT["NCCL_P2P_DISABLE"] == "1"
    assert {name for name in NCCL_ENVIRONMENT if name.startswith("NCCL_CUMEM")} == {"NCCL_CUMEM_ENABLE",
                                                                                   "NCCL_CUMEM_HOST_ENABLE"}


def test_a_run_naming_no_images_gets_the_operators_and_one_naming_them_its_own():
    environment = {"GRPO_TRAINER_IMAGE": "mirror.local/trainer:1", "GRPO_VLLM_IMAGE": "mirror.local/vllm:1"}
    configured = manifests.default_images(environment)
    assert manifests.default_images({}) == DEFAULT_IMAGES
    own = {"trainer": "registry.local/trainer:fix", "vllm": "registry.local/vllm:fix"}
    for name, expected in (("exp2", configured), ("own-images", own)):
        run = variant(name)
        trainer, sidecar = trainer_and_sidecar(manifests.pod(run, attempt=1, default_images=configured))
        job = manifests.evaluation_job(run, checkpoint_of(run, 50), default_images=configured)
        (evaluation,) = job["spec"]["template"]["spec"]["containers"]
        observed = (trainer["image"], sidecar["image"], evaluation["image"])
        assert observed == (expected["trainer"], expected["vllm"], expected["vllm"]), name


def test_shm_is_memory_backed_and_mounted_in_both_containers(run):
    pod = manifests.pod(run, attempt=0)
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for container in trainer_and_sidecar(pod):
        (shm,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": run.spec.resources.shm_size}


def test_s3_credentials_come_from_the_secret_only_when_one_is_named():
    trainer, _ = trainer_and_sidecar(manifests.pod(variant("exp2"), attempt=0))
    env = env_of(trainer)
    for key, optional in (("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None), ("AWS_SESSION_TOKEN", True)):
        reference = env[key]["valueFrom"]["secretKeyRef"]
        assert (reference["name"], reference["key"], reference.get("optional")) == ("s3-credentials", key, optional)
    assert env["GRPO_RUN_NAME"]["value"] == "open-rs-exp2"
    _, sidecar = trainer_and_sidecar(manifests.pod(variant("exp2"), attempt=0))
    # The sidecar downloads an s3:// model from the same store.
    assert {key: env_of(sidecar)[key] for key in env if key.startswith("AWS_")} == {
        key: value for key, value in env.items() if key.startswith("AWS_")}
    assert env["GRPO_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    trainer, _ = trainer_and_sidecar(manifests.pod(variant("no-credentials"), attempt=0))
    assert not any(name.startswith("AWS_") for name in env_of(trainer))


def test_scheduling_follows_the_spec():
    default = manifests.pod(variant("exp2"), attempt=0)["spec"]
    assert default["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A40"}
    assert "tolerations" not in default and "priorityClassName" not in default
    assert default["restartPolicy"] == "Never" and "activeDeadlineSeconds" not in default
    grace = variant("exp2").spec.checkpoints.preemption_grace_seconds
    assert grace < default["terminationGracePeriodSeconds"] <= grace + 30

    custom = manifests.pod(variant("scheduling"), attempt=0)["spec"]
    assert custom["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert custom["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300},
    ]
    assert custom["priorityClassName"] == "training-high"
    assert "nodeSelector" not in manifests.pod(variant("any-gpu"), attempt=0)["spec"]


def test_pod_runs_as_non_root_with_read_only_roots_and_writable_scratch(run):
    pod = manifests.pod(run, attempt=0)
    assert pod["spec"]["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for container in trainer_and_sidecar(pod):
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
        }
        writable = {m["mountPath"] for m in container["volumeMounts"]
                    if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")}
        assert {"/tmp", "/dev/shm", env_of(container)["HOME"]["value"]} <= writable, container["name"]


def test_builders_return_fresh_objects():
    """Handlers may edit what they get (kopf.adopt, patches); that must not leak into the next pod."""
    run = variant("exp2")
    first = manifests.pod(run, attempt=0)
    first["spec"]["containers"][0]["volumeMounts"][-1]["mountPath"] = "/elsewhere"
    first["spec"]["initContainers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert manifests.pod(run, attempt=0) != first


# ---------------------------------------------------------------------------------- evaluation

def eval_args(job: dict) -> tuple[str, dict[str, str]]:
    """The checkpoint URI and the flags of the Job's ``grpo eval``, each of them one the real
    ``grpo eval`` parses (an unknown flag or a bad value exits 2 here, as it would in the pod)."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:4] == ["python", "-m", "grpo_trainer.cli", "eval"]
    parsed = grpo_parser().parse_args(command[3:])
    assert parsed.model == command[4] and parsed.backend == "vllm"
    uri, rest = command[4], command[5:]
    return uri, dict(zip(rest[::2], rest[1::2], strict=True))


@pytest.mark.parametrize("name", ["open-rs-exp2", LONG_NAME, "a" * 51 + "-" + "b" * 11])
@pytest.mark.parametrize("step", [0, 50, 12345678])
def test_job_name_is_a_dns_label_unique_per_run_and_step(name, step):
    got = job_name(name, step)
    assert len(got) <= 63 and re.fullmatch(DNS_LABEL_PATTERN, got), got
    assert got.endswith(f"-eval-{step}") and got != job_name(name, step + 1) != pod_name(name, step)
    if len(name) + len(f"-eval-{step}") <= 63:
        assert got == f"{name}-eval-{step}"
    with pytest.raises(ValueError, match="step"):
        job_name(name, -1)


def test_evaluation_job_runs_grpo_eval_on_the_checkpoint_as_the_spec_says():
    run = variant("evaluation")
    checkpoint = checkpoint_of(run, 150)
    job = manifests.evaluation_job(run, checkpoint)
    uri, flags = eval_args(job)
    assert uri == "s3://grpo-checkpoints/open-rs/open-rs-exp2/checkpoints/step-00000150" == checkpoint.uri
    assert flags == {
        "--benchmarks": "aime24,math500", "--samples-per-problem": "8", "--temperature": "0.6", "--top-p": "0.95",
        "--max-new-tokens": "32768", "--output": "s3://grpo-checkpoints/open-rs/open-rs-exp2/evaluations/step-00000150",
        "--backend": "vllm", "--gpus": "2", "--endpoint-url": "http://minio.storage:9000",
    }
    assert "--endpoint-url" not in eval_args(manifests.evaluation_job(variant("exp2"), checkpoint))[1]
    metadata = job["metadata"]
    assert metadata["name"] == job_name("open-rs-exp2", 150)
    assert metadata["labels"] == {**manifests.run_labels("open-rs-exp2"), "grpo.dev/evaluation-step": "150"}
    assert job["spec"]["template"]["metadata"]["labels"] == metadata["labels"], "its pods wake the run's loop"
    assert metadata["annotations"] == {"grpo.dev/checkpoint-uri": checkpoint.uri}


@pytest.mark.parametrize(
    ("reported", "model", "output"),
    [
        # A file:// store's path as the trainer resolved it in its pod.
        ("file:///data/runs/r/checkpoints/step-00000050", "file:///data/runs/r/checkpoints/step-00000050",
         "file:///data/runs/r/evaluations/step-00000050"),
        ("s3://b/p/r/checkpoints/step-00000050/", "s3://b/p/r/checkpoints/step-00000050/", "s3://b/p/r/evaluations/step-00000050"),
        # A report that names no checkpoint of this step: the spec's own location.
        ("", "s3://grpo-checkpoints/open-rs/open-rs-exp2/checkpoints/step-00000050",
         "s3://grpo-checkpoints/open-rs/open-rs-exp2/evaluations/step-00000050"),
        ("s3://b/p/r/checkpoints/step-00000049", "s3://grpo-checkpoints/open-rs/open-rs-exp2/checkpoints/step-00000050",
         "s3://grpo-checkpoints/open-rs/open-rs-exp2/evaluations/step-00000050"),
    ],
)
def test_evaluation_reads_the_checkpoint_the_trainer_reported_and_writes_beside_it(reported, model, output):
    uri, flags = eval_args(manifests.evaluation_job(variant("exp2"), CheckpointRef(step=50, uri=reported)))
    assert (uri, flags["--output"]) == (model, output)


def test_evaluation_job_runs_on_the_runs_nodes_with_its_credentials_and_retries_within_bounds():
    run = variant("scheduling")
    job = manifests.evaluation_job(run, checkpoint_of(run, 50))
    spec, trainer_pod = job["spec"]["template"]["spec"], manifests.pod(run, attempt=0)["spec"]
    (container,) = spec["containers"]
    trainer, _ = trainer_and_sidecar(manifests.pod(run, attempt=0))
    for key in ("nodeSelector", "tolerations", "priorityClassName", "securityContext"):
        assert spec[key] == trainer_pod[key], key
    assert container["image"] == DEFAULT_IMAGES["vllm"]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    aws = {name: entry for name, entry in env_of(container).items() if name.startswith("AWS_")}
    assert aws == {name: entry for name, entry in env_of(trainer).items() if name.startswith("AWS_")} and aws
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert {"/tmp", "/dev/shm", env_of(container)["HOME"]["value"]} <= writable
    assert "nodeSelector" not in manifests.evaluation_job(variant("any-gpu"), checkpoint_of(run, 50))["spec"]["template"]["spec"]

    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == manifests.EVALUATION_BACKOFF_LIMIT == 2
    assert job["spec"]["activeDeadlineSeconds"] == run.spec.evaluation.deadline_seconds == 21600
    assert manifests.evaluation_job(variant("evaluation"), checkpoint_of(run, 50))["spec"]["activeDeadlineSeconds"] == 3600
    fail_at_once, not_counted = job["spec"]["podFailurePolicy"]["rules"]
    exit_invalid = {"containerName": "eval", "operator": "In", "values": [EXIT_INVALID]}
    assert fail_at_once == {"action": "FailJob", "onExitCodes": exit_invalid}
    assert not_counted == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_evaluation_may_do_nothing_in_the_api(run):
    job = manifests.evaluation_job(run, checkpoint_of(run, 50))
    account = manifests.evaluation_service_account(run)
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"] == f"{run.metadata.name}-eval"
    assert spec["automountServiceAccountToken"] is False and account["automountServiceAccountToken"] is False
    assert account["metadata"]["name"] not in {subject["name"] for subject in manifests.role_binding(run)["subjects"]}


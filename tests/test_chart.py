"""The Helm chart: helm lints and renders it with its default values and a stated set of others,
every object it renders is valid for the oldest and newest Kubernetes we support, bad values fail
naming the value, and what it installs agrees with the spec, the CRD and the package."""

from __future__ import annotations

import functools
import shutil
import textwrap
import tomllib

import kubernetes_validate
import pytest
import yaml
from helm_chart import CHART, NAMESPACE, RELEASE, REPO, chart_metadata, default_values, helm, one, render
from kubernetes_validate.utils import all_versions, major_minor

from grpo_operator.manifests import IMAGE_VARIABLES, USER_ID
from grpo_trainer.spec import DEFAULT_IMAGES, IMAGES_VERSION

OLDEST, NEWEST = "1.29", major_minor(all_versions()[-1])
"""The Kubernetes versions we support: from the first with native sidecars on by default."""

VALUES = {
    "defaults": {},
    "listed-namespaces": {"watchNamespaces": ["team-a", "team-b"], "verbose": True},
    "mirror": {
        "images": {"registry": "registry.local:5000/ml", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "ml"},
        "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"memory": "1Gi"}},
    },
    "monitoring": {"metrics": {"port": 9100, "serviceMonitor": {"enabled": True, "interval": "15s",
                                                                  "labels": {"release": "prometheus"}}},
                   "health": {"port": 9101}},
}
"""The default values and the non-default ones CI renders and validates."""

NOT_BUILTIN = {"monitoring.coreos.com/v1"}
"""API groups no Kubernetes version's schemas hold (prometheus-operator's); checked field by field instead."""


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(VALUES[name], crds=True))


def test_the_chart_says_the_oldest_kubernetes_we_validate_for():
    assert chart_metadata()["kubeVersion"] == f">={OLDEST}.0-0"


@pytest.mark.parametrize("values", VALUES)
def test_helm_lints_the_chart(values):
    result = helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, values=VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.usefixtures("cached_schemas")
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize("values", VALUES)
def test_every_rendered_object_is_valid_for_the_kubernetes_version(values, version):
    objects = rendered(values)
    for obj in objects:
        if obj["apiVersion"] not in NOT_BUILTIN:
            kubernetes_validate.validate(obj, version, strict=True)
    assert {obj["kind"] for obj in objects} >= {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Service"}


@pytest.mark.parametrize(("values", "says"), [
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces.0: Does not match pattern"),
    ({"metrics": {"port": 80}}, "metrics.port: Must be greater than or equal to 1024"),
    ({"images": {"pullPolicy": "Sometimes"}}, "images.pullPolicy: images.pullPolicy must be one of"),
    ({"metrics": {"port": 8081}}, "metrics.port and health.port must differ"),
    ({"watchNamspaces": ["a"]}, "Additional property watchNamspaces is not allowed"),
])
def test_bad_values_fail_naming_the_value(values, says):
    result = helm("template", RELEASE, str(CHART), values=values)
    assert result.returncode != 0 and says in result.stderr, result.stderr


def test_the_charts_crd_is_the_generated_one():
    assert (CHART / "crds" / "grporun.yaml").read_text() == (REPO / "crds" / "grporun.yaml").read_text()


def test_the_images_are_named_as_the_spec_and_the_package_say():
    """One version for the package, the chart's appVersion (the images' tag) and the spec's default
    images; the chart's default values name those very images."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    metadata = chart_metadata()
    assert version == metadata["appVersion"] == metadata["version"] == IMAGES_VERSION
    images = default_values()["images"]
    for image, default in DEFAULT_IMAGES.items():
        assert f"{images['registry']}/{images[image]}:{metadata['appVersion']}" == default
    container = one(rendered("defaults"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    assert {image: env[variable] for image, variable in IMAGE_VARIABLES.items()} == DEFAULT_IMAGES
    assert container["image"] == f"{images['registry']}/{images['operator']}:{metadata['appVersion']}"


def test_other_images_reach_the_operator_and_its_runs():
    container = one(rendered("mirror"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    assert container["image"] == "registry.local:5000/ml/operator:0.1.0-rc1" and container["imagePullPolicy"] == "Always"
    assert env == {"GRPO_TRAINER_IMAGE": "registry.local:5000/ml/trainer:0.1.0-rc1",
                   "GRPO_VLLM_IMAGE": "registry.local:5000/ml/vllm:0.1.0-rc1"}


@pytest.mark.parametrize("values", VALUES)
def test_one_operator_runs_non_root_read_only_with_a_liveness_probe_and_resources(values):
    deployment = one(rendered(values), "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert (spec["replicas"], spec["strategy"]) == (1, {"type": "Recreate"})
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == USER_ID
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    values_ = {**default_values(), **VALUES[values]}
    assert ports == {"metrics": values_["metrics"]["port"], "health": values_["health"]["port"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"] == values_["resources"]
    assert pod["serviceAccountName"] == one(rendered(values), "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("values", VALUES)
def test_the_operators_arguments_are_what_grpo_operator_accepts(values):
    from grpo_trainer.cli import parser

    container = one(rendered(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "grpo"
    args = parser().parse_args([*container["command"][1:], *container["args"]])
    watched = VALUES[values].get("watchNamespaces")
    assert (args.namespace, args.all_namespaces) == ((watched, False) if watched else (None, True))
    assert (args.metrics_port, args.health_port) == (
        one(rendered(values), "Service")["spec"]["ports"][0]["port"],
        {**default_values(), **VALUES[values]}["health"]["port"],
    )


def test_the_service_monitor_scrapes_the_metrics_service_only_when_enabled():
    assert not [obj for obj in rendered("defaults") if obj["kind"] == "ServiceMonitor"]
    objects = rendered("monitoring")
    monitor, service, deployment = one(objects, "ServiceMonitor"), one(objects, "Service"), one(objects, "Deployment")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics"}]


def test_notes_say_what_to_do_next(tmp_path):
    # helm install --dry-run would print them, but helm 3.17 wants a cluster for it: in a copy of the
    # chart, NOTES.txt becomes the text of a YAML template, which helm template renders.
    chart = shutil.copytree(CHART, tmp_path / "chart")
    text = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes.yaml").write_text("notes: |\n" + textwrap.indent(text, "  "))
    result = helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only", "templates/notes.yaml")
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["notes"]
    for step in ("rollout status deployment/grpo-operator", "create secret generic s3-credentials",
                 "apply -f examples/exp3-open-rs-cosine.yaml", "get grporuns -w", "/metrics", "docs/operations.md"):
        assert step in notes, step
    assert yaml.safe_load((REPO / "examples" / "exp3-open-rs-cosine.yaml").read_text())["spec"]["checkpoints"][
        "credentialsSecret"] == "s3-credentials"


def test_the_readmes_cluster_path_agrees_with_the_chart_the_example_and_the_metrics():
    import prometheus_client

    import grpo_operator.metrics  # noqa: F401  (registers the operator's metrics)

    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    objects = rendered("defaults")
    example = yaml.safe_load((REPO / "examples" / "exp3-open-rs-cosine.yaml").read_text())
    name, checkpoints = example["metadata"]["name"], example["spec"]["checkpoints"]
    for said in (
        f"helm install {RELEASE} charts/grpo-operator --namespace {NAMESPACE}",
        f"rollout status deployment/{one(objects, 'Deployment')['metadata']['name']}",
        f"create secret generic {checkpoints['credentialsSecret']}",
        "kubectl apply -f examples/exp3-open-rs-cosine.yaml", "kubectl get grporuns -w", f"kubectl describe grporun {name}",
        f"{checkpoints['storage']}/{name}/checkpoints/step-NNNNNNNN/",
        f"`{one(objects, 'Service')['metadata']['name']}` Service, port {default_values()['metrics']['port']}",
        '{"spec":{"suspend":true}}', '{"spec":{"suspend":false}}', f"kubectl delete grporun {name}",
        "nvidia.com/gpu.product", "scripts/kind-e2e.sh", "examples/cpu-smollm2.yaml",
    ):
        assert said in section, said
    exposed = {metric.name for metric in prometheus_client.REGISTRY.collect()}
    for metric in ("grpo_operator_runs", "grpo_operator_reconcile_passes", "grpo_operator_reconcile_errors",
                   "grpo_operator_pod_recreations"):
        assert metric in exposed and f"`{metric}" in section, metric
    assert example["spec"].get("resources", {}).get("gpuProduct", "NVIDIA-A40") in section

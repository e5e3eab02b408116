"""The GRPORun API: CRD generated from the models, examples valid, bad manifests rejected field by field.

Every manifest goes through two independent paths that must agree: our validator (pydantic + CEL,
what `grpo validate`, the operator and the trainer use) and an emulation of the API server built from
the committed CRD alone (tests/k8s_admission.py).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import celpy
import kubernetes_validate
import pytest
import yaml
from k8s_admission import Admission
from openapi_schema_validator import OAS30Validator

from grpo_operator.crd import render_crd
from grpo_trainer import spec
from grpo_trainer.cli import main as grpo
from grpo_trainer.validation import ManifestError, _expanded_size, load_manifest, validate_manifest

REPO = Path(__file__).resolve().parent.parent
CRD_PATH = REPO / "crds" / "grporun.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BASE = yaml.safe_load((REPO / "examples" / "exp3-open-rs-cosine.yaml").read_text())


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def admission(crd) -> Admission:
    return Admission(crd)


# ------------------------------------------------------------------------------------------ CRD


def test_committed_crd_is_what_the_spec_generates():
    assert CRD_PATH.read_text() == render_crd(), "crds/grporun.yaml is stale: run `grpo crd -o crds/grporun.yaml`"


def test_crd_check_command_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "grporun.yaml"
    stale.write_text(render_crd().replace("numGenerations", "numGens"))
    assert grpo(["crd", "--check", str(stale)]) == 1
    assert grpo(["crd", "--check", str(CRD_PATH)]) == 0


@pytest.mark.parametrize("version", ["1.29", "1.31", "1.33", "1.35", "1.37"])
def test_crd_is_a_valid_apiextensions_object(crd, version):
    kubernetes_validate.validate(crd, version, strict=True)


def _schema_nodes(node, path="openAPIV3Schema"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _schema_nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _schema_nodes(node["items"], f"{path}[]")


def test_crd_schema_is_structural(crd):
    """The API server's structural-schema rules: every node typed, no $ref/unions/additionalProperties
    beside properties, no nullable defaults, every default valid against its own schema."""
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _schema_nodes(root):
        assert "type" in node, f"{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "not", "title", "const", "$defs"):
            assert forbidden not in node, f"{path} uses {forbidden}"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            assert node["default"] is not None, f"{path} defaults to null"
            errors = list(OAS30Validator(node).iter_errors(node["default"]))
            assert not errors, f"{path}: default {node['default']!r} is invalid: {errors[0].message}"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}.{bound} must be a boolean in OpenAPI v3"


def test_crd_cel_rules_compile_and_point_at_real_fields(crd):
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    environment = celpy.Environment()
    rules = 0
    for path, node in _schema_nodes(root):
        for rule in node.get("x-kubernetes-validations", []):
            environment.compile(rule["rule"])
            rules += 1
            target = node
            for part in filter(None, rule.get("fieldPath", "").split(".")):
                assert part in target.get("properties", {}), f"{path}: fieldPath {rule['fieldPath']} names no field"
                target = target["properties"][part]
    assert rules >= 20


def test_crd_has_status_subresource_printer_columns_and_short_name(crd):
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert list(columns)[:2] == ["Phase", "Step"] and {"Reward", "AIME24", "Age"} <= set(columns)
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    for name, json_path in columns.items():
        if json_path.startswith(".status."):
            node = status
            for part in json_path.split(".")[2:]:
                assert part in node["properties"], f"printer column {name}: {json_path} is not in the status schema"
                node = node["properties"][part]
    assert crd["spec"]["names"]["shortNames"] == ["grpo"]


def test_experiment_fields_are_immutable_and_operational_ones_are_not(admission):
    stored, errors = admission.admit(BASE)
    assert errors == []
    for path, value in [("spec.grpo.beta", 0.0), ("spec.model.source", "org/other"), ("spec.rewards.1.weight", 3.0),
                        ("spec.checkpoints.storage", "s3://elsewhere/x"), ("spec.dataset.seed", 7)]:
        _, errors = admission.admit(_mutated(BASE, path, value), old=stored)
        field = ".".join(part for part in path.split(".")[:2])
        assert any(error.startswith(field) and "immutable" in error for error in errors), (path, errors)
    for path, value in [("spec.suspend", True), ("spec.maxRestarts", 3), ("spec.evaluation.samplesPerProblem", 8),
                        ("spec.resources.images.trainer", "registry.local/trainer:fix")]:
        _, errors = admission.admit(_mutated(BASE, path, value), old=stored)
        assert errors == [], (path, errors)


# ------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid_and_both_validators_store_the_same_object(path, admission):
    manifest = yaml.safe_load(path.read_text())
    run = load_manifest(path)
    stored, errors = admission.admit(manifest)
    assert errors == []
    assert run.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"] == stored["spec"]


def test_examples_are_the_papers_three_experiments_and_a_cpu_run():
    runs = {path.stem: load_manifest(path).spec for path in EXAMPLES}
    exp1, exp2, exp3 = runs["exp1-open-s1"], runs["exp2-open-rs"], runs["exp3-open-rs-cosine"]
    assert exp1.dataset.source == "knoveleng/open-s1" and exp1.grpo.max_completion_length == 4096
    assert [r.name for r in exp1.rewards] == ["accuracy", "format"]
    assert exp2.dataset.source == "knoveleng/open-rs" and exp2.grpo.max_completion_length == 3584
    assert [r.name for r in exp2.rewards] == ["accuracy", "format"]
    assert [(r.name, r.weight) for r in exp3.rewards] == [("format", 1.0), ("cosine", 2.0)]
    assert exp3.rewards[1].resolved_params()["max_len"] == 3584
    assert exp3.dataset.system_prompt == spec.OPEN_RS_SYSTEM_PROMPT + spec.ENGLISH_ONLY_INSTRUCTION
    cpu = runs["cpu-smollm2"]
    assert cpu.model.source.endswith(".gguf") and cpu.dataset.source.startswith("builtin://")
    assert cpu.checkpoints.storage.startswith("file://")


def test_defaults_are_the_open_rs_recipe():
    """knoveleng/open-rs recipes/grpo.yaml, run by TRL 0.16 on 3 trainer GPUs + 1 vLLM GPU."""
    run = spec.GRPORunSpec(model={"source": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}, dataset={"source": "knoveleng/open-rs"})
    grpo = run.grpo
    assert (grpo.num_generations, grpo.temperature, grpo.max_completion_length, grpo.max_prompt_length) == (6, 0.7, 3584, 512)
    assert (grpo.learning_rate, grpo.lr_scheduler, grpo.min_lr_rate, grpo.warmup_ratio) == (1e-6, "cosine_with_min_lr", 0.1, 0.1)
    assert (grpo.beta, grpo.epsilon, grpo.epsilon_high, grpo.loss_type) == (0.04, 0.2, 0.2, "bnpo")
    assert (grpo.per_device_batch_size, grpo.gradient_accumulation_steps, grpo.max_steps, grpo.seed) == (6, 4, 500, 42)
    assert (run.resources.trainer_gpus, run.resources.vllm_gpus, run.resources.gpu_product) == (3, 1, "NVIDIA-A40")
    assert [(r.name, r.weight) for r in run.rewards] == [("format", 1.0), ("cosine", 2.0)]
    assert run.checkpoints.every_steps == 50
    evaluation = run.evaluation
    observed = (evaluation.checkpoints, evaluation.select_by, evaluation.deadline_seconds, evaluation.enabled)
    assert observed == ("final", "mean", 21600, True)
    assert (run.rollout.backend, run.rollout.gpu_memory_utilization, run.rollout.max_model_len) == ("in-process", 0.7, None)
    assert run.dataset.system_prompt == spec.OPEN_RS_SYSTEM_PROMPT


def test_spec_modules_do_not_import_torch():
    code = (
        "import sys, grpo_trainer.spec, grpo_trainer.validation, grpo_trainer.cli, grpo_operator.crd; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------- malformed manifests

DELETE = object()
BOTH, OURS = True, False  # OURS: the API server checks these outside the CRD schema (name, apiVersion, kind)

MALFORMED = [
    # (id, edit path, value, expected field path, words the message must contain, checked by the CRD too)
    ("no-model", "spec.model", DELETE, "spec.model", "required", BOTH),
    ("no-model-source", "spec.model.source", DELETE, "spec.model.source", "required", BOTH),
    ("empty-model-source", "spec.model.source", "", "spec.model.source", "", BOTH),
    ("bad-s3-bucket", "spec.model.source", "s3://Bad_Bucket/x", "spec.model.source", "pattern", BOTH),
    ("unknown-dtype", "spec.model.dtype", "fp8", "spec.model.dtype", "bfloat16", BOTH),
    ("misspelt-field", "spec.model.revison", "main", "spec.model.revison", "did you mean 'revision'", BOTH),
    ("bad-dataset-scheme", "spec.dataset.source", "ftp://host/data", "spec.dataset.source", "pattern", BOTH),
    ("zero-max-samples", "spec.dataset.maxSamples", 0, "spec.dataset.maxSamples", "greater than or equal to 1", BOTH),
    ("no-rewards", "spec.rewards", [], "spec.rewards", "at least 1", BOTH),
    ("unknown-reward", "spec.rewards.0.name", "accuracyy", "spec.rewards[0].name", "cosine", BOTH),
    ("weight-not-number", "spec.rewards.1.weight", "heavy", "spec.rewards[1].weight", "number", BOTH),
    ("param-of-other-reward", "spec.rewards.0.params", {"maxLen": 100}, "spec.rewards[0].params.maxLen",
     "only to reward cosine", BOTH),
    ("ngram-on-cosine", "spec.rewards.1.params.ngramSize", 3, "spec.rewards[1].params.ngramSize",
     "only to reward repetition", BOTH),
    ("zero-max-len", "spec.rewards.1.params.maxLen", 0, "spec.rewards[1].params.maxLen", "greater than or equal to 1", BOTH),
    ("bad-length-unit", "spec.rewards.1.params.lengthUnit", "bytes", "spec.rewards[1].params.lengthUnit", "tokens", BOTH),
    ("duplicate-reward", "spec.rewards.0.name", "cosine", "spec.rewards", "twice", BOTH),
    ("one-generation", "spec.grpo.numGenerations", 1, "spec.grpo.numGenerations", "greater than or equal to 2", BOTH),
    ("generations-as-string", "spec.grpo.numGenerations", "6", "spec.grpo.numGenerations", "integer", BOTH),
    ("groups-split-across-steps", "spec.grpo.numGenerations", 7, "spec.grpo.numGenerations", "whole groups", BOTH),
    ("zero-temperature", "spec.grpo.temperature", 0, "spec.grpo.temperature", "greater than 0", BOTH),
    ("top-p-above-one", "spec.grpo.topP", 1.5, "spec.grpo.topP", "less than or equal to 1", BOTH),
    ("negative-beta", "spec.grpo.beta", -0.1, "spec.grpo.beta", "greater than or equal to 0", BOTH),
    ("zero-epsilon", "spec.grpo.epsilon", 0, "spec.grpo.epsilon", "greater than 0", BOTH),
    ("unknown-loss", "spec.grpo.lossType", "ppo", "spec.grpo.lossType", "dapo", BOTH),
    ("preset-pins-loss", "spec.grpo.lossType", "dapo", "spec.grpo.lossType", "preset: custom", BOTH),
    ("preset-pins-scaling", "spec.grpo.scaleRewards", "batch", "spec.grpo.scaleRewards", "preset: custom", BOTH),
    ("preset-pins-iterations", "spec.grpo.numIterations", 2, "spec.grpo.numIterations", "preset: custom", BOTH),
    ("preset-pins-is", "spec.grpo.importanceSampling", "token_truncate", "spec.grpo.importanceSampling", "preset: custom", BOTH),
    ("preset-pins-clip", "spec.grpo.epsilonHigh", 0.28, "spec.grpo.epsilonHigh", "preset: custom", BOTH),
    ("zero-learning-rate", "spec.grpo.learningRate", 0, "spec.grpo.learningRate", "greater than 0", BOTH),
    ("full-warmup", "spec.grpo.warmupRatio", 1.0, "spec.grpo.warmupRatio", "less than 1", BOTH),
    ("zero-steps", "spec.grpo.maxSteps", 0, "spec.grpo.maxSteps", "greater than or equal to 1", BOTH),
    ("zero-stage-one", "spec.grpo.zeroStage", 1, "spec.grpo.zeroStage", "2 or 3", BOTH),
    ("unknown-scheduler", "spec.grpo.lrScheduler", "step", "spec.grpo.lrScheduler", "cosine_with_min_lr", BOTH),
    ("gpu-split-wrong", "spec.resources.trainerGpus", 2, "spec.resources.gpus", "trainerGpus + vllmGpus", BOTH),
    ("unknown-rollout-backend", "spec.rollout.backend", "remote", "spec.rollout.backend", "in-process", BOTH),
    ("all-gpu-memory-and-more", "spec.rollout.gpuMemoryUtilization", 1.2, "spec.rollout.gpuMemoryUtilization",
     "less than or equal to 1", BOTH),
    ("model-len-below-sequence", "spec.rollout.maxModelLen", 4000, "spec.rollout.maxModelLen",
     "maxPromptLength + grpo.maxCompletionLength", BOTH),
    ("top-p-with-correction-on-the-server", "spec.grpo",
     {**BASE["spec"]["grpo"], "preset": "custom", "importanceSampling": "token_truncate", "topP": 0.95},
     "spec.grpo.topP", "renormalised over the top-p nucleus", BOTH),
    ("gpus-without-vllm", "spec.resources", {"gpus": 2, "trainerGpus": 2, "vllmGpus": 0}, "spec.resources.vllmGpus",
     "the vLLM sidecar samples", BOTH),
    ("gpus-without-trainer", "spec.resources", {"gpus": 1, "trainerGpus": 0, "vllmGpus": 1}, "spec.resources.trainerGpus",
     "at least 1 on GPUs", BOTH),
    ("negative-gpus", "spec.resources", {"gpus": -1, "trainerGpus": 0, "vllmGpus": -1}, "spec.resources.gpus",
     "greater than or equal to 0", BOTH),
    ("memory-not-quantity", "spec.resources.memory", "lots", "spec.resources.memory", "pattern", BOTH),
    ("exists-with-value", "spec.resources.tolerations", [{"key": "gpu", "operator": "Exists", "value": "x"}],
     "spec.resources.tolerations[0].value", "Exists", BOTH),
    ("bad-priority-class", "spec.resources.priorityClassName", "High_Priority", "spec.resources.priorityClassName",
     "pattern", BOTH),
    ("gcs-storage", "spec.checkpoints.storage", "gs://bucket/x", "spec.checkpoints.storage", "pattern", BOTH),
    ("endpoint-without-s3", "spec.checkpoints", {"storage": "file:///data", "endpointUrl": "http://minio:9000"},
     "spec.checkpoints.endpointUrl", "s3://", BOTH),
    ("endpoint-not-url", "spec.checkpoints.endpointUrl", "minio:9000", "spec.checkpoints.endpointUrl", "pattern", BOTH),
    ("zero-save-interval", "spec.checkpoints.everySteps", 0, "spec.checkpoints.everySteps", "greater than or equal to 1", BOTH),
    ("unknown-benchmark", "spec.evaluation.benchmarks", ["aime25"], "spec.evaluation.benchmarks[0]", "aime24", BOTH),
    ("repeated-benchmark", "spec.evaluation.benchmarks", ["aime24", "aime24"], "spec.evaluation.benchmarks", "repeat", BOTH),
    ("unknown-eval-checkpoints", "spec.evaluation.checkpoints", "best", "spec.evaluation.checkpoints", "final", BOTH),
    ("select-by-unknown", "spec.evaluation.selectBy", "median", "spec.evaluation.selectBy", "mean", BOTH),
    ("select-by-not-evaluated", "spec.evaluation", {"benchmarks": ["aime24"], "selectBy": "math500"},
     "spec.evaluation.selectBy", "one of the benchmarks", BOTH),
    ("short-eval-deadline", "spec.evaluation.deadlineSeconds", 10, "spec.evaluation.deadlineSeconds",
     "greater than or equal to 60", BOTH),
    ("negative-restarts", "spec.maxRestarts", -1, "spec.maxRestarts", "greater than or equal to 0", BOTH),
    ("suspend-as-string", "spec.suspend", "true", "spec.suspend", "boolean", BOTH),
    ("zero-deadline", "spec.activeDeadlineSeconds", 0, "spec.activeDeadlineSeconds", "greater than or equal to 1", BOTH),
    ("unknown-spec-field", "spec.gpus", 4, "spec.gpus", "unknown field", BOTH),
    ("bad-name", "metadata.name", "Open_RS", "metadata.name", "pattern", OURS),
    ("wrong-api-version", "apiVersion", "grpo.dev/v1", "apiVersion", "grpo.dev/v1alpha1", OURS),
    ("wrong-kind", "kind", "Job", "kind", "GRPORun", OURS),
]


def _mutated(manifest: dict, path: str, value) -> dict:
    manifest = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    node = manifest
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return manifest


def test_there_are_at_least_thirty_malformed_manifests():
    assert len(MALFORMED) >= 30 and len({case[0] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("case", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_manifest_is_rejected_naming_the_field(case, admission):
    _, edit, value, field, words, crd_checks_it = case
    manifest = _mutated(BASE, edit, value)
    with pytest.raises(ManifestError) as raised:
        validate_manifest(manifest, source="case.yaml")
    messages = [str(error) for error in raised.value.errors]
    assert any(error.path == field and words.lower() in error.message.lower() for error in raised.value.errors), messages
    if crd_checks_it:
        _, errors = admission.admit(manifest)
        parent, _, leaf = field.rpartition(".")
        named = [e for e in errors if e.startswith(field + ":") or (e.startswith(parent + ":") and leaf in e)]
        assert named, errors


@pytest.mark.parametrize(
    "grpo, resources, rollout",
    [({"importanceSampling": "none", "topP": 0.95}, {}, {}),  # no correction: the log-probs are only reported
     ({"importanceSampling": "token_mask", "topP": 1.0}, {}, {}),
     ({"importanceSampling": "token_mask", "topP": 0.95}, {"gpus": 0, "trainerGpus": 0, "vllmGpus": 0}, {})],
    ids=["no-correction", "whole-distribution", "in-process-on-cpu"],
)
def test_top_p_below_one_with_a_correction_is_allowed_unless_the_vllm_server_samples(grpo, resources, rollout, admission):
    """vLLM 0.34.0's processed_logprobs are taken after top-p masking; the in-process sampler's are not."""
    manifest = copy.deepcopy(BASE)
    manifest["spec"]["grpo"].update({"preset": "custom", **grpo})
    manifest["spec"]["resources"] = resources
    manifest["spec"]["rollout"] = rollout
    validate_manifest(manifest)
    assert admission.admit(manifest)[1] == []
    manifest["spec"]["rollout"] = {"backend": "server"}  # a local run asking a server
    if grpo["topP"] < 1 and grpo["importanceSampling"] != "none":
        with pytest.raises(ManifestError, match="spec.grpo.topP"):
            validate_manifest(manifest)
    else:
        validate_manifest(manifest)


def test_every_problem_is_reported_not_just_the_first():
    manifest = _mutated(_mutated(BASE, "spec.grpo.numGenerations", 1), "spec.resources.memory", "lots")
    with pytest.raises(ManifestError) as raised:
        validate_manifest(manifest)
    assert {error.path for error in raised.value.errors} == {"spec.grpo.numGenerations", "spec.resources.memory"}


# ------------------------------------------------------------------------------------------ CLI


def test_cli_validate_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text(yaml.safe_dump(_mutated(BASE, "spec.grpo.topP", 2.0)))
    assert grpo(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "spec.grpo.topP" in err and "Traceback" not in err
    assert grpo(["validate", *map(str, EXAMPLES)]) == 0


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "cannot read the file"),
        ("spec: [unclosed", "not valid YAML"),
        ("a: 1\n---\nb: 2\n", "expected one YAML document"),
        ("- just\n- a list\n", "expected a mapping"),
        ("metadata: {name: caf\xe9}\n".encode("latin-1"), "not UTF-8 text (byte 20 is 0xe9)"),
        (b"spec: " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"a: '" + b"x" * (1 << 20) + b"'\n", "larger than 1024 KiB"),
    ],
    ids=["missing-file", "yaml-syntax", "two-documents", "not-a-mapping", "latin-1", "deep", "huge"],
)
def test_cli_validate_unreadable_input(tmp_path, capsys, content, words):
    path = tmp_path / "run.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert grpo(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err and "Traceback" not in err


def alias_bomb(levels: int) -> str:
    """Nested anchors: ``levels`` levels of nine aliases each stand for 9**levels strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """Kubernetes' CVE-2019-11253: a few hundred bytes that expand to 9**9 strings."""
    path = tmp_path / "run.yaml"
    text = (REPO / "examples" / "exp2-open-rs.yaml").read_text()
    path.write_text(alias_bomb(9) + text.replace("spec:", "spec:\n  resources: {tolerations: *l8}", 1))
    assert len(path.read_bytes()) < 2000
    started = time.monotonic()
    assert grpo(["validate", str(path)]) == 2
    assert time.monotonic() - started < 5
    assert "its aliases expand to more than 100,000 values" in capsys.readouterr().err


def test_anchors_that_expand_modestly_are_read_as_kubectl_reads_them(tmp_path):
    path = tmp_path / "run.yaml"
    text = (REPO / "examples" / "exp2-open-rs.yaml").read_text()
    path.write_text(text.replace("kind: GRPORun", "kind: &kind GRPORun\nx: *kind", 1).replace("\nx: *kind", "", 1))
    assert load_manifest(path).kind == "GRPORun"
    # The root, its 3 keys, and lists of 1 + 9, 1 + 9 × 10 and 1 + 9 × 91 values.
    assert _expanded_size(yaml.compose(alias_bomb(3))) == 1 + 3 + 10 + 91 + 820


def test_yaml_exponent_floats_are_numbers_as_kubectl_reads_them(tmp_path):
    path = tmp_path / "run.yaml"
    text = (REPO / "examples" / "exp2-open-rs.yaml").read_text()
    path.write_text(text.replace("maxCompletionLength: 3584", "maxCompletionLength: 3584\n    learningRate: 3e-6"))
    assert load_manifest(path).spec.grpo.learning_rate == 3e-6

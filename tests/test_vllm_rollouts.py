"""Rollouts from a server: the trainer's HTTP client against the reference server (tests/
reference_vllm_server.py, vLLM 0.34.0's contract, sampling on CPU in another process) and against
stub servers that fail in each way a real one can."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from grpo_trainer import vllm_client
from grpo_trainer.model import load_model, load_tokenizer, resolve_model_source
from grpo_trainer.spec import RolloutSpec
from grpo_trainer.train import _completion_logps, _padded_batch
from grpo_trainer.vllm_client import RolloutServerError, ServerSampler, request_seed

REFERENCE_SERVER = Path(__file__).resolve().parent / "reference_vllm_server.py"
PROMPTS = ([1, 28, 339, 314, 216, 3123], [1, 504, 28, 2], [1, 42, 43, 44, 45, 46, 47, 48, 49])
SAMPLING = dict(num_generations=3, max_new_tokens=10, temperature=0.7, top_p=1.0)


@contextmanager
def reference_server(model_dir: Path, *flags: str):
    """The reference server in its own process, on a free loopback port; yields its URL."""
    process = subprocess.Popen([sys.executable, str(REFERENCE_SERVER), str(model_dir), *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, f"reference server did not start: {line!r} {process.stderr.read() if process.poll() else ''}"
        yield match.group(1)
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    with reference_server(tiny_model_dir) as url:
        yield url


def sampler(url: str, eos_ids=(2,), **rollout) -> ServerSampler:
    return ServerSampler(url, eos_token_ids=list(eos_ids), rollout=RolloutSpec(backend="server", **rollout))


# ------------------------------------------------------------------------- the reference server


def test_server_logprobs_equal_the_trainers_recomputation(server_url, tiny_model_dir):
    """What importance sampling compares: the log-prob the server reports for each sampled token
    and the one the trainer computes for it with a forward pass, float32, within 1e-5."""
    location = resolve_model_source(str(tiny_model_dir))
    tokenizer = load_tokenizer(location)
    client = sampler(server_url, eos_ids=[tokenizer.eos_token_id])
    client.wait_until_ready()
    rollouts = client.generate([list(p) for p in PROMPTS], seed=11, **SAMPLING)

    assert len(rollouts) == 9 and rollouts.prompt_ids == [list(p) for p in PROMPTS for _ in range(3)]
    assert rollouts.weight_versions == ["default"]
    for ids, truncated in zip(rollouts.completion_ids, rollouts.truncated, strict=True):
        assert 1 <= len(ids) <= 10 and tokenizer.eos_token_id not in ids[:-1]
        assert truncated == (ids[-1] != tokenizer.eos_token_id)
    model = load_model(location, tokenizer, dtype="float32", device="cpu").eval()
    batch = _padded_batch(rollouts, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        recomputed, _ = _completion_logps(model, batch, SAMPLING["temperature"])
    mask = batch.completion_mask.bool()
    assert batch.sampler_logps.dtype == recomputed.dtype == torch.float32
    difference = (recomputed - batch.sampler_logps)[mask].abs().max().item()
    assert difference <= 1e-5, difference


def test_the_same_seed_gives_the_same_completions(server_url):
    client = sampler(server_url)
    first = client.generate([list(PROMPTS[0])], seed=5, **SAMPLING)
    assert client.generate([list(PROMPTS[0])], seed=5, **SAMPLING).completion_ids == first.completion_ids
    assert client.generate([list(PROMPTS[0])], seed=6, **SAMPLING).completion_ids != first.completion_ids


def test_request_seeds_keep_every_completion_stream_distinct():
    """vLLM seeds completion k of a request with seed + k: no two completions of a step or of
    neighbouring steps may share a stream."""
    streams = [request_seed(step_seed, prompt, 6) + k for step_seed in range(3) for prompt in range(40) for k in range(6)]
    assert len(set(streams)) == len(streams)
    assert 0 <= request_seed(10**12, 5, 16) < 2**63


def test_what_the_reference_server_does_not_sample_is_refused_naming_the_field(server_url):
    with pytest.raises(RolloutServerError, match=r"HTTP 400: top_p < 1"):
        sampler(server_url).generate([list(PROMPTS[0])], seed=1, **{**SAMPLING, "top_p": 0.9})


# --------------------------------------------------------------------------------- stub servers


@contextmanager
def stub_server(handle):
    """A loopback HTTP server answering every request with ``handle(handler)``; yields its URL."""
    handler = type("Stub", (BaseHTTPRequestHandler,), {
        "do_GET": handle, "do_POST": handle, "log_message": lambda *args: None,
    })
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def _answer(handler, status: int, body: dict | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def test_a_server_failing_twice_with_5xx_is_retried(monkeypatch):
    monkeypatch.setattr(vllm_client, "RETRY_PAUSE_SECONDS", 0.0)
    statuses = iter([503, 502, 200])
    choice = {"index": 0, "token_ids": [5, 2], "logprobs": {"token_logprobs": [-1.5, -0.5]}, "finish_reason": "stop"}

    def handle(handler):
        status = next(statuses)
        _answer(handler, status, {"choices": [choice]} if status == 200 else {"error": {"message": "restarting"}})

    with stub_server(handle) as url:
        rollouts = sampler(url).generate([[1, 2]], seed=1, **{**SAMPLING, "num_generations": 1})
    assert (rollouts.completion_ids, rollouts.sampler_logprobs, rollouts.truncated) == ([[5, 2]], [[-1.5, -0.5]], [False])


def test_a_server_answering_5xx_every_time_fails_naming_url_and_error(monkeypatch):
    monkeypatch.setattr(vllm_client, "RETRY_PAUSE_SECONDS", 0.0)
    calls = []

    def handle(handler):
        calls.append(handler.path)
        _answer(handler, 500, {"error": {"message": "EngineCore died\ntraceback", "code": 500}})

    with stub_server(handle) as url:
        with pytest.raises(RolloutServerError) as raised:
            sampler(url).generate([[1, 2]], seed=1, **SAMPLING)
    assert str(raised.value) == f"vLLM server at {url}: POST /v1/completions failed: HTTP 500: EngineCore died"
    assert calls == ["/v1/completions"] * (vllm_client.RETRIES + 1)


def test_a_request_the_server_holds_past_the_timeout_fails_without_retry():
    calls = []

    def handle(handler):
        calls.append(handler.path)
        time.sleep(3)
        _answer(handler, 200, {"choices": []})

    with stub_server(handle) as url:
        began = time.monotonic()
        with pytest.raises(RolloutServerError, match=re.escape(f"vLLM server at {url}: POST /v1/completions failed: "
                                                                "no answer within 1 s")):
            sampler(url, request_timeout_seconds=1).generate([[1, 2]], seed=1, **SAMPLING)
        assert time.monotonic() - began < 2.5 and calls == ["/v1/completions"]


def test_an_absent_server_fails_readiness_naming_its_url(unused_tcp_port):
    url = f"http://127.0.0.1:{unused_tcp_port}"
    began = time.monotonic()
    with pytest.raises(RolloutServerError, match=re.escape(f"vLLM server at {url}: not ready after 2 s (GET /health: ")):
        sampler(url, startup_timeout_seconds=2).wait_until_ready()
    assert 2 <= time.monotonic() - began < 4


def test_a_server_still_loading_is_waited_for(monkeypatch):
    monkeypatch.setattr(vllm_client, "HEALTH_POLL_SECONDS", 0.05)
    answers = iter([503, 503, 200])

    with stub_server(lambda handler: _answer(handler, next(answers))) as url:
        sampler(url, startup_timeout_seconds=5).wait_until_ready()


def test_a_wrong_number_of_completions_is_not_taken():
    def handle(handler):
        choice = {"index": 0, "token_ids": [5], "logprobs": {"token_logprobs": [-1.0]}, "finish_reason": "stop"}
        _answer(handler, 200, {"choices": [choice]})

    with stub_server(handle) as url:
        with pytest.raises(RolloutServerError, match="1 completions for a prompt, asked for 3"):
            sampler(url).generate([[1, 2]], seed=1, **SAMPLING)


# ------------------------------------------------------------------------------------ grpo train


def test_grpo_train_without_its_server_exits_retryable_naming_the_url(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                      unused_tcp_port):
    from test_train import manifest

    from grpo_trainer.cli import main as grpo
    from grpo_trainer.termination import EXIT_RETRYABLE

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    monkeypatch.setenv("GRPO_VLLM_URL", url)
    run = manifest(tiny_model_dir)
    run["spec"]["rollout"] = {"backend": "server", "startupTimeoutSeconds": 1}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(run))
    assert grpo(["train", str(path), "--run-dir", str(tmp_path / "runs")]) == EXIT_RETRYABLE
    assert f"{path}: vLLM server at {url}: not ready after 1 s (GET /health: " in capsys.readouterr().err

"""Rollouts from the vLLM sidecar: the :class:`~grpo_trainer.rollout.Sampler` the trainer uses when
spec.rollout.backend is ``server``.

Each prompt is one ``POST /v1/completions`` with the prompt's token ids, n = numGenerations and
every sampling field spelled out (the server ignores the model's generation config), asking for
token ids and the sampled token's log-prob back. Prompts go out concurrently, at most
spec.rollout.maxConcurrentRequests at a time, each with a timeout; what fails names the server's
URL. Written against vLLM 0.34.0's CompletionRequest / CompletionResponse (vllm_server.VLLM_VERSION);
the fields used are checked against tests/fixtures/vllm-0.34.0-contract.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from grpo_trainer.rollout import Rollouts
from grpo_trainer.spec import RolloutSpec
from grpo_trainer.vllm_server import DEFAULT_PORT, HOST, SERVER_URL_VARIABLE

logger = logging.getLogger(__name__)

COMPLETIONS_ROUTE = "/v1/completions"
HEALTH_ROUTE = "/health"
MAX_PROMPTS_PER_CALL = 1 << 16  # spaces the per-prompt seeds; far above any step's prompts per rank
RETRIES = 2  # of a request the server answered 5xx or could not be reached for (it may be restarting)
RETRY_PAUSE_SECONDS = 1.0
HEALTH_POLL_SECONDS = 1.0


class RolloutServerError(RuntimeError):
    """The server is absent, failed a request, or answered something unusable; the message names its URL."""


def server_url() -> str:
    """The server the trainer samples from: $GRPO_VLLM_URL (the operator sets it), else the
    sidecar's default loopback address."""
    return os.environ.get(SERVER_URL_VARIABLE, f"http://{HOST}:{DEFAULT_PORT}").rstrip("/")


def request_seed(step_seed: int, prompt_index: int, num_generations: int) -> int:
    """The seed of one prompt's request. vLLM seeds completion k of a request with seed + k
    (vllm/v1/engine/parallel_sampling.py), so requests are spaced num_generations apart to keep
    every completion's stream distinct; kept within vLLM's int64 bound."""
    return (step_seed * MAX_PROMPTS_PER_CALL + prompt_index) * num_generations % (1 << 63)


def completion_request(
    prompt: Sequence[int],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop_token_ids: Sequence[int],
) -> dict[str, Any]:
    """The body of one prompt's ``/v1/completions`` request. Every field that shapes the sampled
    distribution is explicit, at the value the trainer's log-probs assume (no top-k, min-p or
    penalties), so neither the server's defaults nor the model's generation config can change it."""
    return {
        "prompt": list(prompt),
        "n": num_generations,
        "seed": seed,
        "max_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": 0,  # 0: no top-k (vLLM's own neutral value)
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_tokens": 0,
        "ignore_eos": False,
        # The trainer's EOS set (tokenizer and generation config), whatever the server would infer.
        "stop_token_ids": list(stop_token_ids),
        "logprobs": 0,  # the sampled token's log-prob only
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,  # no detokenised strings in the log-prob entries
        "return_weight_versions": True,
        "stream": False,
        "echo": False,
    }


class ServerSampler:
    """Samples from a vLLM server over HTTP; see the module docstring."""

    def __init__(self, url: str, *, eos_token_ids: Sequence[int], rollout: RolloutSpec):
        self.url = url.rstrip("/")
        self.eos_token_ids = list(eos_token_ids)
        self.rollout = rollout

    def wait_until_ready(self) -> None:
        """Return once GET /health answers 200; a RolloutServerError naming the URL when it has
        not within spec.rollout.startupTimeoutSeconds."""
        url = self.url + HEALTH_ROUTE
        deadline = time.monotonic() + self.rollout.startup_timeout_seconds
        while True:
            try:
                timeout = max(min(deadline - time.monotonic(), 10.0), 0.1)
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    if response.status == 200:
                        return
                    problem = f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code}"
            except (urllib.error.URLError, OSError) as error:
                problem = _reason(error)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RolloutServerError(
                    f"vLLM server at {self.url}: not ready after {self.rollout.startup_timeout_seconds} s "
                    f"(GET {HEALTH_ROUTE}: {problem})"
                )
            logger.info("waiting for the vLLM server at %s (%s)", self.url, problem)
            time.sleep(min(HEALTH_POLL_SECONDS, remaining))

    def generate(self, prompts, *, num_generations, max_new_tokens, temperature, top_p, seed) -> Rollouts:
        if len(prompts) > MAX_PROMPTS_PER_CALL:
            raise ValueError(f"{len(prompts)} prompts in one call; at most {MAX_PROMPTS_PER_CALL}")
        bodies = [
            completion_request(
                prompt,
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=request_seed(seed, index, num_generations),
                stop_token_ids=self.eos_token_ids,
            )
            for index, prompt in enumerate(prompts)
        ]
        responses = self._post_all(bodies)
        rollouts, versions = Rollouts([], [], [], []), []
        for prompt, response in zip(prompts, responses, strict=True):
            self._collect(list(prompt), response, num_generations, rollouts, versions)
        rollouts.weight_versions = versions
        return rollouts

    def _post_all(self, bodies: list[dict]) -> list[dict]:
        """Every body's response, in order, with at most maxConcurrentRequests in flight; the first
        failure cancels what has not started and is raised."""
        workers = min(self.rollout.max_concurrent_requests, len(bodies)) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollout") as pool:
            futures = [pool.submit(self._post, COMPLETIONS_ROUTE, body) for body in bodies]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((future for future in futures if future in done and future.exception()), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                failed.result()  # raises its exception
            return [future.result() for future in futures]

    def _post(self, route: str, body: dict) -> dict:
        """POST ``body`` as JSON and return the JSON answer. Unreachable servers and 5xx answers
        are retried RETRIES times (a restarting sidecar comes back); a timeout is not (the server
        is busy or stuck, and another wait as long helps neither)."""
        request = json_request(self.url + route, body)
        for attempt in range(RETRIES + 1):
            try:
                return call_json(request, self.rollout.request_timeout_seconds)
            except HTTPCallError as error:
                problem = error.problem
                if not error.retryable:
                    break
            if attempt < RETRIES:
                logger.warning("vLLM server at %s: POST %s failed (%s); retrying", self.url, route, problem)
                time.sleep(RETRY_PAUSE_SECONDS * (attempt + 1))
        raise RolloutServerError(f"vLLM server at {self.url}: POST {route} failed: {problem}")

    def _collect(
        self, prompt: list[int], response: dict, num_generations: int, rollouts: Rollouts, versions: list[str]
    ) -> None:
        """Append one prompt's completions, in choice order, to ``rollouts``, and the weight versions
        that sampled them, first seen first, to ``versions``."""
        choices = sorted(response.get("choices") or [], key=lambda choice: choice["index"])
        if len(choices) != num_generations:
            raise RolloutServerError(
                f"vLLM server at {self.url}: {len(choices)} completions for a prompt, asked for {num_generations}"
            )
        for choice in choices:
            token_ids = choice.get("token_ids")
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if token_ids is None or logprobs is None or len(logprobs) != len(token_ids) or None in logprobs:
                raise RolloutServerError(
                    f"vLLM server at {self.url}: a completion without token ids or a log-prob per token"
                )
            # "length": max_tokens (or the model's length) ran out before a stop token.
            rollouts.add(prompt, token_ids, logprobs, truncated=choice.get("finish_reason") == "length")
            for span in choice.get("weight_versions") or []:
                if span["version"] not in versions:
                    versions.append(span["version"])


class HTTPCallError(Exception):
    """A JSON call to the server that failed: ``problem`` says how, in one line; ``retryable``
    for what a restarting server recovers from (a refused connection, a 5xx)."""

    def __init__(self, problem: str, *, retryable: bool):
        super().__init__(problem)
        self.problem, self.retryable = problem, retryable


def json_request(url: str, body: dict | None) -> urllib.request.Request:
    """A POST of ``body`` as JSON (an empty body when None)."""
    data = json.dumps(body).encode() if body is not None else b""
    return urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})


def call_json(request: urllib.request.Request | str, timeout: float) -> dict:
    """Send ``request`` (or GET a URL) and return its JSON answer, or raise HTTPCallError."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
    except urllib.error.HTTPError as error:
        raise HTTPCallError(f"HTTP {error.code}: {_error_text(error)}", retryable=error.code >= 500) from None
    except (TimeoutError, urllib.error.URLError, OSError) as error:
        if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
            raise HTTPCallError(f"no answer within {timeout:g} s", retryable=False) from None
        raise HTTPCallError(_reason(error), retryable=True) from None
    try:
        return json.loads(text or b"{}")
    except ValueError:
        raise HTTPCallError("an answer that is not JSON", retryable=False) from None


def _reason(error: OSError) -> str:
    reason = getattr(error, "reason", error)
    return getattr(reason, "strerror", None) or str(reason)


def _error_text(error: urllib.error.HTTPError) -> str:
    """The first line of the server's error body (vLLM answers {"error": {"message": ...}})."""
    try:
        body = json.loads(error.read() or b"{}")
        message = body.get("error", body)
        text = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, AttributeError, OSError):
        text = error.reason
    return str(text).splitlines()[0][:300] if text else str(error.reason)

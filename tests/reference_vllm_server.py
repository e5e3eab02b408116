"""A stand-in for the vLLM sidecar on CPU: the same HTTP contract, sampling with the policy itself.

    python tests/reference_vllm_server.py MODEL_DIR [--port 0] [--fail-status 503 --fail-count 2] [--delay 5]

Serves ``GET /health``, ``POST /v1/completions`` and ``GET /weight_info`` as vLLM 0.34.0 does
(tests/fixtures/vllm-0.34.0-contract.json), and prints ``listening on http://127.0.0.1:PORT`` once
it accepts requests. A completion is sampled by :class:`grpo_trainer.rollout.TransformersSampler`
in float32, seeded by the request, with the sampled token's log-prob at the temperature: what vLLM's
``processed_logprobs`` reports when no top-p, top-k, min-p or penalty changes the distribution.
Requests that would need those are refused (400), as are fields vLLM's CompletionRequest does not
have, so a client that passes here uses only what the pinned vLLM accepts.

Fault injection for the client's tests: ``--fail-status S --fail-count N`` answers the first N
completion requests with HTTP S; ``--delay SECONDS`` holds every completion answer that long.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CONTRACT = Path(__file__).resolve().parent / "fixtures" / "vllm-0.34.0-contract.json"
WEIGHT_VERSION = "default"  # vLLM's label of the weights it loaded, before any update
NEUTRAL = {"top_k": (0, -1), "min_p": (0.0,), "repetition_penalty": (1.0,), "presence_penalty": (0.0,),
           "frequency_penalty": (0.0,), "min_tokens": (0,), "ignore_eos": (False,), "stream": (False,),
           "echo": (False,), "logprobs": (0,)}


class BadRequest(Exception):
    pass


class ReferenceServer:
    def __init__(self, model_dir: str, contract: dict, fail_status: int, fail_count: int, delay: float):
        import torch
        from transformers import AutoTokenizer

        from grpo_trainer.model import load_model, resolve_model_source
        from grpo_trainer.rollout import TransformersSampler

        torch.set_num_threads(1)
        location = resolve_model_source(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(location.path)
        self.model = load_model(location, self.tokenizer, dtype="float32", device="cpu")
        self.sampler_class = TransformersSampler
        self.request_fields = set(contract["models"]["CompletionRequest"])
        self.response_fields = {name: set(fields) for name, fields in contract["models"].items()}
        self.lock = threading.Lock()  # one sampling at a time: the model is not re-entrant
        self.fail_status, self.failures_left, self.delay = fail_status, fail_count, delay

    def complete(self, body: dict) -> dict:
        unknown = sorted(set(body) - self.request_fields)
        if unknown:
            raise BadRequest(f"fields vLLM's CompletionRequest does not have: {unknown}")
        for name, allowed in NEUTRAL.items():
            if name in body and body[name] not in allowed:
                raise BadRequest(f"{name}={body[name]!r}: the reference server samples only with {name} in {allowed}")
        if body.get("top_p", 1.0) != 1.0:
            # vLLM's processed_logprobs renormalise over the nucleus; the trainer's do not.
            raise BadRequest("top_p < 1: the reference server does not reproduce vLLM's nucleus-renormalised log-probs")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(token, int) for token in prompt)):
            raise BadRequest("prompt must be one list of token ids")
        n = body.get("n", 1)
        stop_ids = list(body.get("stop_token_ids") or [])
        eos_ids = sorted({self.tokenizer.eos_token_id, *stop_ids} - {None})
        sampler = self.sampler_class(self.model, eos_token_ids=eos_ids, pad_token_id=self.tokenizer.pad_token_id)
        with self.lock:
            rollouts = sampler.generate(
                [prompt], num_generations=n, max_new_tokens=body.get("max_tokens", 16),
                temperature=body.get("temperature", 1.0), top_p=1.0, seed=body.get("seed") or 0,
            )
        choices = []
        for index, (ids, logprobs, truncated) in enumerate(
            zip(rollouts.completion_ids, rollouts.sampler_logprobs, rollouts.truncated)
        ):
            tokens = [f"token_id:{token}" for token in ids]
            choices.append({
                "index": index,
                "text": self.tokenizer.decode(ids),
                "logprobs": {"text_offset": [], "token_logprobs": [max(lp, -9999.0) for lp in logprobs],
                             "tokens": tokens, "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)]},
                "finish_reason": "length" if truncated else "stop",
                "stop_reason": None if truncated or ids[-1] == self.tokenizer.eos_token_id else ids[-1],
                "token_ids": ids if body.get("return_token_ids") else None,
                "weight_versions": [{"version": WEIGHT_VERSION, "start": 0, "end": len(ids)}]
                if body.get("return_weight_versions") else None,
            })
        response = {"id": f"cmpl-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
                    "model": "reference", "choices": choices,
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": sum(map(len, rollouts.completion_ids)),
                              "total_tokens": len(prompt) + sum(map(len, rollouts.completion_ids))}}
        self._check_response(response)
        return response

    def _check_response(self, response: dict) -> None:
        """Answer only with fields vLLM's response models have."""
        parts = [("CompletionResponse", response)]
        for choice in response["choices"]:
            parts += [("CompletionResponseChoice", choice), ("CompletionLogProbs", choice["logprobs"])]
            parts += [("WeightVersionSpan", span) for span in choice["weight_versions"] or []]
        for model, part in parts:
            extra = set(part) - self.response_fields[model]
            assert not extra, f"{model} has no fields {extra}"


def handler_for(server: ReferenceServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            if self.path == "/health":
                self._answer(200, None)
            elif self.path == "/weight_info":
                self._answer(200, {"weight_version": WEIGHT_VERSION})
            else:
                self._answer(404, {"detail": "Not Found"})

        def do_POST(self):  # noqa: N802
            if self.path != "/v1/completions":
                return self._answer(404, {"detail": "Not Found"})
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            time.sleep(server.delay)
            with server.lock:
                failing = server.failures_left > 0
                server.failures_left -= failing
            if failing:
                return self._answer(server.fail_status, _error(server.fail_status, "injected failure"))
            try:
                self._answer(200, server.complete(body))
            except BadRequest as error:
                self._answer(400, _error(400, str(error)))

        def _answer(self, status: int, body: dict | None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def _error(status: int, message: str) -> dict:
    """vLLM's ErrorResponse shape."""
    return {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                      "param": None, "code": status}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--fail-count", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = ReferenceServer(args.model, json.loads(CONTRACT.read_text()), args.fail_status, args.fail_count, args.delay)
    with ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(server)) as http:
        print(f"listening on http://127.0.0.1:{http.server_address[1]}", flush=True)
        http.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

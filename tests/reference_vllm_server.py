"""A stand-in for the vLLM sidecar on CPU: the same HTTP contract, sampling with the policy itself.

    python tests/reference_vllm_server.py MODEL [--port 0] [--fail-status 503 --fail-count 2] [--delay 5]

Serves, as vLLM 0.34.0 does (tests/fixtures/vllm-0.34.0-contract.json), ``GET /health``,
``POST /v1/completions`` and the development-mode routes of the weight sync: ``/pause``,
``/resume``, ``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
``/finish_weight_update``, ``/reset_prefix_cache``, ``/collective_rpc`` (``reload_weights`` from a
folder of safetensors), ``/update_weight_version`` and ``GET /weight_info``. It prints ``listening on
http://127.0.0.1:PORT`` once it accepts requests.

A completion is sampled by :class:`grpo_trainer.rollout.TransformersSampler` in float32, seeded by
the request, with the sampled token's log-prob at the temperature: what vLLM's ``processed_logprobs``
reports when no top-p, top-k, min-p or penalty changes the distribution. Requests that would need
those are refused (400), as are fields vLLM's models do not have, so a client that passes here uses
only what the pinned vLLM accepts.

Weights arrive as vLLM's NCCL engine receives them, over a gloo group instead of NCCL: the server
joins the trainer's TCPStore rendezvous at ``rank_offset``, and for each ``/update_weights`` cuts the
packed uint8 buffers back into tensors by the names, dtypes and shapes of the body (the rule of
vllm/distributed/weight_transfer/packed_tensor.py); they replace the policy's at
``/finish_weight_update``, which labels them.

Fault injection for the client's tests: ``--fail-status S --fail-count N`` answers the first N
completion requests with HTTP S; ``--delay SECONDS`` holds every completion answer that long.
``POST /_faults`` (test-only, no vLLM route) sets rules for the sync routes, each
``{"route": R, "action": A, "skip": K, "count": N, ...}``: after K requests to R, the next N get A:
``delay`` (handled, answered ``seconds`` late), ``status`` (answered ``status``, not handled),
``hang`` (never answered, nothing received), ``version`` (``/weight_info`` says ``version``),
``restart`` (base weights and "default" again, groups left, as a restarted sidecar; then handled;
``/v1/completions`` and ``GET /weight_info`` take it too). ``{"restart": true}`` restarts at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

CONTRACT = Path(__file__).resolve().parent / "fixtures" / "vllm-0.34.0-contract.json"
NEUTRAL = {"top_k": (0, -1), "min_p": (0.0,), "repetition_penalty": (1.0,), "presence_penalty": (0.0,),
           "frequency_penalty": (0.0,), "min_tokens": (0,), "ignore_eos": (False,), "stream": (False,),
           "echo": (False,), "logprobs": (0,)}
GROUP_TIMEOUT = timedelta(seconds=30)  # a broadcast the trainer abandoned ends the handler's wait


class BadRequest(Exception):
    pass


class ServerFailure(Exception):
    """vLLM would answer 500 (an engine error)."""


class ReferenceServer:
    def __init__(self, model_dir: str, contract: dict, fail_status: int, fail_count: int, delay: float):
        import torch

        from grpo_trainer.model import load_model, load_tokenizer, resolve_model_source
        from grpo_trainer.rollout import TransformersSampler

        torch.set_num_threads(1)
        location = resolve_model_source(model_dir)
        self.tokenizer = load_tokenizer(location)  # a GGUF file's too
        self.model = load_model(location, self.tokenizer, dtype="float32", device="cpu")
        self.base_weights = {name: tensor.clone() for name, tensor in self.model.state_dict().items()}
        self.sampler_class = TransformersSampler
        self.contract = contract
        self.request_fields = set(contract["models"]["CompletionRequest"])
        self.response_fields = {name: set(fields) for name, fields in contract["models"].items()}
        self.lock = threading.Lock()  # one sampling or weight load at a time: the model is not re-entrant
        self.fail_status, self.failures_left, self.delay = fail_status, fail_count, delay
        self.weight_version = contract["initialWeightVersion"]
        self.paused = False
        self.transfer: dict | None = None  # the init info and the group of the weight-transfer engine
        self.received: dict = {}  # tensors of the update in progress, loaded at finish
        self.faults: list[dict] = []
        self.stopping = threading.Event()

    # ---------------------------------------------------------------------------- completions

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
            version = self.weight_version
            rollouts = sampler.generate(
                [prompt], num_generations=n, max_new_tokens=body.get("max_tokens", 16),
                temperature=body.get("temperature", 1.0), top_p=1.0, seed=body.get("seed") or 0,
            )
        choices = []
        for index, (ids, logprobs, truncated) in enumerate(
            zip(rollouts.completion_ids, rollouts.sampler_logprobs, rollouts.truncated, strict=True)
        ):
            tokens = [f"token_id:{token}" for token in ids]
            choices.append({
                "index": index,
                "text": self.tokenizer.decode(ids),
                "logprobs": {"text_offset": [], "token_logprobs": [max(lp, -9999.0) for lp in logprobs],
                             "tokens": tokens, "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)]},
                "finish_reason": "length" if truncated else "stop",
                "stop_reason": None if truncated or ids[-1] == self.tokenizer.eos_token_id else ids[-1],
                "token_ids": ids if body.get("return_token_ids") else None,
                "weight_versions": [{"version": version, "start": 0, "end": len(ids)}]
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

    # ---------------------------------------------------------------------------- weight sync

    def sync_route(self, route: str, query: dict, body: dict) -> dict | None:
        """Answer one of the weight-sync routes as vLLM 0.34.0 does."""
        declared = self.contract["routes"][route]
        unknown = sorted(set(body) - set(declared["body"])) + sorted(set(query) - set(declared["query"]))
        if unknown:
            raise BadRequest(f"{route} has no fields {unknown}")
        if route == "/pause":
            mode = query.get("mode", "abort")
            if mode not in self.contract["pauseModes"]:
                raise BadRequest(f"mode={mode!r}: not one of {self.contract['pauseModes']}")
            self.paused = True
            return {"status": "paused"}
        if route == "/resume":
            self.paused = False
            return {"status": "resumed"}
        if route == "/reset_prefix_cache":
            return {"success": True}  # no prefix cache: nothing is reused across weights
        if route == "/init_weight_transfer_engine":
            self._join(body["init_info"])
            return {"message": "Weight transfer initialized"}
        if route == "/start_weight_update":
            self.received = {}
            return {"message": "Weight update started"}
        if route == "/update_weights":
            self._receive(body["update_info"])
            return {"message": "Weights updated"}
        if route == "/finish_weight_update":
            self._load(self.received)
            self.received = {}
            if body.get("weight_version") is not None:
                self.weight_version = body["weight_version"]
            return {"message": "Weight update finished"}
        if route == "/update_weight_version":
            self.weight_version = body["new_version"]
            return {"success": True, "new_version": body["new_version"]}
        if route == "/collective_rpc":
            return self._collective_rpc(body)
        raise BadRequest(f"{route}: not a sync route")

    def _join(self, init_info: dict) -> None:
        """Join the trainer's group as rank rank_offset, as vLLM's worker_init_process_group does."""
        from torch.distributed import ProcessGroupGloo, TCPStore

        unknown = sorted(set(init_info) - set(self.contract["models"]["NCCLWeightTransferInitInfo"]))
        if unknown:
            raise BadRequest(f"init_info has no fields {unknown}")
        store = TCPStore(init_info["master_address"], init_info["master_port"], init_info["world_size"], False,
                         timeout=GROUP_TIMEOUT)
        options = ProcessGroupGloo._Options()
        options._timeout = GROUP_TIMEOUT
        options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        group = ProcessGroupGloo(store, init_info["rank_offset"], init_info["world_size"], options)
        self.transfer = {**init_info, "group": group, "store": store}

    def _receive(self, update_info: dict) -> None:
        """Receive one round of packed buffers: each holds tensors in name order until it holds
        more than packed_buffer_size_bytes, as vLLM's packed consumer cuts them."""
        import torch
        from torch.distributed import BroadcastOptions

        unknown = sorted(set(update_info) - set(self.contract["models"]["NCCLWeightTransferUpdateInfo"]))
        if unknown:
            raise BadRequest(f"update_info has no fields {unknown}")
        if self.transfer is None:
            raise ServerFailure("NCCL weight transfer not initialized. Call init_transfer_engine() first.")
        assert self.transfer["packed"], "the trainer sends packed"
        options = BroadcastOptions()
        options.rootRank = update_info.get("src", 0)
        entries = [(name, getattr(torch, dtype), shape) for name, dtype, shape in
                   zip(update_info["names"], update_info["dtype_names"], update_info["shapes"], strict=True)]
        while entries:
            chunk, size = [], 0
            while entries and size <= self.transfer["packed_buffer_size_bytes"]:
                name, dtype, shape = entries.pop(0)
                chunk.append((name, dtype, shape, math.prod(shape) * dtype.itemsize))
                size += chunk[-1][3]
            buffer = torch.empty(size, dtype=torch.uint8)
            self.transfer["group"].broadcast([buffer], options).wait()
            for (name, dtype, shape, _), part in zip(chunk, buffer.split([entry[3] for entry in chunk]), strict=True):
                self.received[name] = part.view(dtype).view(shape)

    def _collective_rpc(self, body: dict) -> dict:
        """reload_weights(weights_path=FOLDER): every *.safetensors in FOLDER, as vLLM's default loader reads it."""
        from safetensors.torch import load_file

        method, kwargs = body.get("method"), body.get("kwargs") or {}
        if method not in self.contract["workerMethods"]:
            raise BadRequest(f"method {method!r}: the trainer calls only {sorted(self.contract['workerMethods'])}")
        unknown = sorted(set(kwargs) - set(self.contract["workerMethods"][method]))
        if unknown:
            raise BadRequest(f"{method} has no parameters {unknown}")
        files = sorted(Path(kwargs["weights_path"]).glob("*.safetensors"))
        if not files:
            raise ServerFailure(f"Cannot find any model weights with {kwargs['weights_path']!r}")
        weights = {}
        for file in files:
            weights.update(load_file(file))
        self._load(weights)
        return {"results": [None]}

    def _load(self, weights: dict) -> None:
        """Copy ``weights`` into the policy, by name; a name the model lacks fails, as load_weights does."""
        import torch

        parameters = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(parameters))
        if unknown:
            raise ServerFailure(f"There is no module or parameter named {unknown[0]!r} in the model")
        with self.lock, torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(tensor)

    def restart(self) -> None:
        """What a restarted sidecar looks like: the weights of spec.model.source, labelled "default",
        no transfer group, not paused."""
        with self.lock:
            self.model.load_state_dict(self.base_weights)
            self.weight_version = self.contract["initialWeightVersion"]
            self.transfer, self.received, self.paused = None, {}, False

    def fault(self, route: str) -> dict | None:
        """The rule that applies to this request to ``route``, counting it."""
        with self.lock:
            for rule in self.faults:
                if rule["route"] != route:
                    continue
                if rule.get("skip", 0) > 0:
                    rule["skip"] -= 1
                elif rule.get("count", 1) > 0:
                    rule["count"] = rule.get("count", 1) - 1
                    return rule
        return None


def handler_for(server: ReferenceServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            route = urlsplit(self.path).path
            rule = server.fault(route)
            if route == "/health":
                self._answer(200, None)
            elif route == "/weight_info":
                if rule and rule["action"] == "restart":
                    server.restart()
                version = rule["version"] if rule and rule["action"] == "version" else server.weight_version
                self._answer(200, {"weight_version": version})
            else:
                self._answer(404, {"detail": "Not Found"})

        def do_POST(self):  # noqa: N802
            url = urlsplit(self.path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if url.path == "/v1/completions":
                return self._complete(body)
            if url.path == "/_faults":
                server.faults = body.get("rules", [])
                if body.get("restart"):
                    server.restart()
                return self._answer(200, {})
            if url.path not in server.contract["routes"]:
                return self._answer(404, {"detail": "Not Found"})
            rule = server.fault(url.path)
            action = rule["action"] if rule else None
            if action == "status":
                return self._answer(rule["status"], _error(rule["status"], "injected failure"))
            if action == "hang":
                server.stopping.wait()
                return None
            if action == "restart":
                server.restart()
            query = {name: values[-1] for name, values in parse_qs(url.query).items()}
            try:
                answer = 200, server.sync_route(url.path, query, body)
            except BadRequest as error:
                answer = 400, _error(400, str(error))
            except (ServerFailure, RuntimeError) as error:
                answer = 500, _error(500, str(error))
            if action == "delay":
                time.sleep(rule["seconds"])
            self._answer(*answer)

        def _complete(self, body: dict) -> None:
            rule = server.fault("/v1/completions")
            if rule and rule["action"] == "restart":  # the sidecar came back while the trainer waited
                server.restart()
            time.sleep(server.delay)
            with server.lock:
                failing = server.failures_left > 0
                server.failures_left -= failing
            if failing:
                return self._answer(server.fail_status, _error(server.fail_status, "injected failure"))
            if server.paused:  # vLLM's answer in abort and wait modes until /resume
                return self._answer(503, _error(503, "Generation is paused"))
            try:
                self._answer(200, server.complete(body))
            except BadRequest as error:
                self._answer(400, _error(400, str(error)))

        def _answer(self, status: int, body: dict | None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a delay fault)
                pass

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

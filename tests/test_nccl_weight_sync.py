"""The NCCL weight sender's sequencing, without a GPU: PackedBroadcast over NcclFormation, driving a
scripted NCCL (tests/nccl_doubles.py) against vLLM 0.34.0's weight-sync routes served in this
process by :class:`FakeVllm`, which checks every request against the contract fixture.

What these tests hold: the requests and their bodies, in order; the unique id as vLLM parses it;
the init request sent while this side's communicator init is in progress (the server answers only
after the warm-up, which the communicator issues only once the server has the request); the bytes
broadcast; and every failure (a refused or unanswered init, a broadcast that never completes, no
NCCL at all) ending in an abort and the /dev/shm path, never a hang. What NCCL itself does on a GPU
is benchmarks/weight_sync/gpu_nccl_check.py's to check.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from nccl_doubles import UNIQUE_ID, ScriptedNccl, vllm_unique_id_decoder

from grpo_trainer.weight_sync import NcclFormation, PackedBroadcast, ShmSafetensors, WeightSync, default_transports

pytestmark = pytest.mark.timeout(60)
CONTRACT = json.loads((Path(__file__).parent / "fixtures" / "vllm-0.34.0-contract.json").read_text())
PEER_WAIT = 10.0  # seconds the server waits for this side's half of a collective before it answers 500
BUFFER_BYTES = 64  # small packed buffers, so that the toy weights take several


class FakeVllm:
    """The weight-sync routes of a vLLM 0.34.0 server with the NCCL engine, its workers' side of
    NCCL played by :class:`ScriptedNccl`: /init_weight_transfer_engine lets the communicator form
    and answers once the warm-up all-reduce came, /update_weights lets the broadcasts complete and
    answers once their bytes came. ``log`` holds each request and NCCL call, in order.
    ``faults[route]``: ``("status", code)`` answers that at once, ``("hang",)`` never answers."""

    def __init__(self):
        self.log: list[tuple] = []
        self.version = CONTRACT["initialWeightVersion"]
        self.initialised = threading.Event()
        self.receiving = threading.Event()
        self.faults: dict[str, tuple] = {}
        self.update_starts_at = 0
        self.stopping = threading.Event()
        self.decode = vllm_unique_id_decoder(CONTRACT)
        self.nccl = ScriptedNccl(formed=self.initialised.is_set, completes=self._completes, calls=self.log)

    def _completes(self, call: tuple) -> bool:
        return (self.initialised if call[0] == "ncclAllReduce" else self.receiving).is_set()

    def requests(self) -> list[tuple]:
        return [entry for entry in self.log if entry[0] in ("GET", "POST")]

    def answer(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        route = CONTRACT["routes"].get(path)
        if route is None or route["method"] != method:
            return 404, {"detail": "Not Found"}
        unknown = sorted(set(body or {}) - set(route["body"])) + sorted(set(query) - set(route["query"]))
        if unknown:
            return 400, {"error": f"{path} has no fields {unknown}"}
        if path == "/weight_info":
            return 200, {"weight_version": self.version}
        if path in ("/pause", "/resume"):
            return 200, {"status": "ok"}
        if path == "/start_weight_update":
            self.update_starts_at = len(self.nccl.sent)  # the broadcasts may be enqueued before /update_weights comes
            return 200, {"message": "Weight update started"}
        if path == "/reset_prefix_cache":
            return 200, {"success": True}
        if path == "/init_weight_transfer_engine":
            return self._init(body["init_info"])
        if path == "/update_weights":
            return self._receive(body["update_info"])
        if path == "/finish_weight_update":
            self.version = body["weight_version"]
            return 200, {"message": "Weight update finished"}
        if path == "/collective_rpc":
            folder = Path(body["kwargs"]["weights_path"])
            assert body["method"] == "reload_weights" and list(folder.glob("*.safetensors")), body
            return 200, {"results": [None]}
        if path == "/update_weight_version":
            self.version = body["new_version"]
            return 200, {"success": True, "new_version": self.version}
        return 404, {"detail": "Not Found"}

    def _init(self, init_info: dict) -> tuple[int, dict]:
        unknown = sorted(set(init_info) - set(CONTRACT["models"]["NCCLWeightTransferInitInfo"]))
        if unknown:
            return 400, {"error": f"init_info has no fields {unknown}"}
        try:  # what NCCLWeightTransferInitInfo.__post_init__ runs
            self.decode(master_address=init_info.get("master_address"), master_port=init_info.get("master_port"),
                        nccl_unique_id_b64=init_info.get("nccl_unique_id_b64"), ctx="NCCLWeightTransferInitInfo")
        except ValueError as error:
            return 400, {"error": str(error)}
        self.receiving.clear()
        self.initialised.set()
        if not _eventually(lambda: "ncclAllReduce" in self.nccl.names()):
            return 500, {"error": "the trainer never issued the warm-up all-reduce"}
        return 200, {"message": "Weight transfer initialized"}

    def _receive(self, update_info: dict) -> tuple[int, dict]:
        unknown = sorted(set(update_info) - set(CONTRACT["models"]["NCCLWeightTransferUpdateInfo"]))
        if unknown:
            return 400, {"error": f"update_info has no fields {unknown}"}
        expected = sum(math.prod(shape) * getattr(torch, dtype).itemsize
                       for dtype, shape in zip(update_info["dtype_names"], update_info["shapes"], strict=True))
        self.receiving.set()
        if not _eventually(lambda: sum(map(len, self.nccl.sent[self.update_starts_at:])) == expected):
            return 500, {"error": "the broadcast never came"}
        self.receiving.clear()
        return 200, {"message": "Weights updated"}

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.log.append((method, self.path, body))
                fault = server.faults.get(url.path)
                if fault and fault[0] == "hang":
                    server.stopping.wait()
                    return
                query = {name: values[-1] for name, values in parse_qs(url.query).items()}
                status, answer = (fault[1], {"error": "injected"}) if fault else server.answer(method, url.path, query, body)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting
                    pass

            def log_message(self, *args):
                pass

        return Handler


def _eventually(condition, seconds: float = PEER_WAIT) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def vllm():
    server = FakeVllm()
    http = ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{http.server_address[1]}"
    yield server
    server.stopping.set()
    http.shutdown()
    http.server_close()


def nccl_sync(vllm: FakeVllm, timeout: float) -> WeightSync:
    formation = NcclFormation(timeout, vllm.nccl, device=torch.device("cpu"), current_stream=vllm.nccl.current_stream)
    sender = PackedBroadcast(timeout, formation=formation, server_workers=2, buffer_bytes=BUFFER_BYTES)
    return WeightSync(vllm.url, dtype=torch.float32, timeout=timeout, label=CONTRACT["initialWeightVersion"],
                      transports=[sender, ShmSafetensors()], wait_until_ready=lambda: None)


@pytest.fixture
def policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def weight_bytes(policy: torch.nn.Module) -> bytes:
    return b"".join(parameter.detach().contiguous().view(torch.uint8).numpy().tobytes()
                    for parameter in policy.parameters())


# --------------------------------------------------------------------------------- the sequence


def test_the_sender_calls_vllms_routes_in_order_with_the_contracts_bodies(vllm, policy):
    sync = nccl_sync(vllm, timeout=5)
    assert sync.push(policy, "1").transport == "nccl"
    first = [(method, path) for method, path, _ in vllm.requests()]
    assert first == [
        ("GET", "/weight_info"), ("POST", "/pause?mode=abort"), ("POST", "/init_weight_transfer_engine"),
        ("POST", "/start_weight_update"), ("POST", "/update_weights"), ("POST", "/finish_weight_update"),
        ("POST", "/reset_prefix_cache"), ("POST", "/resume"), ("GET", "/weight_info"),
    ]
    bodies = {path: body for _, path, body in vllm.requests()}
    assert bodies["/init_weight_transfer_engine"] == {"init_info": {
        "nccl_unique_id_b64": base64.b64encode(UNIQUE_ID).decode(),  # "+" and "/": the standard alphabet
        "rank_offset": 1, "world_size": 3, "packed": True, "packed_buffer_size_bytes": BUFFER_BYTES,
        "packed_num_buffers": CONTRACT["packedDefaults"]["numBuffers"],
    }}
    parameters = dict(policy.named_parameters())
    assert bodies["/update_weights"] == {"update_info": {
        "names": list(parameters), "dtype_names": ["float32"] * len(parameters),
        "shapes": [list(parameter.shape) for parameter in parameters.values()],
    }}
    assert bodies["/finish_weight_update"] == {"weight_version": "1"}
    # the packed buffers, cut where vLLM's consumer cuts them, carry the weights' bytes
    assert b"".join(vllm.nccl.sent) == weight_bytes(policy) and len(vllm.nccl.sent) > 1

    sync.push(policy, "2")  # the group, formed once, carries the next push
    assert [path for _, path, _ in vllm.requests()[len(first):]] == [
        "/weight_info", "/pause?mode=abort", "/start_weight_update", "/update_weights", "/finish_weight_update",
        "/reset_prefix_cache", "/resume", "/weight_info",
    ]
    assert vllm.nccl.names().count("ncclCommInitRankConfig") == 1 and vllm.version == "2"
    sync.close()
    assert vllm.nccl.names()[-1] == "ncclCommAbort"


def test_the_init_request_runs_while_the_communicator_forms(vllm, policy):
    """This side enters ncclCommInitRank before it asks the server (a local failure never reaches
    the server), the server's workers join while the request runs, and the warm-up follows."""
    nccl_sync(vllm, timeout=5).push(policy, "1")
    order = [entry[0] if entry[0].startswith("nccl") else entry[1] for entry in vllm.log]
    assert order.index("ncclGetUniqueId") < order.index("ncclCommInitRankConfig") \
        < order.index("/init_weight_transfer_engine") < order.index("ncclAllReduce") \
        < order.index("/start_weight_update")
    ((_, world_size, unique_id, rank),) = [call for call in vllm.log if call[0] == "ncclCommInitRankConfig"]
    assert (world_size, unique_id, rank) == (3, UNIQUE_ID, 0)
    init_info = next(body for _, path, body in vllm.requests() if path == "/init_weight_transfer_engine")["init_info"]
    assert vllm.decode(master_address=None, master_port=None, nccl_unique_id_b64=init_info["nccl_unique_id_b64"],
                       ctx="test") == unique_id


# ----------------------------------------------------------------------------------- failures


def test_a_refused_init_is_given_up_at_once_and_the_weights_go_through_shm(vllm, policy, caplog):
    vllm.faults["/init_weight_transfer_engine"] = ("status", 500)
    began = time.monotonic()
    report = nccl_sync(vllm, timeout=30).push(policy, "1")
    assert report.transport == "shm" and vllm.version == "1"
    assert time.monotonic() - began < 5  # not the 30 s of the timeout
    assert "weight sync of 1 by nccl failed: POST /init_weight_transfer_engine: HTTP 500" in caplog.text
    assert "ncclAllReduce" not in vllm.nccl.names() and vllm.nccl.names()[-1] == "ncclCommAbort"


def test_an_init_the_workers_never_join_is_aborted_at_the_timeout_then_shm(vllm, policy, caplog):
    vllm.faults["/init_weight_transfer_engine"] = ("hang",)
    began = time.monotonic()
    report = nccl_sync(vllm, timeout=1).push(policy, "1")
    assert report.transport == "shm" and time.monotonic() - began < 10
    assert "weight sync of 1 by nccl failed: POST /init_weight_transfer_engine" in caplog.text
    assert vllm.nccl.names()[-1] == "ncclCommAbort" and "ncclAllReduce" not in vllm.nccl.names()


def test_a_broadcast_that_never_completes_is_aborted_and_the_next_push_forms_a_new_group(vllm, policy, caplog):
    vllm.faults["/update_weights"] = ("hang",)  # the workers never receive
    sync = nccl_sync(vllm, timeout=1)
    assert sync.push(policy, "1").transport == "shm"
    assert "weight sync of 1 by nccl failed: " in caplog.text
    assert vllm.nccl.names().count("ncclCommAbort") == 1
    del vllm.faults["/update_weights"]
    assert sync.push(policy, "2").transport == "nccl"
    assert vllm.nccl.names().count("ncclCommInitRankConfig") == 2
    assert [path for _, path, _ in vllm.requests()].count("/init_weight_transfer_engine") == 2
    sync.close()


def test_on_a_gpu_without_nccl_the_weights_go_through_shm_alone(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GRPO_NCCL_LIBRARY", str(tmp_path / "libnccl.so.2"))
    with caplog.at_level(logging.WARNING):
        transports = default_transports(5, on_gpu=True, server_workers=1)
    assert [transport.name for transport in transports] == ["shm"]
    assert f"weight sync through /dev/shm only: the NCCL sender cannot load NCCL: GRPO_NCCL_LIBRARY={tmp_path}" \
        in caplog.text
    transports[0].close()

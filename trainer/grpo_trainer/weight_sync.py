"""Weight sync: the policy's weights into the vLLM sidecar after every optimizer step.

Trainer rank 0 drives vLLM 0.34.0's development-mode routes (docs/vllm-sidecar.md; every route,
body field and worker method used is in tests/fixtures/vllm-0.34.0-contract.json):

    POST /pause?mode=abort → push the weights (a transport, below) → POST /reset_prefix_cache
    → POST /resume → GET /weight_info, which must name the step

Two transports push the weights, tried in this order:

- :class:`PackedBroadcast`: ``/init_weight_transfer_engine`` once (the server's workers join a group
  as ranks 1, 2, ...), then per step ``/start_weight_update`` → ``/update_weights`` (names, dtypes,
  shapes) while rank 0 broadcasts the tensors packed as vLLM's packed_tensor.py unpacks them →
  ``/finish_weight_update`` with the step as the label. Over NCCL with a GPU server (the workers
  join by the unique id the trainer mints, :mod:`grpo_trainer.nccl`), over gloo on CPU (the
  reference server's stand-in).
- :class:`ShmSafetensors`: the weights as one safetensors file in a folder under /dev/shm (the
  pod's containers share it), loaded by ``/collective_rpc`` → the workers' ``reload_weights``
  (``weights_path``), then labelled by ``/update_weight_version``. 0.34.0 has no route that
  reloads from a folder; this worker method, reached through the generic RPC route, is the
  closest real mechanism.

Every call has spec.rollout.weightSyncTimeoutSeconds. A transport that fails is dropped for this
push (its group is torn down) and the next one tried; when both fail, :class:`WeightSyncError`
ends the attempt with EXIT_WEIGHT_SYNC, and the operator starts the pod again from the latest
checkpoint. A sidecar that restarted serves its base weights again (label "default"):
:meth:`WeightSync.ensure_current`, called before each rollout, pushes the current ones again.
"""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch

from grpo_trainer.engine import _free_port
from grpo_trainer.nccl import NcclGroup, NcclLibrary, NcclUnavailable, Stream, version_name
from grpo_trainer.vllm_client import HTTPCallError, call_json, json_request
from grpo_trainer.vllm_server import HOST

logger = logging.getLogger(__name__)

PAUSE_ROUTE = "/pause"
RESUME_ROUTE = "/resume"
RESET_PREFIX_CACHE_ROUTE = "/reset_prefix_cache"
WEIGHT_INFO_ROUTE = "/weight_info"
INIT_TRANSFER_ROUTE = "/init_weight_transfer_engine"
START_UPDATE_ROUTE = "/start_weight_update"
UPDATE_WEIGHTS_ROUTE = "/update_weights"
FINISH_UPDATE_ROUTE = "/finish_weight_update"
COLLECTIVE_RPC_ROUTE = "/collective_rpc"
UPDATE_VERSION_ROUTE = "/update_weight_version"
RELOAD_METHOD = "reload_weights"  # vllm/v1/worker/gpu_worker.py Worker.reload_weights
# abort: nothing of ours is in flight between steps, and whatever is (a request left over from a
# failed step) must not hold the pause until the timeout.
PAUSE_MODE = "abort"
INITIAL_VERSION = "default"  # what vLLM labels the weights it loaded itself (EngineCore.__init__)
PACKED_BUFFER_BYTES = 1 << 30  # vLLM's DEFAULT_PACKED_BUFFER_SIZE_BYTES
PACKED_BUFFERS = 2  # vLLM's DEFAULT_PACKED_NUM_BUFFERS: one packs while the other is on the wire


class WeightSyncError(RuntimeError):
    """The weights of a step did not reach the server by any transport; one line naming the
    server's URL and, for each transport, the call that failed."""


class PhaseFailed(Exception):
    """One call of a push failed: ``str()`` names the route and the problem."""


def layer_order(names: Sequence[str]) -> list[str]:
    """``names`` in the order vLLM's layerwise reload consumes them (weight_transfer/base.py):
    what comes before the first numbered layer (embeddings), the layers by index, then the rest
    (final norm, lm_head). Hugging Face's order already is this for a decoder-only LM; sorting
    keeps it so for any module whose parameters are registered in another order."""
    first_layer = next((i for i, name in enumerate(names) if _layer_index(name) is not None), len(names))

    def key(position: int) -> tuple[int, int, int]:
        index = _layer_index(names[position])
        if index is not None:
            return 1, index, position
        return (0 if position < first_layer else 2), 0, position

    return [names[position] for position in sorted(range(len(names)), key=key)]


def _layer_index(name: str) -> int | None:
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def serving_weights(module: torch.nn.Module, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The policy's parameters as the server loads them: Hugging Face names (vLLM's load_weights
    maps them), in layer order, in the serving dtype. Tied weights appear once, as
    named_parameters gives them, and vLLM ties them again. ZeRO-2 keeps every parameter whole on
    every rank, so rank 0 alone has the full model; buffers (rotary frequencies) vLLM computes itself."""
    parameters = dict(module.named_parameters())
    return [(name, parameters[name].detach().to(dtype)) for name in layer_order(list(parameters))]


def packed_buffers(weights: Sequence[tuple[str, torch.Tensor]], buffer_bytes: int):
    """The uint8 buffers vLLM's packed consumer expects: the tensors in order, each flattened to
    its bytes and appended to the current buffer, which is sent once it holds more than
    ``buffer_bytes`` (so a buffer ends with the tensor that crossed the size)."""
    pending: list[torch.Tensor] = []
    size = 0
    for _, tensor in weights:
        data = tensor.contiguous().view(-1).view(torch.uint8)
        pending.append(data)
        size += data.numel()
        if size > buffer_bytes:
            yield torch.cat(pending)
            pending, size = [], 0
    if pending:
        yield torch.cat(pending)


class ServerCalls:
    """JSON calls to the server's sync routes, each with the same timeout; a failure is one
    :class:`PhaseFailed` naming the route. No retries: the other transport is the retry."""

    def __init__(self, url: str, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def post(self, route: str, body: dict | None = None, **query) -> dict:
        if query:
            route += "?" + urllib.parse.urlencode(query)
        return self._call(json_request(self.url + route, body), f"POST {route}")

    def get(self, route: str) -> dict:
        return self._call(self.url + route, f"GET {route}")

    def _call(self, request: urllib.request.Request | str, what: str) -> dict:
        try:
            return call_json(request, self.timeout)
        except HTTPCallError as error:
            raise PhaseFailed(f"{what}: {error.problem}") from None


class Transport(Protocol):
    name: str

    def push(self, calls: ServerCalls, weights: Sequence[tuple[str, torch.Tensor]], version: str) -> int:
        """Load ``weights`` into the paused server labelled ``version``; returns the bytes moved."""
        ...

    def reset(self) -> None:
        """Forget any connection to the server: a failed or restarted peer needs a fresh one."""

    def close(self) -> None:
        """Release what the transport holds, at the end of training."""


class PendingBroadcast(Protocol):
    def wait(self) -> None:
        """Until the buffer is sent; RuntimeError when it cannot be, by the group's timeout."""


class BroadcastGroup(Protocol):
    """A group with the server's workers, this process its rank 0."""

    def broadcast(self, buffer: torch.Tensor) -> PendingBroadcast: ...

    def close(self) -> None:
        """Leave the group; a failed or restarted peer needs a new one."""


class GroupFormation(Protocol):
    """How :class:`PackedBroadcast` forms its group, one group at a time: :meth:`open` before the
    server is asked to join, :meth:`join` while it joins."""

    name: str  # the transport's, in logs and in sync/transport

    def open(self, world_size: int) -> dict:
        """Prepare this side's rendezvous; returns its fields of ``init_info``."""
        ...

    def join(self, abandoned: Callable[[], bool]) -> BroadcastGroup:
        """The group, once the server's workers joined it; RuntimeError when they did not by the
        timeout, or when ``abandoned()`` says they will not."""
        ...


class GlooGroup:
    """A gloo process group and the TCPStore it was formed on, which it uses while it lives."""

    def __init__(self, group, store):
        self.group = group
        self.store = store

    def broadcast(self, buffer: torch.Tensor) -> PendingBroadcast:
        from torch.distributed import BroadcastOptions

        options = BroadcastOptions()
        options.rootRank = 0
        return self.group.broadcast([buffer], options)

    def close(self) -> None:
        """Nothing beyond the references, which the transport drops."""


class GlooFormation:
    """The group over gloo, on a TCPStore rendezvous this rank hosts on loopback: what the reference
    server joins with ``master_address`` and ``master_port``, the CPU stand-in for NCCL."""

    name = "broadcast"

    def __init__(self, timeout: float):
        self.timeout = timedelta(seconds=timeout)
        self.store = None
        self.world_size = 0

    def open(self, world_size: int) -> dict:
        from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage]  (public, not declared so)

        port = _free_port()
        self.store = TCPStore(HOST, port, world_size, True, timeout=self.timeout, wait_for_workers=False)
        self.world_size = world_size
        return {"master_address": HOST, "master_port": port}

    def join(self, abandoned) -> GlooGroup:
        """gloo's constructor cannot be interrupted: its own timeout ends a wait for a server that
        refused, so ``abandoned`` goes unasked."""
        from torch.distributed import ProcessGroupGloo

        # gloo's own options: the only way to give its group a timeout and the loopback device
        options = ProcessGroupGloo._Options()  # pyright: ignore[reportAttributeAccessIssue]
        options._timeout = self.timeout
        # The loopback device: the pod's hostname need not resolve to an address the sidecar can reach.
        options._devices = [ProcessGroupGloo.create_device(hostname=HOST)]
        store, self.store = self.store, None
        assert store is not None, "join() without open()"
        return GlooGroup(ProcessGroupGloo(store, 0, self.world_size, options), store)


class NcclFormation:
    """The group over NCCL that vLLM 0.34.0's workers join by ``nccl_unique_id_b64``: this rank mints
    the unique id and enters ncclCommInitRank before the server is asked (a failure here never
    reaches the server), the workers enter theirs while /init_weight_transfer_engine runs, and every
    rank then issues the warm-up all-reduce. Buffers go on torch's current CUDA stream."""

    name = "nccl"

    def __init__(self, timeout: float, library: NcclLibrary, *, device: torch.device | None = None,
                 current_stream: Callable[[], Stream] | None = None):
        self.timeout = timeout
        self.library = library
        self.device = device
        self.current_stream = current_stream or torch.cuda.current_stream
        self.forming: NcclGroup | None = None

    def open(self, world_size: int) -> dict:
        unique_id = self.library.unique_id()
        device = self.device or torch.device("cuda", torch.cuda.current_device())
        self.forming = NcclGroup(self.library, unique_id, rank=0, world_size=world_size, timeout=self.timeout,
                                 device=device, current_stream=self.current_stream)
        # vLLM decodes it with b64decode(validate=True): the standard alphabet, not the URL-safe one.
        return {"nccl_unique_id_b64": base64.b64encode(unique_id).decode("ascii")}

    def join(self, abandoned) -> NcclGroup:
        group, self.forming = self.forming, None
        assert group is not None, "join() without open()"
        group.wait_formed(abandoned)
        group.warm_up()
        return group


class PackedBroadcast:
    """vLLM's weight-transfer engine driven from rank 0 of a group with the server's workers
    (rank_offset 1, one rank per worker): the weights broadcast in the packed buffers vLLM's
    packed_tensor.py unpacks. The group is formed by ``formation``: over NCCL with a GPU server
    (:class:`NcclFormation`), over gloo with the reference server on CPU (the default)."""

    def __init__(self, timeout: float, *, formation: GroupFormation | None = None, server_workers: int = 1,
                 buffer_bytes: int = PACKED_BUFFER_BYTES, num_buffers: int = PACKED_BUFFERS):
        self.formation = formation or GlooFormation(timeout)
        self.name = self.formation.name
        self.world_size = 1 + server_workers
        self.buffer_bytes = buffer_bytes
        self.num_buffers = num_buffers
        self.group: BroadcastGroup | None = None

    def push(self, calls, weights, version) -> int:
        if self.group is None:
            self.group = self._connect(calls)
        group = self.group
        calls.post(START_UPDATE_ROUTE)
        update_info = {
            "names": [name for name, _ in weights],
            "dtype_names": [str(tensor.dtype).removeprefix("torch.") for _, tensor in weights],
            "shapes": [list(tensor.shape) for _, tensor in weights],
        }
        # The server receives inside /update_weights: its answer comes only after the broadcast.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-weights") as pool:
            answered = pool.submit(calls.post, UPDATE_WEIGHTS_ROUTE, {"update_info": update_info})
            try:
                sent = self._broadcast(group, weights)
            except PhaseFailed:
                _raise_refusal(answered)
                raise
            answered.result()
        calls.post(FINISH_UPDATE_ROUTE, {"weight_version": version})
        return sent

    def _connect(self, calls: ServerCalls) -> BroadcastGroup:
        """Open this side's rendezvous, then ask the server to join it while the group forms: both
        sides must be in the rendezvous at once."""
        try:
            rendezvous = self.formation.open(self.world_size)
        except RuntimeError as error:
            raise PhaseFailed(f"forming the {self.name} group: {_first_line(error)}") from None
        init_info = {
            **rendezvous,
            "rank_offset": 1,
            "world_size": self.world_size,
            "packed": True,
            "packed_buffer_size_bytes": self.buffer_bytes,
            "packed_num_buffers": self.num_buffers,
        }
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="init-transfer") as pool:
            joined = pool.submit(calls.post, INIT_TRANSFER_ROUTE, {"init_info": init_info})
            try:
                group = self.formation.join(abandoned=lambda: joined.done() and joined.exception() is not None)
            except RuntimeError as error:
                _raise_refusal(joined)
                raise PhaseFailed(f"POST {INIT_TRANSFER_ROUTE}: the server did not join the group: "
                                  f"{_first_line(error)}") from None
            try:
                joined.result()
            except PhaseFailed:
                group.close()
                raise
        return group

    def _broadcast(self, group: BroadcastGroup, weights) -> int:
        """Send the packed buffers from rank 0, at most ``num_buffers`` on the wire at once."""
        in_flight: deque = deque()
        sent = 0
        try:
            for buffer in packed_buffers(weights, self.buffer_bytes):
                if len(in_flight) == self.num_buffers:
                    in_flight.popleft().wait()
                in_flight.append(group.broadcast(buffer))
                sent += buffer.numel()
            while in_flight:
                in_flight.popleft().wait()
        except RuntimeError as error:
            raise PhaseFailed(f"{self.name} broadcast beside POST {UPDATE_WEIGHTS_ROUTE}: "
                              f"{_first_line(error)}") from None
        return sent

    def reset(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    close = reset


def _raise_refusal(call: Future) -> None:
    """The server's refusal of the call beside a group operation (an engine without a group, say)
    says more than the group's own failure: raise it, when the call has already failed."""
    refusal = call.exception() if call.done() else None
    if refusal is not None:
        raise refusal from None


class ShmSafetensors:
    """The weights as safetensors in a folder under /dev/shm, which the pod's containers share,
    reloaded by the workers' ``reload_weights(weights_path=...)`` through ``/collective_rpc``.
    Each step writes a new folder (renamed into place when complete) and removes the last one."""

    name = "shm"

    def __init__(self, root: Path | None = None):
        base = root or (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix="grpo-weights-", dir=base))
        self.current: Path | None = None
        # Removed however training ends: a crashed trainer must not leave the model in the pod's memory.
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, True)

    def push(self, calls, weights, version) -> int:
        from safetensors.torch import save_file

        folder = self.root / f"step-{version}"
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            save_file({name: tensor.contiguous() for name, tensor in weights}, str(partial / "model.safetensors"))
        except OSError as error:
            raise PhaseFailed(f"writing {partial}: {error.strerror or error}") from None
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        size = (folder / "model.safetensors").stat().st_size
        calls.post(COLLECTIVE_RPC_ROUTE, {"method": RELOAD_METHOD, "kwargs": {"weights_path": str(folder)},
                                          "timeout": calls.timeout})
        calls.post(UPDATE_VERSION_ROUTE, {"new_version": version})
        if self.current not in (None, folder):
            shutil.rmtree(self.current, ignore_errors=True)
        self.current = folder
        return size

    def reset(self) -> None:
        """Nothing to forget: each push is a file and a call."""

    def close(self) -> None:
        self._remove()


@dataclass(frozen=True)
class SyncReport:
    """One push, for the step's record."""

    transport: str
    bytes: int
    seconds: float

    def record(self) -> dict:
        return {"sync/transport": self.transport, "sync/bytes": self.bytes, "sync/seconds": self.seconds}


class WeightSync:
    """Rank 0's side of the sync; see the module docstring. ``label`` is what the server should be
    serving: vLLM's "default" (its own load of spec.model.source) or the step last pushed."""

    def __init__(self, url: str, *, dtype: torch.dtype, timeout: float, transports: Sequence[Transport], label: str,
                 wait_until_ready: Callable[[], None]):
        self.calls = ServerCalls(url, timeout)
        self.dtype = dtype
        self.transports = list(transports)
        self.label = label
        self.wait_until_ready = wait_until_ready

    def push(self, module: torch.nn.Module, version: str) -> SyncReport:
        """Load ``module``'s weights into the server, labelled ``version``; a WeightSyncError when
        no transport could."""
        weights = serving_weights(module, self.dtype)
        self._forget_groups_if_restarted()
        failures = []
        for transport in self.transports:
            began = time.perf_counter()
            try:
                self.calls.post(PAUSE_ROUTE, mode=PAUSE_MODE)
                moved = transport.push(self.calls, weights, version)
                # KV blocks cached from the old weights would otherwise be reused by the new ones.
                if not self.calls.post(RESET_PREFIX_CACHE_ROUTE).get("success"):
                    raise PhaseFailed(f"POST {RESET_PREFIX_CACHE_ROUTE}: success false (KV blocks still held)")
                self.calls.post(RESUME_ROUTE)
                served = self._served_version()
                if served != version:
                    raise PhaseFailed(f"GET {WEIGHT_INFO_ROUTE}: the server reports weights {served!r}, not {version!r}")
            except PhaseFailed as error:
                transport.reset()
                failures.append(f"{transport.name}: {error}")
                logger.warning("vLLM server at %s: weight sync of %s by %s failed: %s", self.calls.url, version,
                               transport.name, error)
                continue
            self.label = version
            report = SyncReport(transport.name, moved, time.perf_counter() - began)
            logger.info("vLLM server at %s: weights %s synced by %s, %.1f MB in %.2f s", self.calls.url, version,
                        transport.name, moved / 1e6, report.seconds)
            return report
        raise WeightSyncError(f"vLLM server at {self.calls.url}: weights {version} not synced: " + "; ".join(failures))

    def ensure_current(self, module: torch.nn.Module, version: str) -> bool:
        """Before a rollout: make the server serve ``self.label``. A server that says otherwise
        restarted (it came back with its base weights) or lost an update: the policy's weights
        are pushed again, labelled ``version``. Returns whether they were."""
        try:
            served = self._served_version()
        except PhaseFailed as error:  # restarting: wait for it as at the start of training
            logger.warning("vLLM server at %s: %s; waiting for it", self.calls.url, error)
            self.wait_until_ready()
            try:
                served = self._served_version()
            except PhaseFailed as again:
                raise WeightSyncError(f"vLLM server at {self.calls.url}: {again}") from None
        if served == self.label:
            return False
        logger.warning("vLLM server at %s serves weights %r, not %r (restarted?): pushing weights %s again",
                       self.calls.url, served, self.label, version)
        self.push(module, version)
        return True

    def _forget_groups_if_restarted(self) -> None:
        """A server that restarted since the last push (mid-rollout, say) left the groups it had
        joined: a broadcast into one would wait out the timeout. Its label says so."""
        try:
            restarted = self._served_version() != self.label
        except PhaseFailed:
            restarted = True
        if restarted:
            for transport in self.transports:
                transport.reset()

    def _served_version(self) -> str:
        return str(self.calls.get(WEIGHT_INFO_ROUTE).get("weight_version"))

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def default_transports(timeout: float, *, on_gpu: bool, server_workers: int) -> list[Transport]:
    """The packed broadcast, then the /dev/shm fallback: over NCCL with a GPU server (its
    ``server_workers`` workers each a rank), over gloo on CPU. On GPUs without a loadable NCCL,
    the fallback alone, said once here."""
    if not on_gpu:
        return [PackedBroadcast(timeout), ShmSafetensors()]
    try:
        library = NcclLibrary()
    except NcclUnavailable as error:
        logger.warning("weight sync through /dev/shm only: the NCCL sender cannot load NCCL: %s", error)
        return [ShmSafetensors()]
    logger.info("weight sync by NCCL %s (%s), /dev/shm as its fallback", version_name(library.version), library.path)
    return [PackedBroadcast(timeout, formation=NcclFormation(timeout, library), server_workers=server_workers),
            ShmSafetensors()]

"""NCCL through ctypes, for the weight sender to vLLM's workers (grpo_trainer.weight_sync).

vLLM 0.34.0's workers join a trainer's group from an NCCL unique id the trainer mints
(``nccl_unique_id_b64``, docs/vllm-sidecar.md). torch.distributed cannot form a group from an id
minted outside it, and the trainer's image cannot hold vLLM, so the sender calls libnccl.so.2
itself: the one torch ships (the nvidia-nccl-cu* package), or the file ``GRPO_NCCL_LIBRARY`` names.

The C signatures are those vLLM 0.34.0's pynccl_wrapper.py declares (tests/test_vllm_contract.py
compares them with tests/fixtures/vllm-0.34.0-contract.json); ncclCommInitRankConfig,
ncclCommGetAsyncError and ncclConfig_t, which vLLM does not use, are nccl.h's. The communicator is
non-blocking (``blocking = 0``): every call returns at once and its completion is polled, so a wait
past its timeout can end in ncclCommAbort, which NCCL allows at any point only in that mode. A
blocking ncclCommInitRank whose peer never comes cannot be stopped.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

LIBRARY_VARIABLE = "GRPO_NCCL_LIBRARY"
SONAME = "libnccl.so.2"
UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
SUCCESS, IN_PROGRESS = 0, 7  # ncclSuccess, ncclInProgress
UINT8, FLOAT32 = 1, 7  # ncclUint8, ncclFloat32
SUM = 0  # ncclSum
API_MAGIC = 0xCAFEBEEF  # NCCL_API_MAGIC: marks a config made as NCCL_CONFIG_INITIALIZER makes it
UNDEFINED = -(2**31)  # NCCL_CONFIG_UNDEF_INT: NCCL's own default for the field
CONFIG_VERSION = 21700  # NCCL_VERSION(2, 17, 0): the newest field of ncclConfig_t declared below
POLL_SECONDS = 0.001

ncclResult_t = ctypes.c_int
ncclComm_t = ctypes.c_void_p
ncclDataType_t = ctypes.c_int
ncclRedOp_t = ctypes.c_int
cudaStream_t = ctypes.c_void_p
buffer_type = ctypes.c_void_p


class ncclUniqueId(ctypes.Structure):  # nccl.h's name, as vLLM's wrapper spells it
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


class ncclConfig_t(ctypes.Structure):
    """The first fields of ncclConfig_t, as NCCL 2.17 declared them. NCCL appends fields and copies
    only ``size`` bytes of a caller's config, taking its defaults for the rest, so an older layout
    stays valid in every later NCCL."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
    ]


SIGNATURES: dict[str, tuple[type, list[type]]] = {
    "ncclGetErrorString": (ctypes.c_char_p, [ncclResult_t]),
    "ncclGetLastError": (ctypes.c_char_p, [ncclComm_t]),
    "ncclGetVersion": (ncclResult_t, [ctypes.POINTER(ctypes.c_int)]),
    "ncclGetUniqueId": (ncclResult_t, [ctypes.POINTER(ncclUniqueId)]),
    "ncclCommInitRankConfig": (
        ncclResult_t,
        [ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int, ctypes.POINTER(ncclConfig_t)],
    ),
    "ncclCommGetAsyncError": (ncclResult_t, [ncclComm_t, ctypes.POINTER(ncclResult_t)]),
    "ncclAllReduce": (
        ncclResult_t,
        [buffer_type, buffer_type, ctypes.c_size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t],
    ),
    "ncclBroadcast": (
        ncclResult_t,
        [buffer_type, buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t],
    ),
    "ncclCommAbort": (ncclResult_t, [ncclComm_t]),
}


class NcclUnavailable(RuntimeError):
    """No usable libnccl.so.2; one line saying what was searched or what is wrong with it."""


class NcclError(RuntimeError):
    """An NCCL call failed, or a wait ran past its timeout; the communicator has been aborted."""


def library_folders() -> list[Path]:
    """The lib folders of the nvidia-nccl-cu* package (cu12 and cu13 both install nvidia/nccl/lib),
    whose libnccl.so.2 torch's CUDA build loads."""
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return []
    return [Path(location) / "lib" for location in (spec.submodule_search_locations or [])] if spec else []


def find_library() -> str:
    """The libnccl.so.2 to load: ``GRPO_NCCL_LIBRARY``, else torch's (:func:`library_folders`)."""
    override = os.environ.get(LIBRARY_VARIABLE)
    if override:
        if not Path(override).is_file():
            raise NcclUnavailable(f"{LIBRARY_VARIABLE}={override}: no such file")
        return override
    folders = library_folders()
    for folder in folders:
        if (folder / SONAME).is_file():
            return str(folder / SONAME)
    searched = (f"{', '.join(map(str, folders))} (torch's nvidia-nccl-cu* package) has none" if folders
                else "torch's nvidia-nccl-cu* package is not installed")
    raise NcclUnavailable(f"no {SONAME} found: {LIBRARY_VARIABLE} is unset and {searched}")


def version_name(code: int) -> str:
    """NCCL_VERSION_CODE as major.minor.patch (two encodings: before and from 2.9)."""
    major, rest = (code // 10000, code % 10000) if code >= 20900 else (code // 1000, code % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


class NcclLibrary:
    """The NCCL functions the sender calls. A call that fails at once raises :class:`NcclError`;
    one that returns ncclInProgress is left to the caller to poll (:class:`NcclGroup`)."""

    def __init__(self, path: str | None = None):
        self.path = path or find_library()
        try:
            library = ctypes.CDLL(self.path)
        except OSError as error:
            raise NcclUnavailable(f"{self.path}: {error}") from None
        missing = [name for name in SIGNATURES if not hasattr(library, name)]
        if missing:
            raise NcclUnavailable(f"{self.path} has no {', '.join(missing)}: not an NCCL library")
        self._functions = {}
        for name, (restype, argtypes) in SIGNATURES.items():
            function = getattr(library, name)
            function.restype, function.argtypes = restype, argtypes
            self._functions[name] = function
        code = ctypes.c_int()
        self._check(self._functions["ncclGetVersion"](ctypes.byref(code)), "ncclGetVersion")
        self.version = code.value
        if self.version < CONFIG_VERSION:
            raise NcclUnavailable(f"{self.path} is NCCL {version_name(self.version)}; the sender needs "
                                  f"{version_name(CONFIG_VERSION)} or newer (non-blocking communicators)")

    def unique_id(self) -> bytes:
        """A new ncclUniqueId: the address of the rendezvous this process now hosts for rank 0."""
        unique_id = ncclUniqueId()
        self._check(self._functions["ncclGetUniqueId"](ctypes.byref(unique_id)), "ncclGetUniqueId")
        return bytes(unique_id)

    def init_rank(self, world_size: int, unique_id: bytes, rank: int) -> int:
        """Begin ncclCommInitRankConfig without blocking; the communicator is formed once
        :meth:`async_error` says ncclSuccess."""
        config = ncclConfig_t(ctypes.sizeof(ncclConfig_t), API_MAGIC, CONFIG_VERSION, 0,
                              UNDEFINED, UNDEFINED, UNDEFINED, None)
        comm = ncclComm_t()
        result = self._functions["ncclCommInitRankConfig"](
            ctypes.byref(comm), world_size, ncclUniqueId.from_buffer_copy(unique_id), rank, ctypes.byref(config)
        )
        if result not in (SUCCESS, IN_PROGRESS) and comm.value:
            self.abort(comm.value)  # the part made before the failure
        self._check(result, "ncclCommInitRankConfig")
        if comm.value is None:
            raise NcclError("ncclCommInitRankConfig: no communicator returned")
        return comm.value

    def async_error(self, comm: int) -> int:
        """The communicator's state: ncclSuccess, ncclInProgress, or the error it met."""
        state = ncclResult_t()
        self._check(self._functions["ncclCommGetAsyncError"](comm, ctypes.byref(state)), "ncclCommGetAsyncError")
        return state.value

    def all_reduce(self, buffer: int, count: int, datatype: int, op: int, comm: int, stream: int) -> int:
        """In place."""
        return self._check(self._functions["ncclAllReduce"](buffer, buffer, count, datatype, op, comm, stream),
                           "ncclAllReduce")

    def broadcast(self, buffer: int, count: int, datatype: int, root: int, comm: int, stream: int) -> int:
        """In place: the root sends ``buffer``, the others receive into theirs."""
        return self._check(self._functions["ncclBroadcast"](buffer, buffer, count, datatype, root, comm, stream),
                           "ncclBroadcast")

    def abort(self, comm: int) -> None:
        """Free the communicator and stop what it has running on the GPU, without its peers."""
        result = self._functions["ncclCommAbort"](comm)
        if result != SUCCESS:
            logger.warning("ncclCommAbort: %s", self.describe(result))

    def describe(self, result: int) -> str:
        """NCCL's words for ``result``, with the last error's details when it has them."""
        text = (self._functions["ncclGetErrorString"](result) or b"").decode(errors="replace")
        detail = (self._functions["ncclGetLastError"](None) or b"").decode(errors="replace").strip()
        return f"{text} ({detail})" if detail else text

    def _check(self, result: int, what: str) -> int:
        if result not in (SUCCESS, IN_PROGRESS):
            raise NcclError(f"{what}: {self.describe(result)}")
        return result


class Event(Protocol):
    """What the communicator needs of torch.cuda.Event."""

    def query(self) -> bool: ...


class Stream(Protocol):
    """What the communicator needs of torch.cuda.Stream."""

    @property
    def cuda_stream(self) -> int: ...

    def record_event(self) -> Event: ...


@dataclass
class PendingCollective:
    """A collective enqueued on the stream: ``wait()`` returns when it completed. Holds the buffer
    it reads or writes until then."""

    wait: Callable[[], None]
    buffer: torch.Tensor


class NcclGroup:
    """An NCCL communicator of which this process is ``rank``, on torch's current CUDA stream. Every
    wait polls the communicator and the stream until ``timeout``; past it, or on an error NCCL reports,
    the communicator is aborted and :class:`NcclError` raised."""

    def __init__(self, library: NcclLibrary, unique_id: bytes, *, rank: int, world_size: int, timeout: float,
                 device: torch.device, current_stream: Callable[[], Stream]):
        self.library = library
        self.timeout = timeout
        self.device = device
        self.current_stream = current_stream
        self.comm: int | None = library.init_rank(world_size, unique_id, rank)

    def wait_formed(self, abandoned: Callable[[], bool] = lambda: False) -> None:
        """Until every rank entered ncclCommInitRank with the same id; ``abandoned()`` true ends
        the wait early (the peer said it will not come)."""
        self._wait("ncclCommInitRank", abandoned=abandoned)

    def warm_up(self) -> None:
        """The one-element float32 all-reduce each peer of vLLM's group issues before anything else
        (PyNcclCommunicator._init_comm): without it the two sides wait in different collectives."""
        data = torch.zeros(1, dtype=torch.float32, device=self.device)
        comm = self._require("warm-up ncclAllReduce")
        self._enqueue("warm-up ncclAllReduce", data,
                      lambda stream: self.library.all_reduce(data.data_ptr(), 1, FLOAT32, SUM, comm, stream)).wait()

    def broadcast(self, buffer: torch.Tensor) -> PendingCollective:
        """Send a uint8 ``buffer`` from rank 0 (the sender's rank) to the other ranks."""
        comm = self._require("ncclBroadcast")
        return self._enqueue("ncclBroadcast", buffer, lambda stream: self.library.broadcast(
            buffer.data_ptr(), buffer.numel(), UINT8, 0, comm, stream))

    def _enqueue(self, what: str, buffer: torch.Tensor, call: Callable[[int], int]) -> PendingCollective:
        self._require(what)
        stream = self.current_stream()
        try:
            call(stream.cuda_stream)
        except NcclError as error:
            self.abort()
            raise NcclError(f"{error}; communicator aborted") from None
        self._wait(what)  # a non-blocking call may return before it is enqueued
        done = stream.record_event()
        return PendingCollective(lambda: self._wait(what, done=done.query), buffer)

    def _wait(self, what: str, *, done: Callable[[], bool] = lambda: True,
              abandoned: Callable[[], bool] = lambda: False) -> None:
        comm = self._require(what)
        deadline = time.monotonic() + self.timeout
        while True:
            state = self.library.async_error(comm)
            if state == SUCCESS and done():
                return
            if state not in (SUCCESS, IN_PROGRESS):
                problem = self.library.describe(state)
            elif abandoned():
                problem = "abandoned: the peer will not join"
            elif time.monotonic() > deadline:
                problem = f"not done within {self.timeout:g} s"
            else:
                time.sleep(POLL_SECONDS)
                continue
            self.abort()
            raise NcclError(f"{what}: {problem}; communicator aborted")

    def _require(self, what: str) -> int:
        """The communicator, unless it was aborted."""
        if self.comm is None:
            raise NcclError(f"{what}: the communicator was aborted")
        return self.comm

    def abort(self) -> None:
        if self.comm is not None:
            comm, self.comm = self.comm, None
            self.library.abort(comm)

    close = abort

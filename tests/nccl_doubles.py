"""For testing the NCCL sender without a GPU: a scripted NCCL, and vLLM's own parser of the unique id.

:class:`ScriptedNccl` stands in for both :class:`grpo_trainer.nccl.NcclLibrary` and torch's CUDA
stream under :class:`grpo_trainer.nccl.NcclGroup`, on CPU tensors: it records every call, copies
what each broadcast sends, and finishes the communicator's init and each collective when the test's
``formed`` and ``completes`` say so.
"""

from __future__ import annotations

import base64
import ctypes
from collections.abc import Callable

from grpo_trainer.nccl import IN_PROGRESS, SUCCESS

# Bytes whose base64 holds "+" and "/", where the URL-safe alphabet (which vLLM refuses) differs.
UNIQUE_ID = bytes([0xFB, 0xFF, 0xBF] * 42 + [0, 1])


def vllm_unique_id_decoder(contract: dict) -> Callable[..., bytes | None]:
    """vLLM's ``decode_nccl_unique_id``, run from its source in the contract fixture. Its module
    imports pybase64 as base64; pybase64.b64decode is a drop-in of the standard library's (same
    ``validate`` semantics), which stands in for it here."""
    decoder = contract["nccl"]["uniqueIdDecoder"]
    assert decoder["base64"] == "pybase64", decoder["base64"]
    namespace = {"base64": base64, "NCCL_UNIQUE_ID_BYTES": contract["nccl"]["uniqueIdBytes"]}
    exec(decoder["source"], namespace)  # noqa: S102 (vLLM's code, extracted from the pinned wheel)
    return namespace["decode_nccl_unique_id"]


class ScriptedEvent:
    def __init__(self, done: Callable[[], bool]):
        self.query = done


class ScriptedNccl:
    COMM = 0xC0FFEE

    def __init__(self, *, formed: Callable[[], bool] = lambda: True,
                 completes: Callable[[tuple], bool] = lambda call: True, calls: list | None = None):
        self.formed = formed
        self.completes = completes
        self.calls: list[tuple] = [] if calls is None else calls  # a test may share it with its server's log
        self.sent: list[bytes] = []
        self.failure: int | None = None  # an ncclResult_t the communicator reports from now on
        self.enqueue_polls = 0  # how many polls after a collective say ncclInProgress before it is enqueued
        self.cuda_stream = 0x57

    # NcclLibrary

    def unique_id(self) -> bytes:
        self.calls.append(("ncclGetUniqueId",))
        return UNIQUE_ID

    def init_rank(self, world_size: int, unique_id: bytes, rank: int) -> int:
        self.calls.append(("ncclCommInitRankConfig", world_size, unique_id, rank))
        return self.COMM

    def async_error(self, comm: int) -> int:
        assert comm == self.COMM
        if self.failure is not None:
            return self.failure
        if self.enqueue_polls:
            self.enqueue_polls -= 1
            return IN_PROGRESS
        return SUCCESS if self.formed() else IN_PROGRESS

    def all_reduce(self, buffer: int, count: int, datatype: int, op: int, comm: int, stream: int) -> int:
        self.calls.append(("ncclAllReduce", ctypes.string_at(buffer, 4 * count), count, datatype, op, stream))
        return SUCCESS

    def broadcast(self, buffer: int, count: int, datatype: int, root: int, comm: int, stream: int) -> int:
        self.calls.append(("ncclBroadcast", count, datatype, root, stream))
        self.sent.append(ctypes.string_at(buffer, count))
        return SUCCESS

    def abort(self, comm: int) -> None:
        self.calls.append(("ncclCommAbort", comm))

    def describe(self, result: int) -> str:
        return f"scripted NCCL result {result}"

    # torch.cuda.Stream

    def current_stream(self) -> ScriptedNccl:
        return self

    def record_event(self) -> ScriptedEvent:
        call = next(call for call in reversed(self.calls) if call[0] in ("ncclAllReduce", "ncclBroadcast"))
        return ScriptedEvent(lambda: self.completes(call))

    def names(self) -> list[str]:
        """The NCCL functions called, in order."""
        return [call[0] for call in self.calls if call[0].startswith("nccl")]

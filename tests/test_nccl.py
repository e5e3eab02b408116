"""The NCCL binding (grpo_trainer.nccl): against a real libnccl.so.2 where one is at hand, and the
communicator's deadlines against a scripted NCCL.

The real library comes from GRPO_NCCL_LIBRARY or torch's nvidia-nccl-cu* package; CI installs the
CPU build of torch, which has neither (the nvidia-nccl-cu12 wheel is about 350 MB), so those tests
skip there. To run them: ``pip download --no-deps nvidia-nccl-cu12 -d /tmp/nccl-wheel``, unzip it,
and set GRPO_NCCL_LIBRARY to its nvidia/nccl/lib/libnccl.so.2. Without a GPU NCCL still loads,
reports its version and mints unique ids; forming a communicator needs a GPU.
"""

from __future__ import annotations

import base64
import ctypes
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from nccl_doubles import UNIQUE_ID, ScriptedNccl, vllm_unique_id_decoder

from grpo_trainer import nccl
from grpo_trainer.nccl import (
    FLOAT32,
    SUM,
    UINT8,
    NcclError,
    NcclGroup,
    NcclLibrary,
    NcclUnavailable,
    find_library,
    version_name,
)

pytestmark = pytest.mark.timeout(60)
CONTRACT = json.loads((Path(__file__).parent / "fixtures" / "vllm-0.34.0-contract.json").read_text())
TIMEOUT = 0.3
REMOTE_ERROR = 6  # ncclRemoteError


@pytest.fixture(scope="module")
def library() -> NcclLibrary:
    try:
        return NcclLibrary()
    except NcclUnavailable as error:
        pytest.skip(f"no NCCL library: {error}")


# -------------------------------------------------------------------------------- the library


def test_the_library_exports_every_function_bound_and_is_new_enough(library):
    exported = ctypes.CDLL(library.path)
    assert all(hasattr(exported, name) for name in nccl.SIGNATURES)
    assert library.version >= nccl.CONFIG_VERSION
    major, minor, patch = map(int, version_name(library.version).split("."))
    assert library.version == major * 10000 + minor * 100 + patch


def test_a_unique_id_round_trips_through_vllms_parser_of_nccl_unique_id_b64(library):
    """ncclGetUniqueId needs no GPU; vLLM's own decoder (from the fixture) gets the same 128 bytes back."""
    decode = vllm_unique_id_decoder(CONTRACT)
    first, second = library.unique_id(), library.unique_id()
    assert len(first) == CONTRACT["nccl"]["uniqueIdBytes"] == nccl.UNIQUE_ID_BYTES and first != second
    encoded = base64.b64encode(first).decode()
    assert decode(master_address=None, master_port=None, nccl_unique_id_b64=encoded, ctx="test") == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU forms the communicator")
def test_without_a_gpu_the_communicator_fails_at_once_naming_nccls_reason(library):
    began = time.monotonic()
    with pytest.raises(NcclError, match=r"^ncclCommInitRankConfig: ") as raised:
        NcclGroup(library, library.unique_id(), rank=0, world_size=2, timeout=30, device=torch.device("cpu"),
                  current_stream=lambda: None)
    assert time.monotonic() - began < 5 and "\n" not in str(raised.value)


def test_a_file_that_is_not_nccl_is_refused_naming_what_it_lacks():
    with pytest.raises(NcclUnavailable, match=r"^libc\.so\.6 has no ncclGetErrorString, .*: not an NCCL library$"):
        NcclLibrary("libc.so.6")


def test_the_library_is_the_variables_file_or_torchs_package(tmp_path, monkeypatch):
    monkeypatch.setenv(nccl.LIBRARY_VARIABLE, str(tmp_path / "missing.so"))
    with pytest.raises(NcclUnavailable, match=f"^GRPO_NCCL_LIBRARY={tmp_path}/missing.so: no such file$"):
        find_library()
    monkeypatch.delenv(nccl.LIBRARY_VARIABLE)
    folder = tmp_path / "nvidia" / "nccl" / "lib"
    folder.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))  # nvidia is a namespace package, as pip installs it
    imported = set(sys.modules)
    try:
        assert nccl.library_folders()[0] == folder
        with pytest.raises(NcclUnavailable, match=rf"^no libnccl\.so\.2 found: GRPO_NCCL_LIBRARY is unset and "
                                                  rf"{folder}.* \(torch's nvidia-nccl-cu\* package\) has none$"):
            find_library()
        (folder / nccl.SONAME).touch()
        assert find_library() == str(folder / nccl.SONAME)
    finally:
        for name in set(sys.modules) - imported:  # the namespace package found in tmp_path
            del sys.modules[name]


def test_our_signatures_are_vllms():
    """Every function vLLM 0.34.0's pynccl wrapper binds and the sender calls has the same C types
    here; ncclCommInitRankConfig is ncclCommInitRank with the config appended."""
    names = {name: getattr(nccl, name) for name in ("ncclResult_t", "ncclComm_t", "ncclUniqueId", "buffer_type",
                                                    "ncclDataType_t", "ncclRedOp_t", "cudaStream_t")}
    namespace = {"ctypes": ctypes, **names}
    for name, signature in CONTRACT["nccl"]["functions"].items():
        restype, argtypes = (eval(signature["restype"], namespace),  # noqa: S307 (the fixture's type expressions)
                             [eval(argument, namespace) for argument in signature["argtypes"]])  # noqa: S307
        if name == "ncclCommInitRank":
            ours_restype, ours_argtypes = nccl.SIGNATURES["ncclCommInitRankConfig"]
            assert (ours_restype, ours_argtypes[:4]) == (restype, argtypes)
            assert ours_argtypes[4] == ctypes.POINTER(nccl.ncclConfig_t)
        else:
            assert nccl.SIGNATURES[name] == (restype, argtypes), name
    assert ctypes.sizeof(nccl.ncclUniqueId) == CONTRACT["nccl"]["uniqueIdBytes"]


def test_the_config_is_nccl_2_17s_layout():
    """size_t size; unsigned magic, version; int blocking, cgaClusterSize, minCTAs, maxCTAs;
    const char *netName (nccl.h, unchanged at the front through 2.32)."""
    assert [name for name, _ in nccl.ncclConfig_t._fields_] == [
        "size", "magic", "version", "blocking", "cgaClusterSize", "minCTAs", "maxCTAs", "netName"]
    assert ctypes.sizeof(nccl.ncclConfig_t) == 40 and nccl.ncclConfig_t.netName.offset == 32


# ------------------------------------------------------------------------ the communicator


def group(scripted: ScriptedNccl, timeout: float = TIMEOUT) -> NcclGroup:
    return NcclGroup(scripted, UNIQUE_ID, rank=0, world_size=3, timeout=timeout, device=torch.device("cpu"),
                     current_stream=scripted.current_stream)


def test_the_warm_up_is_one_float32_zero_all_reduced_in_place_after_the_init():
    """vLLM's workers issue ``data = torch.zeros(1, device=device); self.all_reduce(data)`` (sum)."""
    assert CONTRACT["nccl"]["warmUp"] == ["data = torch.zeros(1, device=device)", "self.all_reduce(data)"]
    scripted = ScriptedNccl()
    formed = group(scripted)
    formed.wait_formed()
    formed.warm_up()
    assert scripted.calls == [("ncclCommInitRankConfig", 3, UNIQUE_ID, 0),
                              ("ncclAllReduce", bytes(4), 1, FLOAT32, SUM, scripted.cuda_stream)]


def test_a_broadcast_is_enqueued_on_the_current_stream_and_waited_for():
    done = []
    scripted = ScriptedNccl(completes=lambda call: bool(done))
    formed = group(scripted)
    scripted.enqueue_polls = 3  # non-blocking: the call returned before the collective was enqueued
    pending = formed.broadcast(torch.arange(6, dtype=torch.uint8))
    assert scripted.calls[-1] == ("ncclBroadcast", 6, UINT8, 0, scripted.cuda_stream)
    assert scripted.sent == [bytes(range(6))] and scripted.enqueue_polls == 0
    done.append(True)
    pending.wait()
    assert "ncclCommAbort" not in scripted.names()


def test_an_init_whose_peer_never_comes_is_aborted_at_the_timeout():
    scripted = ScriptedNccl(formed=lambda: False)
    formed = group(scripted)
    began = time.monotonic()
    with pytest.raises(NcclError, match=r"^ncclCommInitRank: not done within 0.3 s; communicator aborted$"):
        formed.wait_formed()
    assert TIMEOUT <= time.monotonic() - began < TIMEOUT + 2
    assert scripted.calls[-1] == ("ncclCommAbort", ScriptedNccl.COMM)


def test_an_init_the_peer_refused_is_aborted_at_once():
    scripted = ScriptedNccl(formed=lambda: False)
    formed = group(scripted, timeout=30)
    began = time.monotonic()
    with pytest.raises(NcclError, match="abandoned: the peer will not join; communicator aborted"):
        formed.wait_formed(abandoned=lambda: True)
    assert time.monotonic() - began < 1 and scripted.names()[-1] == "ncclCommAbort"


def test_a_broadcast_that_never_completes_is_aborted_at_the_timeout_and_the_group_is_done():
    scripted = ScriptedNccl(completes=lambda call: False)
    formed = group(scripted)
    pending = formed.broadcast(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(NcclError, match=r"^ncclBroadcast: not done within 0.3 s; communicator aborted$"):
        pending.wait()
    with pytest.raises(NcclError, match="^ncclBroadcast: the communicator was aborted$"):
        formed.broadcast(torch.zeros(4, dtype=torch.uint8))
    assert scripted.names().count("ncclCommAbort") == 1
    formed.close()  # aborted once only
    assert scripted.names().count("ncclCommAbort") == 1


def test_an_error_nccl_reports_while_waiting_aborts_naming_it():
    scripted = ScriptedNccl(completes=lambda call: False)
    formed = group(scripted, timeout=30)
    pending = formed.broadcast(torch.zeros(4, dtype=torch.uint8))
    scripted.failure = REMOTE_ERROR
    with pytest.raises(NcclError, match=r"^ncclBroadcast: scripted NCCL result 6; communicator aborted$"):
        pending.wait()
    assert scripted.names()[-1] == "ncclCommAbort"


def test_a_collective_nccl_refuses_at_once_aborts_the_communicator():
    scripted = ScriptedNccl()

    def refuse(*arguments):
        raise NcclError("ncclBroadcast: invalid usage")

    scripted.broadcast = refuse
    with pytest.raises(NcclError, match=r"^ncclBroadcast: invalid usage; communicator aborted$"):
        group(scripted).broadcast(torch.zeros(4, dtype=torch.uint8))
    assert scripted.names()[-1] == "ncclCommAbort"

"""The vLLM sidecar's entry point: ``python -m grpo_trainer.vllm_server RUN.yaml --port 8000``.

It reads the same run manifest as the trainer, resolves ``spec.model.source`` the way the trainer
does (a hub id, a local checkpoint, an ``s3://`` checkpoint downloaded first), and replaces itself
with ``vllm serve`` configured for GRPO rollouts:

- bound to 127.0.0.1: the weight-transfer and pause/resume routes exist only in vLLM's development
  mode (VLLM_SERVER_DEV_MODE=1), which has no authentication, so nothing outside the pod may reach it;
- ``--logprobs-mode processed_logprobs``: a sampled token's log-prob is log_softmax(logits / T) after
  vLLM's sampling processors, what the trainer recomputes (with top-p = 1 and no top-k, the
  trainer's settings today, the processors change nothing else; see docs/vllm-sidecar.md);
- ``--generation-config vllm``: the model's generation_config.json sampling defaults are ignored;
  every request names its sampling fields itself;
- the NCCL weight-transfer engine, which the trainer drives after every optimizer step.

Everything vLLM-facing is written against VLLM_VERSION's own source; the routes, bodies and flags
used are recorded in tests/fixtures/vllm-<version>-contract.json (scripts/vllm_contract.py).
Importing this module imports neither torch nor vLLM: the operator builds the pod from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata

from grpo_trainer.model import ModelLocation
from grpo_trainer.spec import GRPORun

VLLM_VERSION = "0.34.0"
"""The vLLM the sidecar runs: the newest release when the sidecar was written. pyproject.toml's
``vllm`` extra pins the same version (a test checks that they agree)."""

HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SERVER_URL_VARIABLE = "GRPO_VLLM_URL"
"""The trainer's environment variable naming the server (default http://127.0.0.1:DEFAULT_PORT)."""

LOGPROBS_MODE = "processed_logprobs"
WEIGHT_TRANSFER_BACKEND = "nccl"

NCCL_ENVIRONMENT = {
    # The trainer and the server are two containers of one pod: NCCL sees one host (same boot id,
    # same /dev/shm) and tries CUDA P2P, but each container sees only its own GPUs, so importing the
    # peer's buffer fails (NVIDIA/nccl#1647). Without P2P, NCCL moves the weights through /dev/shm.
    "NCCL_P2P_DISABLE": "1",
    # The SHM transport must allocate host memory the same way on both ends, and cuMem host memory
    # needs peer access that these GPUs do not have (NVIDIA/nccl#1838): off, identically, in both.
    "NCCL_CUMEM_ENABLE": "0",
    "NCCL_CUMEM_HOST_ENABLE": "0",
}
"""NCCL settings both containers must share; the operator puts them into each."""


class SidecarError(Exception):
    """The sidecar cannot start; the message names the field or package at fault."""


@dataclass(frozen=True)
class ServeCommand:
    """What the sidecar execs: ``argv`` (a program on PATH, then its arguments) and the variables
    added to its environment."""

    argv: list[str]
    env: dict[str, str]


def max_model_len(run: GRPORun) -> int:
    """The longest sequence the server must accept: spec.rollout.maxModelLen, else a whole prompt
    and completion (a larger value only reserves KV cache that is never used)."""
    grpo = run.spec.grpo
    return run.spec.rollout.max_model_len or grpo.max_prompt_length + grpo.max_completion_length


def serve_command(run: GRPORun, model: ModelLocation, *, port: int = DEFAULT_PORT) -> ServeCommand:
    """The ``vllm serve`` command for ``run``, serving the already-resolved ``model``."""
    if model.gguf_file is not None:
        # The trainer unpacks GGUF into dense weights; vLLM would sample from the quantised ones.
        raise SidecarError(
            f"spec.model.source: {model.source} is a GGUF file, which the vLLM sidecar does not serve; "
            "give a checkpoint directory or a hub id"
        )
    spec = run.spec
    argv = ["vllm", "serve", model.path]
    if model.revision is not None:
        argv.append(f"--revision={model.revision}")
    argv += [
        f"--host={HOST}",
        f"--port={port}",
        f"--dtype={spec.model.dtype}",
        f"--seed={spec.grpo.seed}",
        f"--tensor-parallel-size={spec.resources.vllm_gpus}",
        f"--gpu-memory-utilization={spec.rollout.gpu_memory_utilization}",
        f"--max-model-len={max_model_len(run)}",
        f"--logprobs-mode={LOGPROBS_MODE}",
        "--generation-config=vllm",
        "--weight-transfer-config=" + json.dumps({"backend": WEIGHT_TRANSFER_BACKEND}, separators=(",", ":")),
        # One access-log line per completion request would drown the server's own log.
        "--disable-uvicorn-access-log",
    ]
    return ServeCommand(argv=argv, env={"VLLM_SERVER_DEV_MODE": "1"})


def check_installed_vllm() -> None:
    """Refuse any vLLM but VLLM_VERSION: the routes and bodies the trainer uses are that version's."""
    try:
        installed = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        raise SidecarError(f"vllm is not installed; the sidecar needs vllm=={VLLM_VERSION}") from None
    if installed != VLLM_VERSION:
        raise SidecarError(f"vllm {installed} is installed, but the sidecar speaks vllm=={VLLM_VERSION}'s API")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m grpo_trainer.vllm_server", description=(__doc__ or "").splitlines()[0])
    root.add_argument("manifest", help="the GRPORun manifest the trainer reads")
    root.add_argument("--port", type=int, default=DEFAULT_PORT, help="loopback port to serve on")
    return root


def main(argv: list[str] | None = None) -> int:
    from grpo_trainer.model import ModelError, resolve_model_source
    from grpo_trainer.storage import StorageError
    from grpo_trainer.termination import EXIT_INVALID, EXIT_RETRYABLE
    from grpo_trainer.validation import ManifestError, load_manifest

    args = parser().parse_args(argv)
    try:
        run = load_manifest(args.manifest)
        check_installed_vllm()
        spec = run.spec
        model = resolve_model_source(
            spec.model.source, spec.model.revision, endpoint_url=spec.checkpoints.endpoint_url
        )
        command = serve_command(run, model, port=args.port)
    except (ManifestError, ModelError, SidecarError) as error:
        print(f"vllm sidecar: {args.manifest}: {error}", file=sys.stderr)
        return EXIT_INVALID
    except StorageError as error:  # an s3:// model the store did not give: may pass on another try
        print(f"vllm sidecar: {args.manifest}: {error}", file=sys.stderr)
        return EXIT_RETRYABLE
    print("vllm sidecar: " + " ".join(command.argv), file=sys.stderr, flush=True)
    os.execvpe(command.argv[0], command.argv, {**os.environ, **command.env})


if __name__ == "__main__":
    sys.exit(main())

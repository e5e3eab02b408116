"""On a GPU machine, in one go: the NCCL weight sender against a real vLLM 0.34.0 sidecar.

    python benchmarks/weight_sync/gpu_nccl_check.py MODEL_DIR [--vllm vllm] [--timeout 120]

Needs the trainer's environment with torch's CUDA build (its nvidia-nccl-cu* package, or
GRPO_NCCL_LIBRARY), and vLLM 0.34.0 runnable as ``--vllm`` (the sidecar image's; its torch and
transformers pins differ from the trainer's, so it may live in another environment). MODEL_DIR is
a Hugging Face checkpoint folder both load, in bfloat16; nothing is downloaded.

Each step prints what it checked and its seconds:

1. the binding on GPU 0: a one-rank communicator forms, warms up and broadcasts 64 MiB (NCCL
   accepts the non-blocking ncclConfig_t); a two-rank one whose peer never comes is aborted at 5 s;
2. ``vllm serve`` with the sidecar's argv and environment (grpo_trainer.vllm_server), on the last
   GPU, and the time until it answers /health;
3. the policy (MODEL_DIR's weights, each scaled by 1 + 10 % noise) pushed as weights "1" and "2" by
   the transports ``grpo train`` builds on GPUs (NCCL, /dev/shm as its fallback), then as "3" by
   /dev/shm alone: transport, bytes and seconds of each push;
4. after push "2": the server's samples are labelled "2" and their log-probs are the policy's, as
   the trainer computes them (mean |Δ| under 0.05 and under half of MODEL_DIR's own weights'); after
   push "3", GET /weight_info says "3".

With a single GPU both sides share it, and NCCL refuses a communicator whose two ranks are one GPU
(its "Duplicate GPU" check): step 3 then shows the fallback to /dev/shm instead, and fails. The exit
status is 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "trainer")]

from grpo_trainer.engine import _free_port  # noqa: E402
from grpo_trainer.vllm_server import NCCL_ENVIRONMENT, serve_command  # noqa: E402

PROMPTS = ["What is 17 + 25?", "Name a prime number larger than 50.", "Complete: the quick brown fox"]
SAMPLING = dict(num_generations=4, max_new_tokens=32, temperature=0.7, top_p=1.0)
LOGPROB_TOLERANCE = 0.05  # mean |Δ| between vLLM's and the trainer's bf16 log-probs of the same weights
failures: list[str] = []


def check(passed: bool, what: str) -> None:
    print(f"  {'ok  ' if passed else 'FAIL'} {what}", flush=True)
    if not passed:
        failures.append(what)


def gpu_count() -> int:
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def check_binding(device) -> None:
    import torch

    from grpo_trainer.nccl import NcclError, NcclGroup, NcclLibrary, NcclUnavailable, version_name

    began = time.monotonic()
    try:
        library = NcclLibrary()
        alone = NcclGroup(library, library.unique_id(), rank=0, world_size=1, timeout=30, device=device,
                          current_stream=torch.cuda.current_stream)
        alone.wait_formed()
        alone.warm_up()
        alone.broadcast(torch.ones(64 << 20, dtype=torch.uint8, device=device)).wait()
        alone.close()
    except (NcclError, NcclUnavailable) as error:
        check(False, f"a one-rank communicator: {error}")
        return
    check(True, f"NCCL {version_name(library.version)} ({library.path}): a one-rank communicator formed, warmed up "
                f"and broadcast 64 MiB in {time.monotonic() - began:.2f} s")
    began = time.monotonic()
    lonely = NcclGroup(library, library.unique_id(), rank=0, world_size=2, timeout=5, device=device,
                       current_stream=torch.cuda.current_stream)
    try:
        lonely.wait_formed()
        check(False, "a two-rank communicator formed without its peer")
    except NcclError as error:
        waited = time.monotonic() - began
        check("not done within 5 s; communicator aborted" in str(error) and waited < 15,
              f"a two-rank communicator without its peer: {error} (after {waited:.1f} s)")


def sidecar_command(model_dir: Path, vllm: str, port: int, shared_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """The sidecar's ``vllm serve`` argv (with ``vllm`` as the program) and the variables it adds."""
    from grpo_trainer.model import resolve_model_source
    from grpo_trainer.validation import validate_manifest

    run = validate_manifest({
        "apiVersion": "grpo.dev/v1alpha1", "kind": "GRPORun", "metadata": {"name": "gpu-nccl-check"},
        "spec": {
            "model": {"source": str(model_dir.resolve()), "dtype": "bfloat16"},
            "dataset": {"source": "builtin://arithmetic"},
            "grpo": {"maxPromptLength": 128, "maxCompletionLength": 128},
            "resources": {"gpus": 2, "trainerGpus": 1, "vllmGpus": 1},
            "rollout": {"backend": "server", "gpuMemoryUtilization": 0.4 if shared_gpu else 0.8},
        },
    })
    command = serve_command(run, resolve_model_source(str(model_dir.resolve())), port=port)
    return [vllm, *command.argv[1:]], {**command.env, **NCCL_ENVIRONMENT}


def push_and_check(model_dir: Path, url: str, timeout: float, device) -> None:
    import torch

    from grpo_trainer.model import load_model, load_tokenizer, resolve_model_source
    from grpo_trainer.spec import RolloutSpec
    from grpo_trainer.train import _completion_logps, _padded_batch
    from grpo_trainer.vllm_client import ServerSampler
    from grpo_trainer.weight_sync import ShmSafetensors, WeightSync, default_transports

    location = resolve_model_source(str(model_dir))
    tokenizer = load_tokenizer(location)
    base = load_model(location, tokenizer, dtype="bfloat16", device=str(device)).eval()
    policy = load_model(location, tokenizer, dtype="bfloat16", device=str(device)).eval()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    sampler = ServerSampler(url, eos_token_ids=[tokenizer.eos_token_id],
                            rollout=RolloutSpec(backend="server", startup_timeout_seconds=900))
    began = time.monotonic()
    sampler.wait_until_ready()
    print(f"  /health answered after {time.monotonic() - began:.0f} s more", flush=True)

    print("3. pushes", flush=True)

    sync = WeightSync(url, dtype=torch.bfloat16, timeout=timeout, label="default", wait_until_ready=sampler.wait_until_ready,
                      transports=default_transports(timeout, on_gpu=True, server_workers=1))
    for version in ("1", "2"):
        report = sync.push(policy, version)
        check(report.transport == "nccl", f"push {version}: {report.transport}, {report.bytes / 1e6:.1f} MB in "
                                          f"{report.seconds:.2f} s ({report.bytes / 1e9 / report.seconds:.2f} GB/s)")

    print("4. what the server samples from", flush=True)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    rollouts = sampler.generate(prompts, seed=7, **SAMPLING)
    check(rollouts.weight_versions == ["2"], f"the samples are labelled {rollouts.weight_versions}, pushed: ['2']")
    batch = _padded_batch(rollouts, tokenizer.pad_token_id, device)
    mask = batch.completion_mask.bool()
    differences = {}
    with torch.no_grad():
        for name, model in (("pushed policy", policy), ("MODEL_DIR's weights", base)):
            logps, _ = _completion_logps(model, batch, SAMPLING["temperature"])
            difference = (logps - batch.sampler_logps)[mask].abs()
            differences[name] = difference.mean().item()
            print(f"  |vLLM log-prob - {name}'s|: mean {differences[name]:.4f}, max {difference.max().item():.4f} "
                  f"over {int(mask.sum())} tokens", flush=True)
    check(differences["pushed policy"] < min(LOGPROB_TOLERANCE, differences["MODEL_DIR's weights"] / 2),
          "the server samples from the pushed weights")

    shm = WeightSync(url, dtype=torch.bfloat16, timeout=timeout, label="2", transports=[ShmSafetensors()],
                     wait_until_ready=sampler.wait_until_ready)
    report = shm.push(policy, "3")
    check(report.transport == "shm", f"push 3 by /dev/shm alone: {report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s")
    with urllib.request.urlopen(url + "/weight_info", timeout=30) as response:
        served = json.load(response)["weight_version"]
    check(served == "3", f"GET /weight_info: {served!r}")
    sync.close()
    shm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--vllm", default="vllm", help="the vllm executable of vLLM 0.34.0's environment")
    parser.add_argument("--timeout", type=float, default=120.0, help="spec.rollout.weightSyncTimeoutSeconds")
    args = parser.parse_args()
    gpus = gpu_count()
    vllm_gpu = gpus - 1
    # Both sides as in the pod: one GPU each, the same NCCL settings (grpo_trainer.vllm_server.NCCL_ENVIRONMENT).
    os.environ.update(NCCL_ENVIRONMENT, CUDA_VISIBLE_DEVICES="0")
    import torch

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    print(f"1. the NCCL binding on GPU 0 ({gpus} GPUs here)", flush=True)
    check_binding(device)
    print(f"2. vllm serve on GPU {vllm_gpu}{' (shared with the trainer)' if vllm_gpu == 0 else ''}", flush=True)
    port = _free_port()
    argv, variables = sidecar_command(args.model_dir, args.vllm, port, shared_gpu=vllm_gpu == 0)
    print("  " + " ".join(argv), flush=True)
    server = subprocess.Popen(argv, env={**os.environ, **variables, "CUDA_VISIBLE_DEVICES": str(vllm_gpu)})
    try:
        push_and_check(args.model_dir, f"http://127.0.0.1:{port}", args.timeout, device)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print("all checks passed" if not failures else f"{len(failures)} checks failed: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight sync on CPU: seconds and bytes per push, for both paths, against the reference server.

    .venv/bin/python benchmarks/weight_sync/bench_weight_sync.py --pushes 5

For the tiny test model (a 2-layer Llama, hidden 32, SmolLM2's 49k vocabulary) and
SmolLM2-135M-Instruct (the GGUF of examples/cpu-smollm2.yaml, dequantised to float32 as the trainer
loads it), the reference server (tests/reference_vllm_server.py) runs in its own process and this
one pushes the policy's float32 weights ``--pushes`` times by each path alone:

- broadcast: /pause → /start_weight_update → /update_weights beside the packed gloo broadcast →
  /finish_weight_update → /reset_prefix_cache → /resume → GET /weight_info (the CPU stand-in for NCCL);
- shm: /pause → safetensors written under /dev/shm → /collective_rpc reload_weights →
  /update_weight_version → /reset_prefix_cache → /resume → GET /weight_info.

Each push's seconds are the whole sequence, as WeightSync reports it in a step's record (sync/seconds);
the bytes are what crossed (sync/bytes). The first broadcast push also forms the group.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "trainer")]

from fixtures_models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, build_tiny_model, find_smollm2_gguf  # noqa: E402
from test_vllm_rollouts import reference_server  # noqa: E402

from grpo_trainer.model import load_model, load_tokenizer, resolve_model_source  # noqa: E402
from grpo_trainer.weight_sync import PackedBroadcast, ShmSafetensors, WeightSync  # noqa: E402

TIMEOUT = 300.0


def measure(source: str, pushes: int) -> dict[str, list]:
    location = resolve_model_source(source)
    policy = load_model(location, load_tokenizer(location), dtype="float32", device="cpu")
    results = {}
    with reference_server(source) as url:
        for transport in (PackedBroadcast(TIMEOUT), ShmSafetensors()):
            sync = WeightSync(url, dtype=torch.float32, timeout=TIMEOUT, transports=[transport], label="default",
                              wait_until_ready=lambda: None)
            results[transport.name] = [sync.push(policy, str(version)) for version in range(1, pushes + 1)]
            sync.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the server takes the other core
    with tempfile.TemporaryDirectory() as folder:
        models = {"tiny": str(build_tiny_model(Path(folder), find_smollm2_gguf())),
                  "SmolLM2-135M": f"package://{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"}
        print("| model | path | MB per push | seconds per push (each) | median | MB/s at the median |")
        print("|---|---|---|---|---|---|")
        for name, source in models.items():
            for path, reports in measure(source, args.pushes).items():
                seconds = [report.seconds for report in reports]
                megabytes = reports[0].bytes / 1e6
                median = statistics.median(seconds)
                each = " / ".join(f"{s:.2f}" for s in seconds)
                print(f"| {name} | {path} | {megabytes:.1f} | {each} | {median:.2f} | {megabytes / median:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()

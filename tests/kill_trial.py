"""The kill/resume trial shared by test_checkpoint.py and benchmarks/checkpoint/bench_resume.py:
train a run to the end in one go, then again while SIGKILLing it at random moments and restarting
it each time, and compare the two.

Runs go through the real command line (``python -m grpo_trainer.cli train``) in child processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


@dataclass
class Trial:
    kills: int = 0
    attempts: int = 0
    killed_after_steps: list[int] = field(default_factory=list)
    """The last step finished when each kill landed."""
    resumed_at: list[int] = field(default_factory=list)
    """The checkpoint step each attempt resumed from (0: from scratch)."""
    attempt_seconds: list[float] = field(default_factory=list)


def train_command(manifest: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "grpo_trainer.cli", "train", str(manifest), "--run-dir", str(run_dir)]


def child_env(**extra: str) -> dict[str, str]:
    # One thread, and the same in every run: float sums are then done in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    # What an in-process run in this test process set (its rendezvous port is still taken): a child
    # is a group of one on a port of its own.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_to_end(manifest: Path, run_dir: Path, env: dict[str, str], timeout: float = 600) -> float:
    """Train uninterrupted; returns the wall seconds it took."""
    began = time.monotonic()
    result = subprocess.run(train_command(manifest, run_dir), env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"uninterrupted run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.monotonic() - began


def run_with_kills(
    manifest: Path, run_dir: Path, env: dict[str, str], *, kills: int, steps_per_attempt: int, startup_seconds: float, seed: int
) -> Trial:
    """Start the run and SIGKILL it, ``kills`` times, then let it finish. Each kill waits until the
    attempt has trained a random number of steps in [0, steps_per_attempt] (fewer when the run has
    fewer left, so every kill lands before the end), then a random part of the next step, timed by the
    last step's own ``time/step`` (or of ``startup_seconds`` before the first step). Kills thus land in
    start-up, rollouts, training and checkpoint writes, whatever the speed of the machine."""
    rng = random.Random(seed)
    body = yaml.safe_load(manifest.read_text())
    max_steps, run = body["spec"]["grpo"]["maxSteps"], run_dir / body["metadata"]["name"]
    trial = Trial()
    while True:
        trial.attempts += 1
        log = run_dir.parent / f"{run_dir.name}-attempt-{trial.attempts}.log"
        began = time.monotonic()
        with open(log, "w") as stderr:
            child = subprocess.Popen(train_command(manifest, run_dir), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        if trial.kills < kills:
            checkpoints = _complete_checkpoints(run)
            resumes_at = int(checkpoints[-1].name.removeprefix("step-")) if checkpoints else 0
            target = min(rng.randint(0, steps_per_attempt), max_steps - 1 - resumes_at)
            fraction = rng.random()
            while child.poll() is None and len(_steps_logged(log)) < target:
                time.sleep(0.02)
            time.sleep(fraction * (metrics(run)[-1]["time/step"] if target else startup_seconds))
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
        child.wait(timeout=600)
        trial.attempt_seconds.append(time.monotonic() - began)
        resumed = re.search(r"resumed from \S+ at step (\d+)", log.read_text())
        trial.resumed_at.append(int(resumed.group(1)) if resumed else 0)
        if child.returncode == -signal.SIGKILL:
            trial.kills += 1
            trial.killed_after_steps.append(max(_steps_logged(log), default=trial.resumed_at[-1]))
            continue
        if child.returncode != 0:
            raise AssertionError(f"attempt {trial.attempts} failed ({child.returncode}):\n{log.read_text()[-3000:]}")
        return trial  # finished (if before all kills landed, the trial counts fewer kills)


def _complete_checkpoints(run: Path) -> list[Path]:
    """The run's checkpoint folders that hold a manifest, oldest first: a resume takes the last."""
    return sorted(manifest.parent for manifest in run.glob("checkpoints/step-*/manifest.json"))


def _steps_logged(log: Path) -> list[int]:
    """The steps an attempt has finished, from its log (one line per step when not on a terminal)."""
    return [int(step) for step in re.findall(r"\bstep (\d+): reward", log.read_text())]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(_complete_checkpoints(run_dir)[-1] / "model" / "model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def differences(reference: Path, resumed: Path) -> list[str]:
    """Why the resumed run is not the uninterrupted one; empty when weights are bitwise equal and
    the metrics streams hold the same steps once each with the same rewards."""
    problems = []
    expected, actual = final_weights(reference), final_weights(resumed)
    if expected.keys() != actual.keys():
        problems.append(f"tensor names differ: {sorted(expected.keys() ^ actual.keys())}")
    problems += [f"{name} differs" for name in expected.keys() & actual.keys() if not torch.equal(expected[name], actual[name])]
    steps, resumed_steps = [r["step"] for r in metrics(reference)], [r["step"] for r in metrics(resumed)]
    if steps != resumed_steps:
        problems.append(f"metrics steps {resumed_steps}, expected {steps}")
    for ours, theirs in zip(metrics(reference), metrics(resumed), strict=True):
        if (ours["reward"], ours["entropy"]) != (theirs["reward"], theirs["entropy"]):
            problems.append(f"step {ours['step']}: reward, entropy {theirs['reward']}, {theirs['entropy']}, "
                            f"expected {ours['reward']}, {ours['entropy']}")
    return problems

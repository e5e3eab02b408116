"""Does the README's CPU example learn? Accuracy reward over 30 minutes of wall time.

    .venv/bin/python benchmarks/learning/bench_learning.py [--manifest examples/cpu-smollm2.yaml]
        [--minutes 30] [--run-dir /tmp/grpo-learning] [--window 5] [--rise 0.3]
    .venv/bin/python benchmarks/learning/bench_learning.py --analyse RUN_DIR/cpu-smollm2

Runs ``grpo train`` on the manifest, stamps each metrics.jsonl line with the wall-clock minute it
appeared (model loading included), and stops the run at ``--minutes`` (SIGTERM: the trainer
checkpoints and exits) unless maxSteps comes first. Then prints one line per step and the verdict:
the mean accuracy of the first and of the last ``--window`` steps, and the first minute at which the
mean of the last ``--window`` steps stood ``--rise`` above the first window's. The load average is
printed at start and end: the machine's other work slows a CPU run a lot.

``--analyse`` reads a finished run instead, with minutes from the steps' own times (model loading
left out).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLL_S = 2.0
STOP_GRACE_S = 300  # the trainer's SIGTERM path writes a checkpoint first


def run_and_stamp(manifest: Path, run_dir: Path, minutes: float) -> list[dict]:
    """Train ``manifest`` into ``run_dir`` for at most ``minutes``; its step records, each with
    ``minute``: the wall-clock minutes since launch at which it was written."""
    from grpo_trainer.validation import load_manifest

    metrics = run_dir / load_manifest(manifest).metadata.name / "metrics.jsonl"
    if metrics.exists():
        sys.exit(f"{metrics} exists; give a fresh --run-dir")
    command = [str(REPO / ".venv" / "bin" / "grpo"), "train", str(manifest), "--run-dir", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "train.log").open("w")
    began = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    records: list[dict] = []
    try:
        while process.poll() is None:
            if time.monotonic() - began > minutes * 60:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=STOP_GRACE_S)
                break
            records += _new_records(metrics, len(records), (time.monotonic() - began) / 60)
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    records += _new_records(metrics, len(records), (time.monotonic() - began) / 60)
    if process.returncode not in (0, -signal.SIGTERM) and not records:
        sys.exit(f"grpo train failed (exit {process.returncode}); see {run_dir / 'train.log'}")
    return records


def _new_records(metrics: Path, seen: int, minute: float) -> list[dict]:
    if not metrics.exists():
        return []
    lines = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    # A line still being written has no newline yet and fails to parse: leave it to the next poll.
    new = []
    for line in lines[seen:]:
        try:
            new.append({**json.loads(line), "minute": minute})
        except json.JSONDecodeError:
            break
    return new


def stamped_from_step_times(metrics: Path) -> list[dict]:
    """A finished run's records, ``minute`` being the sum of the step times so far."""
    records, seconds = [], 0.0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            seconds += record["time/step"]
            records.append({**record, "minute": seconds / 60})
    return records


def summary(records: list[dict], window: int, rise: float) -> dict:
    """First and last ``window``-step mean accuracy, and the first minute the trailing mean stood
    ``rise`` above the first (None if never)."""
    accuracy = [record["accuracy"] for record in records]
    if len(accuracy) < 2 * window:
        sys.exit(f"{len(accuracy)} steps: too few for two windows of {window} (see --window)")
    first = sum(accuracy[:window]) / window
    last = sum(accuracy[-window:]) / window
    reached = next(
        (
            records[end - 1]["minute"]
            for end in range(2 * window, len(accuracy) + 1)
            if sum(accuracy[end - window : end]) / window >= first + rise
        ),
        None,
    )
    return {"steps": len(records), "first": first, "last": last, "rise": last - first, "minute_reached": reached}


def print_report(records: list[dict], window: int, rise: float) -> None:
    result = summary(records, window, rise)
    print(f"{'step':>4} {'min':>6} {'acc':>6} {'zero-std':>8} {'clipped':>7} {'len':>5} {'step s':>6}")
    for record in records:
        print(
            f"{record['step']:>4} {record['minute']:>6.1f} {record['accuracy']:>6.3f} "
            f"{record['frac_reward_zero_std']:>8.2f} {record['completions/clipped_ratio']:>7.2f} "
            f"{record['completions/mean_length']:>5.1f} {record['time/step']:>6.1f}"
        )
    reached = "never" if result["minute_reached"] is None else f"at minute {result['minute_reached']:.1f}"
    print(
        f"\naccuracy: first {window} steps {result['first']:.3f}, last {window} steps {result['last']:.3f} "
        f"(rise {result['rise']:+.3f} over {result['steps']} steps); +{rise} reached {reached}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=REPO / "examples" / "cpu-smollm2.yaml")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/grpo-learning"))
    parser.add_argument("--window", type=int, default=5, help="steps averaged at each end")
    parser.add_argument("--rise", type=float, default=0.3)
    parser.add_argument("--analyse", type=Path, metavar="RUN_DIR", help="report on a finished run instead")
    args = parser.parse_args()
    if args.analyse:
        records = stamped_from_step_times(args.analyse / "metrics.jsonl")
    else:
        print(f"load average at start: {os.getloadavg()}", flush=True)
        records = run_and_stamp(args.manifest.resolve(), args.run_dir, args.minutes)
        print(f"load average at end: {os.getloadavg()}")
    print_report(records, args.window, args.rise)


if __name__ == "__main__":
    main()

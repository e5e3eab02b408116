"""Grading time of a whole benchmark's completions, and its verdicts against those an evaluation stored.

    .venv/bin/python benchmarks/evaluation/regrade.py EVAL_DIR/gsm8k.jsonl [--benchmark gsm8k] [--workers N]

Reads the rows ``grpo eval`` wrote (completion, gold, verdict), grades every completion again with
the benchmark's grading profile in a fresh grader pool (start-up included, as in an evaluation
Job), and prints wall and CPU seconds (the parent's and the workers'), per 1,000 completions, and
how many verdicts differ from the stored ones (0 unless the grader changed since the evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from grpo_trainer.grading import BENCHMARK_PROFILES, Grader


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("--benchmark", help="default: the file's name (gsm8k.jsonl → gsm8k)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    benchmark = args.benchmark or args.rows.stem
    rows = [json.loads(line) for line in args.rows.read_text(encoding="utf-8").splitlines()]

    started_wall, started_cpu = time.monotonic(), cpu_seconds()
    with Grader(profile=BENCHMARK_PROFILES[benchmark], workers=args.workers) as grader:
        verdicts = grader.verify_batch([row["completion"] for row in rows], [row["gold"] for row in rows])
    wall, cpu = time.monotonic() - started_wall, cpu_seconds() - started_cpu  # workers are reaped on close

    changed = sum(verdict.correct != row["correct"] for verdict, row in zip(verdicts, rows))
    report = {
        "benchmark": benchmark,
        "profile": BENCHMARK_PROFILES[benchmark],
        "completions": len(rows),
        "workers": args.workers,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_1000": round(1000 * cpu / max(len(rows), 1), 2),
        "accuracy": sum(v.correct for v in verdicts) / max(len(rows), 1),
        "verdicts_changed_vs_stored": changed,
        "ungraded": sum(v.reason is not None for v in verdicts),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Grading time of whole benchmarks, as an evaluation Job grades them after generating.

    .venv/bin/python benchmarks/evaluation/regrade.py EVAL_DIR/gsm8k.jsonl [...]     # what grpo eval wrote
    .venv/bin/python benchmarks/evaluation/regrade.py --solutions ../shared/data        # the five paper sets

The first form grades again the rows ``grpo eval`` wrote (completion, gold) and counts the verdicts
that differ from the stored ones (0 unless the grader changed since). The second grades, for every
problem of the paper's five benchmarks, its reference solution as the completion (AMC23 has none:
``\\boxed{answer}``), a stand-in for a model's long worked answers. Each benchmark gets a fresh
grader pool (start-up included, as in an evaluation Job); wall and CPU seconds (the parent's and
the live workers', start-up included) and CPU seconds per 1,000 completions are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import psutil

from grpo_trainer.benchmarks import load_benchmark
from grpo_trainer.grading import BENCHMARK_PROFILES, Grader
from grpo_trainer.spec import BENCHMARKS


def solution_rows(data_dir: Path, benchmark: str) -> list[dict]:
    rows = []
    for problem, raw in zip(load_benchmark(benchmark, data_dir), _raw_rows(data_dir, benchmark), strict=True):
        completion = raw.get("solution") or f"The answer is $\\boxed{{{raw['answer']}}}$."
        rows.append({"completion": completion, "gold": problem.gold, "correct": None})
    return rows


def _raw_rows(data_dir: Path, benchmark: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / benchmark / "test.jsonl").read_text(encoding="utf-8").splitlines()]


def grade(benchmark: str, rows: list[dict], workers: int) -> dict:
    started_wall, started_cpu = time.monotonic(), time.process_time()
    with Grader(profile=BENCHMARK_PROFILES[benchmark], workers=workers, timeout_s=30.0) as grader:
        verdicts = grader.verify_batch([row["completion"] for row in rows], [row["gold"] for row in rows])
        wall = time.monotonic() - started_wall
        # The workers fork from a forkserver, not from us: their CPU is read from each process.
        pool = [psutil.Process(worker.process.pid).cpu_times() for worker in grader._pool]
        cpu = time.process_time() - started_cpu + sum(times.user + times.system for times in pool)
    stored = [row["correct"] for row in rows]
    return {
        "benchmark": benchmark,
        "profile": BENCHMARK_PROFILES[benchmark],
        "completions": len(rows),
        "mean_chars": round(sum(len(row["completion"]) for row in rows) / max(len(rows), 1)),
        "workers": workers,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_1000": round(1000 * cpu / max(len(rows), 1), 1),
        "accuracy": round(sum(v.correct for v in verdicts) / max(len(rows), 1), 4),
        "verdicts_changed_vs_stored": (
            None if None in stored else sum(v.correct != c for v, c in zip(verdicts, stored, strict=True))
        ),
        "ungraded": sum(v.reason is not None for v in verdicts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, nargs="*", help="<benchmark>.jsonl files written by grpo eval")
    parser.add_argument("--solutions", type=Path, metavar="DATA_DIR", help="grade the five sets' reference solutions")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    jobs = [(path.stem, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]) for path in args.rows]
    if args.solutions:
        jobs += [(benchmark, solution_rows(args.solutions, benchmark)) for benchmark in BENCHMARKS]
    for benchmark, rows in jobs:
        print(json.dumps(grade(benchmark, rows, args.workers)), flush=True)


if __name__ == "__main__":
    main()

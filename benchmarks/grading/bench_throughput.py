"""Throughput and verdicts: our batch grader and scorer against Open-RS's reward functions.

    .venv/bin/python benchmarks/grading/bench_throughput.py [--data ../shared/data] [--repeats 2]
        [--workloads benchmark grpo6 grpo16]

Both sides score the same completions against the same golds: each set's gold as the paper's
evaluator (lighteval) took it, i.e. ``solution`` for math500 and minerva and ``answer``
elsewhere. Two workloads (completions.py), each ≥ 5,000 completions:

- ``benchmark``: the 10,013 completions of :func:`build_samples`, a few of distinct kinds per
  problem, in set order;
- ``grpo6``, ``grpo16``: what a GRPO trainer grades (:func:`build_grpo_steps`), 60 steps of 96
  completions, groups of 6 (Open-RS's num_generations) or 16 completions per prompt.

The reference (open_rs_reference.py) is called as TRL 0.16 called reward functions: ``f(prompts=...,
completions=[[{"role": "assistant", "content": c}]], solution=[...])`` on one step's batch of 96
at a time, sequentially, in one process. Every measurement runs in a fresh process after the same
untimed warm-up (math-verify's LaTeX parser gets faster as it sees more LaTeX), and the best of
``--repeats`` runs is kept. CPU seconds (ours: the parent's and the workers') are reported too:
another job on the machine moves them much less than wall time.

Measured per workload: (1) verdicts: our Grader vs Open-RS's accuracy_reward, on all rows and on
the rows whose gold Open-RS can parse (the others are the trap rows, where Open-RS's reward is
1.0 whatever the completion); (2) rewards: our RewardScorer with format + 2 × cosine (characters)
vs Open-RS's format_reward + cosine_scaled_reward, the reward set of Open-RS's experiments 2 and
3; (3) our Grader with its worker caches off (``cache_entries=0``): its verdicts must equal the
cached ones, and the time says what the caches bought; (4) our Grader with latex2sympy's LL parser
alone (``sll_first_parsing=False``, as before SLL-first parsing): the same check, and what SLL bought.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
from completions import build_grpo_steps, build_samples, load_rows  # noqa: E402

GOLD_COLUMN = {"math500": "solution", "minerva": "solution"}  # lighteval's; "answer" elsewhere
GRPO_STEPS = 60
WORKLOADS = {
    "benchmark": build_samples,
    "grpo6": lambda data: build_grpo_steps(data, group_size=6, steps=GRPO_STEPS),
    "grpo16": lambda data: build_grpo_steps(data, group_size=16, steps=GRPO_STEPS),
}


def samples(data: Path, workload: str = "benchmark"):
    """The workload's completions, with each set's gold column as lighteval used it."""
    rows = {}
    out = []
    for sample in WORKLOADS[workload](data):
        column = GOLD_COLUMN.get(sample.benchmark, "answer")
        if sample.benchmark not in rows:
            rows[sample.benchmark] = {row["id"]: row for row in load_rows(data, sample.benchmark)}
        out.append((sample, rows[sample.benchmark][sample.row_id][column]))
    return out


def warm_up_pairs(data: Path) -> list[tuple[str, str]]:
    """Untimed warm-up: AIME 1983-2023 training problems, disjoint from the benchmark sets."""
    pairs = []
    for row in load_rows_file(data / "train_partial_deepscaler_aime" / "train.jsonl")[:400]:
        reasoning = (row.get("solution") or "").replace("\\boxed", "")
        completion = f"<think>\n{reasoning}\n</think>\n<answer>\n$\\boxed{{{row['answer']}}}$\n</answer>"
        pairs.append((completion, f"${row['answer']}$"))
    return pairs


def load_rows_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def batches(items: list, size: int):
    return [items[start : start + size] for start in range(0, len(items), size)]


def as_messages(completions: list[str]) -> list[list[dict]]:
    return [[{"role": "assistant", "content": completion}] for completion in completions]


# ------------------------------------------------------------------- one measurement (a process)


def measure(side: str, what: str, workload: str, subset: str, data: Path, batch: int, workers: int) -> dict:
    """One timed run; ``side`` is "reference", "ours", "ours-uncached" or "ours-ll"; ``subset`` is "all" or a
    JSON file of row indices (parsed elsewhere, as parsing golds here would warm this process's
    LaTeX parser on exactly these golds)."""
    pairs = [(sample.completion, gold) for sample, gold in samples(data, workload)]
    if subset != "all":
        pairs = [pairs[i] for i in json.loads(Path(subset).read_text())]
    completions, golds = [c for c, _ in pairs], [g for _, g in pairs]
    warm = warm_up_pairs(data)
    if side == "reference":
        import open_rs_reference as ref
        from math_verify.parser import parse_latex_with_timeout  # math-verify's own 20-entry cache

        funcs = ref.open_rs_reward_funcs(["accuracy"] if what == "verdicts" else ["format", "cosine"])
        with contextlib.redirect_stdout(io.StringIO()):  # its "Failed to parse gold" prints
            ref.accuracy_reward(completions=as_messages([c for c, _ in warm]), solution=[g for _, g in warm])
            cache_before = parse_latex_with_timeout.cache_info()
            started, cpu_started = time.perf_counter(), time.process_time()
            scores = [[] for _ in funcs]
            for chunk_c, chunk_g in zip(batches(completions, batch), batches(golds, batch), strict=True):
                prompts = [[{"role": "user", "content": "problem"}]] * len(chunk_c)
                for out, func in zip(scores, funcs, strict=True):
                    out += func(prompts=prompts, completions=as_messages(chunk_c), solution=chunk_g)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            cache_after = parse_latex_with_timeout.cache_info()
        cache = {"parse_hits": cache_after.hits - cache_before.hits, "parse_misses": cache_after.misses - cache_before.misses}
        return {"seconds": elapsed, "cpu_seconds": cpu, "items": len(pairs), "scores": scores, "cache": cache}

    from grpo_trainer.grading import CACHE_ENTRIES, Grader
    from grpo_trainer.rewards import RewardScorer
    from grpo_trainer.spec import RewardParams, RewardSpec

    cache_entries = 0 if side == "ours-uncached" else CACHE_ENTRIES
    with Grader(workers=workers, cache_entries=cache_entries, sll_first_parsing=side != "ours-ll") as grader:
        grader.verify_batch([c for c, _ in warm], [g for _, g in warm])
        cosine = RewardSpec(name="cosine", weight=2.0, params=RewardParams(length_unit="characters"))
        rewards = [RewardSpec(name="format"), cosine]
        scorer = RewardScorer(rewards, grader=grader)
        workers = [psutil.Process(worker.process.pid) for worker in grader._pool]  # to add up their CPU
        cache_before = grader.cache_stats()
        started, cpu_started = time.perf_counter(), time.process_time() + sum(map(cpu_seconds, workers))
        verdicts, scores = [], [[], []]
        for chunk_c, chunk_g in zip(batches(completions, batch), batches(golds, batch), strict=True):
            if what == "verdicts":
                verdicts += grader.verify_batch(chunk_c, chunk_g)
            else:
                scored = scorer.score(chunk_c, chunk_g)
                verdicts += scored.verdicts
                scores[0] += scored.per_function["format"]
                scores[1] += scored.per_function["cosine"]
        elapsed = time.perf_counter() - started
        cpu = time.process_time() + sum(map(cpu_seconds, workers)) - cpu_started
        assert [w.pid for w in workers] == [w.process.pid for w in grader._pool], "a worker was replaced"
        cache = grader.cache_stats() - cache_before
        worker_rss_mb = max(worker.memory_info().rss for worker in workers) / 2**20
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "items": len(pairs),
        "correct": [v.correct for v in verdicts],
        "reasons": [v.reason for v in verdicts],
        "item_seconds": [v.seconds for v in verdicts],
        "scores": scores,
        "cache": dict(cache),
        "worker_rss_mb": worker_rss_mb,
    }


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def reference_gold_parses(golds: list[str]) -> list[bool]:
    """Whether Open-RS's reward could parse each gold (if not, it paid 1.0 whatever the answer)."""
    from math_verify import LatexExtractionConfig, parse

    known: dict[str, bool] = {}
    for gold in golds:
        if gold not in known:
            known[gold] = bool(parse(gold, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()]))
    return [known[gold] for gold in golds]


# ---------------------------------------------------------------------------------- the report


def best_of(repeats: int, *args: str) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--measure", *args], check=True, capture_output=True, text=True
        ).stdout
        runs.append(json.loads(out.splitlines()[-1]))
    print(f"  {args[:3]} runs: {[round(run['seconds'], 2) for run in runs]} s", flush=True)
    return min(runs, key=lambda run: run["seconds"])


def hit_rate(cache: dict, name: str) -> float | None:
    looked_up = cache.get(f"{name}_hits", 0) + cache.get(f"{name}_misses", 0)
    return cache.get(f"{name}_hits", 0) / looked_up if looked_up else None


def timing(ref: dict, ours: dict) -> dict:
    return {
        "items": ref["items"],
        "reference_s": ref["seconds"],
        "ours_s": ours["seconds"],
        "speedup": ref["seconds"] / ours["seconds"],
        "reference_cpu_s": ref["cpu_seconds"],
        "ours_cpu_s": ours["cpu_seconds"],
        "reference_items_per_s": ref["items"] / ref["seconds"],
        "ours_items_per_s": ours["items"] / ours["seconds"],
        "reference_parse_hit_rate": hit_rate(ref["cache"], "parse"),
        "ours_parse_hit_rate": hit_rate(ours["cache"], "parse"),
        "ours_verify_hit_rate": hit_rate(ours["cache"], "verify"),
        "reference_cache": ref["cache"],
        "ours_cache": ours["cache"],
    }


def report_workload(workload: str, data: Path, run) -> dict:
    """Every measurement of one workload; ``run(side, what, subset)`` is the best of the repeats."""
    pairs = samples(data, workload)
    parses = reference_gold_parses([gold for _, gold in pairs])
    compared = [i for i, ok in enumerate(parses) if ok]
    trap = [i for i, ok in enumerate(parses) if not ok]
    print(f"{workload}: {len(pairs)} completions; Open-RS can parse the gold of {len(compared)}", flush=True)
    report: dict = {
        "completions": len(pairs),
        "distinct_completions": len({sample.completion for sample, _ in pairs}),
        "reference_gold_parses": len(compared),
    }

    ref, ours, uncached, ll = (run(workload, side, "verdicts") for side in ("reference", "ours", "ours-uncached", "ours-ll"))
    ref_correct = [score == 1.0 for score in ref["scores"][0]]
    item_seconds = sorted(ours["item_seconds"])
    report["verdicts"] = timing(ref, ours) | {
        "compared_rows": len(compared),
        "mismatches": [
            {"row": pairs[i][0].row_id, "kind": pairs[i][0].kind, "reference": ref_correct[i], "ours": ours["correct"][i]}
            for i in compared
            if ref_correct[i] != ours["correct"][i]
        ],
        "trap_rows": len(trap),
        "trap_rows_reference_paid_1": sum(ref["scores"][0][i] == 1.0 for i in trap),
        "trap_rows_we_grade_correct": sum(ours["correct"][i] for i in trap),
        "our_failures": {r: ours["reasons"].count(r) for r in set(ours["reasons"]) if r},
        "item_latency_s": {
            "p50": statistics.median(item_seconds),
            "p99": item_seconds[int(0.99 * (len(item_seconds) - 1))],
            "max": item_seconds[-1],
        },
    }
    report["caches"] = {
        "uncached_s": uncached["seconds"],
        "cached_s": ours["seconds"],
        "speedup": uncached["seconds"] / ours["seconds"],
        "uncached_cpu_s": uncached["cpu_seconds"],
        "cached_cpu_s": ours["cpu_seconds"],
        "worker_rss_mb_uncached_cached": [uncached["worker_rss_mb"], ours["worker_rss_mb"]],
        "verdicts_that_differ": sum(
            (a, b) != (c, d)
            for a, b, c, d in zip(ours["correct"], ours["reasons"], uncached["correct"], uncached["reasons"], strict=True)
        ),
    }

    report["sll_first"] = {
        "ll_s": ll["seconds"],
        "sll_first_s": ours["seconds"],
        "ll_cpu_s": ll["cpu_seconds"],
        "sll_first_cpu_s": ours["cpu_seconds"],
        "cpu_s_per_1000_reference_ll_sll_first": [1000 * side["cpu_seconds"] / side["items"] for side in (ref, ll, ours)],
        "verdicts_that_differ": sum(
            (a, b) != (c, d) for a, b, c, d in zip(ours["correct"], ours["reasons"], ll["correct"], ll["reasons"], strict=True)
        ),
    }

    ref, ours = run(workload, "reference", "rewards"), run(workload, "ours", "rewards")
    report["rewards"] = timing(ref, ours) | {
        "format_mismatches": sum(a != b for a, b in zip(ref["scores"][0], ours["scores"][0], strict=True)),
        "cosine_mismatches_on_compared_rows": sum(abs(ref["scores"][1][i] - ours["scores"][1][i]) > 1e-9 for i in compared),
    }

    with tempfile.NamedTemporaryFile("w", suffix=".json") as comparable:
        json.dump(compared, comparable)
        comparable.flush()
        ref, ours = run(workload, "reference", "verdicts", comparable.name), run(workload, "ours", "verdicts", comparable.name)
    report["verdicts_on_comparable_rows_only"] = timing(ref, ours)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1].parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=96, help="completions per call (one step's batch)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--measure", nargs=4, metavar=("WORKLOAD", "SIDE", "WHAT", "SUBSET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        workload, side, what, subset = args.measure
        print(json.dumps(measure(side, what, workload, subset, args.data, args.batch, args.workers)))
        return

    def run(workload: str, side: str, what: str, subset: str = "all") -> dict:
        return best_of(
            args.repeats, workload, side, what, subset, "--data", str(args.data), "--batch", str(args.batch),
            "--workers", str(args.workers),
        )

    report = {"batch": args.batch, "workers": args.workers}
    for workload in args.workloads:
        load_before = os.getloadavg()
        report[workload] = report_workload(workload, args.data, run)
        report[workload]["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
        print(json.dumps({workload: report[workload]}, indent=2), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

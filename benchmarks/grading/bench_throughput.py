"""Throughput and verdicts: our batch grader and scorer against Open-RS's reward functions.

    .venv/bin/python benchmarks/grading/bench_throughput.py [--data ../shared/data] [--repeats 2]

Both sides score the same completions (completions.py, ≥ 5,000) against the same golds: each
set's gold as the paper's evaluator (lighteval) took it, i.e. ``solution`` for math500 and
minerva and ``answer`` elsewhere. The reference (open_rs_reference.py) is called as TRL 0.16
called reward functions: ``f(prompts=..., completions=[[{"role": "assistant", "content": c}]],
solution=[...])`` on one step's batch at a time, sequentially, in one process. Every measurement
runs in a fresh process after the same untimed warm-up (math-verify's LaTeX parser gets faster
as it sees more LaTeX), and the best of ``--repeats`` runs is kept. CPU seconds (ours: the
parent's and the workers') are reported too: unlike wall time, another job on the machine barely
moves them.

Measured: (1) verdicts: our Grader vs Open-RS's accuracy_reward; (2) rewards: our RewardScorer
with format + 2 × cosine (characters) vs Open-RS's format_reward + cosine_scaled_reward, the
reward set of Open-RS's experiments 2 and 3. Verdicts are compared on the rows whose gold Open-RS
can parse; the others are the trap rows, where Open-RS's reward is 1.0 whatever the completion.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
from completions import build_samples, load_rows  # noqa: E402

GOLD_COLUMN = {"math500": "solution", "minerva": "solution"}  # lighteval's; "answer" elsewhere


def samples(data: Path):
    """The benchmark completions, with each set's gold column as lighteval used it."""
    rows = {}
    out = []
    for sample in build_samples(data):
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


def measure(side: str, what: str, data: Path, batch: int, workers: int, subset: str) -> dict:
    """One timed run; ``subset`` is "all" or a JSON file of row indices (parsed elsewhere, as
    parsing golds here would warm this process's LaTeX parser on exactly these golds)."""
    pairs = [(sample.completion, gold) for sample, gold in samples(data)]
    if subset != "all":
        pairs = [pairs[i] for i in json.loads(Path(subset).read_text())]
    completions, golds = [c for c, _ in pairs], [g for _, g in pairs]
    warm = warm_up_pairs(data)
    if side == "reference":
        import open_rs_reference as ref

        funcs = ref.open_rs_reward_funcs(["accuracy"] if what == "verdicts" else ["format", "cosine"])
        with contextlib.redirect_stdout(io.StringIO()):  # its "Failed to parse gold" prints
            ref.accuracy_reward(completions=as_messages([c for c, _ in warm]), solution=[g for _, g in warm])
            started, cpu_started = time.perf_counter(), time.process_time()
            scores = [[] for _ in funcs]
            for chunk_c, chunk_g in zip(batches(completions, batch), batches(golds, batch)):
                prompts = [[{"role": "user", "content": "problem"}]] * len(chunk_c)
                for out, func in zip(scores, funcs):
                    out += func(prompts=prompts, completions=as_messages(chunk_c), solution=chunk_g)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return {"seconds": elapsed, "cpu_seconds": cpu, "items": len(pairs), "scores": scores}

    from grpo_trainer.grading import Grader
    from grpo_trainer.rewards import RewardScorer
    from grpo_trainer.spec import RewardParams, RewardSpec

    with Grader(workers=workers) as grader:
        grader.verify_batch([c for c, _ in warm], [g for _, g in warm])
        rewards = [RewardSpec(name="format"), RewardSpec(name="cosine", weight=2.0, params=RewardParams(length_unit="characters"))]
        scorer = RewardScorer(rewards, grader=grader)
        workers = [psutil.Process(worker.process.pid) for worker in grader._pool]  # to add up their CPU
        started, cpu_started = time.perf_counter(), time.process_time() + sum(map(cpu_seconds, workers))
        verdicts, scores = [], [[], []]
        for chunk_c, chunk_g in zip(batches(completions, batch), batches(golds, batch)):
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
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "items": len(pairs),
        "correct": [v.correct for v in verdicts],
        "reasons": [v.reason for v in verdicts],
        "item_seconds": [v.seconds for v in verdicts],
        "scores": scores,
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
    print(f"  {args[:2]} runs: {[round(run['seconds'], 2) for run in runs]} s", flush=True)
    return min(runs, key=lambda run: run["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1].parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=96, help="completions per call (one step's batch)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--measure", nargs=3, metavar=("SIDE", "WHAT", "SUBSET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        side, what, subset = args.measure
        print(json.dumps(measure(side, what, args.data, args.batch, args.workers, subset)))
        return

    pairs = samples(args.data)
    golds = [gold for _, gold in pairs]
    parses = reference_gold_parses(golds)
    print(f"{len(pairs)} completions; Open-RS can parse the gold of {sum(parses)}", flush=True)
    def run(side: str, what: str, subset: str = "all") -> dict:
        return best_of(
            args.repeats, side, what, subset, "--data", str(args.data), "--batch", str(args.batch),
            "--workers", str(args.workers),
        )

    report: dict = {"completions": len(pairs), "reference_gold_parses": sum(parses), "batch": args.batch, "workers": args.workers}
    for what in ("verdicts", "rewards"):
        ref, ours = run("reference", what), run("ours", what)
        report[what] = {
            "reference_s": ref["seconds"],
            "ours_s": ours["seconds"],
            "speedup": ref["seconds"] / ours["seconds"],
            "reference_cpu_s": ref["cpu_seconds"],
            "ours_cpu_s": ours["cpu_seconds"],
            "reference_items_per_s": ref["items"] / ref["seconds"],
            "ours_items_per_s": ours["items"] / ours["seconds"],
        }
        if what == "verdicts":
            ref_correct = [score == 1.0 for score in ref["scores"][0]]
            compared = [i for i, ok in enumerate(parses) if ok]
            mismatches = [i for i in compared if ref_correct[i] != ours["correct"][i]]
            trap = [i for i, ok in enumerate(parses) if not ok]
            item_seconds = sorted(ours["item_seconds"])
            report[what] |= {
                "compared_rows": len(compared),
                "mismatches": [
                    {"row": pairs[i][0].row_id, "kind": pairs[i][0].kind, "reference": ref_correct[i], "ours": ours["correct"][i]}
                    for i in mismatches
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
        else:
            compared = [i for i, ok in enumerate(parses) if ok]
            report[what]["format_mismatches"] = sum(ref["scores"][0][i] != ours["scores"][0][i] for i in range(len(pairs)))
            report[what]["cosine_mismatches_on_compared_rows"] = sum(
                abs(ref["scores"][1][i] - ours["scores"][1][i]) > 1e-9 for i in compared
            )
    with tempfile.NamedTemporaryFile("w", suffix=".json") as comparable:
        json.dump([i for i, ok in enumerate(parses) if ok], comparable)
        comparable.flush()
        sub_ref, sub_ours = run("reference", "verdicts", comparable.name), run("ours", "verdicts", comparable.name)
    report["verdicts_on_comparable_rows_only"] = {
        "items": sub_ref["items"],
        "reference_s": sub_ref["seconds"],
        "ours_s": sub_ours["seconds"],
        "speedup": sub_ref["seconds"] / sub_ours["seconds"],
        "reference_cpu_s": sub_ref["cpu_seconds"],
        "ours_cpu_s": sub_ours["cpu_seconds"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

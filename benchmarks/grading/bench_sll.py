"""Verdicts and parses with SLL-first LaTeX parsing against latex2sympy's LL parsing alone.

    .venv/bin/python benchmarks/grading/bench_sll.py [--data ../shared/data] [--workloads ...]
    .venv/bin/python benchmarks/grading/bench_sll.py --pooled-rounds 3 [--workloads benchmark grpo6 grpo16]

Grades every workload under every profile twice, in two processes side by side: one with
latex2sympy's own parser (LL prediction), one with :mod:`grpo_trainer.two_stage_parsing`
installed (SLL first, LL where SLL fails). Each process records, for every distinct string that
reaches latex2sympy's parser, what it returned (the sympy ``srepr``) or raised (type and
message), and the SLL-first process whether the string took the LL stage. Reported: the verdicts
(correct, extracted answer, reason) and the parse outcomes that differ between the two (the claim
is none), and each side's CPU seconds per workload and profile. math-verify's alarm on a parse is
wall-clock, so on a loaded machine it can cut a parse short on one side only: such a string is
listed apart and parsed again by both parsers here, without an alarm, and compared. Last, the
distinct strings are parsed again, ANTLR's parse alone, to time the two parsers, and the deepest
bracket nesting of any text is reported (deeper than ``SLL_MAX_NESTING``, a string skips SLL).

Workloads:

- ``solutions``: every set in the data folder (the five paper benchmarks, GSM8K's test and train
  splits, the partial DeepScaleR AIME training set), each problem's reference solution as the
  completion (AMC23 has none: ``\\boxed{answer}``) against the gold column lighteval used
  (``grading.BENCHMARK_GOLD_COLUMNS``; ``answer`` for the training sets);
- ``benchmark``, ``grpo6``, ``grpo16``: the completions of bench_throughput.py (10,013 and twice 5,760).

Grading runs in-process (``grading.grade_here``, math-verify's own alarms, no worker caches) so
that the parses can be watched. With ``--pooled-rounds N`` the script instead times the pooled
grader as bench_throughput.py runs it (2 workers, batches of 96, a fresh process per run after the
same warm-up) with each parser, and Open-RS's accuracy reward, N rounds with the three interleaved
so that the machine's load falls on all three alike; it reports each one's median CPU seconds per
1,000 completions, and checks the two graders' verdicts equal in every round.
"""

from __future__ import annotations

import argparse
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

from bench_throughput import WORKLOADS, samples  # noqa: E402

PROFILES = ("open-rs", "lighteval-expr", "lighteval-latex", "lighteval-boxed-gold")
SOLUTION_SETS = {  # set: the file of its rows under the data folder
    "aime24": "aime24/test.jsonl",
    "amc23": "amc23/test.jsonl",
    "math500": "math500/test.jsonl",
    "minerva": "minerva/test.jsonl",
    "olympiadbench": "olympiadbench/test.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "gsm8k-train": "gsm8k/train.jsonl",
    "deepscaler-aime-train": "train_partial_deepscaler_aime/train.jsonl",
}
MODES = ("ll", "sll-first")
TIMED_OUT = "TimeoutError: Operation timed out!"  # math-verify's alarm, as the sides record it


def solution_pairs(data: Path) -> list[tuple[str, str]]:
    from grpo_trainer.grading import BENCHMARK_GOLD_COLUMNS

    pairs = []
    for name, path in SOLUTION_SETS.items():
        column = BENCHMARK_GOLD_COLUMNS.get(name, "answer")
        for line in (data / path).read_text(encoding="utf-8").split("\n"):  # not splitlines(): rows hold U+2028
            if not line.strip():
                continue
            row = json.loads(line)
            pairs.append((row["solution"] or f"The answer is $\\boxed{{{row['answer']}}}$.", row[column]))
    return pairs


def workload_pairs(data: Path, workload: str) -> list[tuple[str, str]]:
    if workload == "solutions":
        return solution_pairs(data)
    return [(sample.completion, gold) for sample, gold in samples(data, workload)]


# ------------------------------------------------------------------- one side (a process)


def measure(mode: str, data: Path, workloads: list[str], out: Path) -> None:
    """Grade every workload under every profile with this process's parser; write what was seen."""
    import sympy
    from antlr4.error.Errors import ParseCancellationException
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    from grpo_trainer import two_stage_parsing
    from grpo_trainer.grading import grade_here

    parses: dict[str, dict] = {}  # "is_real latex" -> outcome, and whether it took the LL stage
    sll_failed = []

    if mode == "sll-first":
        two_stage_parsing.install()
        math_sll = two_stage_parsing.SllFirstParser.math_sll

        def watched_math_sll(parser):
            try:
                return math_sll(parser)
            except ParseCancellationException:
                sll_failed.append(True)
                raise

        two_stage_parsing.SllFirstParser.math_sll = watched_math_sll
    parse = _Latex2Sympy.parse

    def watched_parse(converter, latex_str):
        sll_failed.clear()
        key = f"{converter.is_real} {latex_str}"
        try:
            expression = parse(converter, latex_str)
        except Exception as error:  # what latex2sympy raised, recorded and passed on
            parses.setdefault(key, {"outcome": f"{type(error).__name__}: {error}", "parsed": False, "ll_stage": bool(sll_failed)})
            raise
        parses.setdefault(key, {"outcome": sympy.srepr(expression), "parsed": True, "ll_stage": bool(sll_failed)})
        return expression

    _Latex2Sympy.parse = watched_parse
    report = {"mode": mode, "runs": {}, "parses": parses}
    for workload in workloads:
        pairs = workload_pairs(data, workload)
        for profile in PROFILES:
            started, cpu_started = time.perf_counter(), time.process_time()
            verdicts = [grade_here(completion, gold, profile) for completion, gold in pairs]
            report["runs"][f"{workload} {profile}"] = {
                "items": len(pairs),
                "wall_s": time.perf_counter() - started,
                "cpu_s": time.process_time() - cpu_started,
                "verdicts": [(v.correct, v.answer, v.reason) for v in verdicts],
            }
            print(f"{mode}: {workload} {profile} {len(pairs)} items, {time.process_time() - cpu_started:.1f} CPU s", flush=True)
    out.write_text(json.dumps(report))


# ---------------------------------------------------------------------------------- the report


def compare(ll: dict, sll_first: dict) -> dict:
    runs = {}
    for name, run in ll["runs"].items():
        other = sll_first["runs"][name]
        differ = [i for i, (a, b) in enumerate(zip(run["verdicts"], other["verdicts"], strict=True)) if a != b]
        runs[name] = {
            "items": run["items"],
            "verdicts_that_differ": len(differ),
            "first_differing_rows": differ[:5],
            "correct": sum(v[0] for v in run["verdicts"]),
            "ungraded_ll_sll_first": [sum(v[2] is not None for v in r["verdicts"]) for r in (run, other)],
            "cpu_s_ll_sll_first": [round(run["cpu_s"], 1), round(other["cpu_s"], 1)],
            "wall_s_ll_sll_first": [round(run["wall_s"], 1), round(other["wall_s"], 1)],
        }
    seen = ll["parses"].keys() & sll_first["parses"].keys()
    outcome = {
        mode: {key: parse["outcome"] for key, parse in side["parses"].items()}
        for mode, side in zip(MODES, (ll, sll_first), strict=True)
    }
    ll_stage = [key for key in seen if sll_first["parses"][key]["ll_stage"]]
    differ = [key for key in seen if outcome["ll"][key] != outcome["sll-first"][key]]
    # math-verify's alarm is wall-clock: on a loaded machine it can cut one side's parse short.
    timed_out = [key for key in differ if TIMED_OUT in (outcome["ll"][key], outcome["sll-first"][key])]
    return {
        "runs": runs,
        "verdicts_compared": sum(run["items"] for run in runs.values()),
        "verdicts_that_differ": sum(run["verdicts_that_differ"] for run in runs.values()),
        "distinct_strings_parsed": {mode: len(side["parses"]) for mode, side in zip(MODES, (ll, sll_first), strict=True)},
        "strings_parsed_by_one_side_only": len(ll["parses"].keys() ^ sll_first["parses"].keys()),
        "parse_outcomes_that_differ": sorted(set(differ) - set(timed_out)),
        "strings_that_timed_out_on_one_side_only": {key: unbounded_outcomes_differ(key) for key in timed_out},
        "strings_that_took_the_ll_stage": len(ll_stage),
        "of_those_parsed_by_ll": sum(ll["parses"][key]["parsed"] for key in ll_stage),
        "timeouts_while_parsing": {mode: sum(o == TIMED_OUT for o in outcome[mode].values()) for mode in MODES},
        "cpu_s_ll_sll_first": [round(sum(side["runs"][name]["cpu_s"] for name in runs), 1) for side in (ll, sll_first)],
    }


def deepest_nesting(data: Path, workloads: list[str]) -> int:
    """How deep the brackets of any completion or gold nest: above SLL_MAX_NESTING, LL alone parses."""
    from grpo_trainer.two_stage_parsing import _bracket_depth

    return max(_bracket_depth(text) for workload in workloads for pair in workload_pairs(data, workload) for text in pair)


def parse_cpu_seconds(latex_strings: list[str]) -> list[dict]:
    """CPU seconds of ANTLR's parse alone (no conversion to sympy) of every string, LL and SLL first,
    in two rounds: in the first each parser fills its decision tables, the second finds them filled."""
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    from grpo_trainer import two_stage_parsing

    converter = _Latex2Sympy()
    rounds = []
    for _ in range(2):
        rounds.append({})
        parsers = (two_stage_parsing.latex2sympy_create_parser, two_stage_parsing.create_sll_first_parser)
        for mode, create_parser in zip(MODES, parsers, strict=True):
            started = time.process_time()
            for latex in latex_strings:
                try:
                    create_parser(converter, latex).math()
                except Exception:  # latex2sympy's syntax errors are part of the work
                    pass
            rounds[-1][mode] = round(time.process_time() - started, 2)
    return rounds


def unbounded_outcomes_differ(key: str) -> bool:
    """Whether the string's parses differ between the two parsers, parsed again here with no alarm."""
    import sympy
    from latex2sympy2_extended import latex2sympy
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    from grpo_trainer import two_stage_parsing

    is_real, latex = key.split(" ", 1)
    outcomes = []
    for create_parser in (two_stage_parsing.latex2sympy_create_parser, two_stage_parsing.create_sll_first_parser):
        _Latex2Sympy.create_parser = create_parser
        try:
            outcomes.append(sympy.srepr(latex2sympy(latex, is_real=is_real == "True", normalization_config=None)))
        except Exception as error:  # compared as the sides record it
            outcomes.append(f"{type(error).__name__}: {error}")
    _Latex2Sympy.create_parser = two_stage_parsing.latex2sympy_create_parser
    return outcomes[0] != outcomes[1]


POOLED_SIDES = {"reference": "Open-RS", "ours-ll": "ours, LL alone", "ours": "ours, SLL first"}


def pooled_cpu(data: Path, workloads: list[str], rounds: int) -> dict:
    """Median CPU and wall seconds per 1,000 completions of each side of bench_throughput.py, interleaved."""
    report = {}
    for workload in workloads:
        runs: dict[str, list[dict]] = {side: [] for side in POOLED_SIDES}
        differ = []
        for _ in range(rounds):
            for side in POOLED_SIDES:
                command = [sys.executable, str(HERE / "bench_throughput.py"), "--measure", workload, side, "verdicts", "all"]
                out = subprocess.run([*command, "--data", str(data)], check=True, capture_output=True, text=True).stdout
                runs[side].append(json.loads(out.splitlines()[-1]))
            ll, sll_first = runs["ours-ll"][-1], runs["ours"][-1]
            ll_verdicts = zip(ll["correct"], ll["reasons"], strict=True)
            sll_verdicts = zip(sll_first["correct"], sll_first["reasons"], strict=True)
            differ.append(sum(a != b for a, b in zip(ll_verdicts, sll_verdicts, strict=True)))
        report[workload] = {
            "items": runs["ours"][0]["items"],
            "verdicts_that_differ_per_round": differ,
            **{
                f"{side} {unit}": round(statistics.median(1000 * run[key] / run["items"] for run in runs[side]), 2)
                for side in POOLED_SIDES
                for unit, key in (("cpu_s_per_1000", "cpu_seconds"), ("wall_s_per_1000", "seconds"))
            },
            "load_average_1_min": os.getloadavg()[0],
        }
        print(json.dumps({workload: report[workload]}), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1].parent / "shared" / "data")
    parser.add_argument("--workloads", nargs="+", choices=["solutions", *WORKLOADS], default=["solutions", *WORKLOADS])
    parser.add_argument("--pooled-rounds", type=int, default=0, help="time the pooled grader instead, N rounds")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.data, args.workloads, Path(args.measure[1]))
        return
    if args.pooled_rounds:
        load_before = os.getloadavg()
        workloads = [workload for workload in args.workloads if workload in WORKLOADS]
        report = {"rounds": args.pooled_rounds, **pooled_cpu(args.data, workloads, args.pooled_rounds)}
        print(json.dumps(report | {"load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()}}, indent=2))
        return

    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outs = {mode: Path(folder) / f"{mode}.json" for mode in MODES}
        processes = [
            subprocess.Popen(
                [sys.executable, __file__, "--measure", mode, str(outs[mode]), "--data", str(args.data),
                 "--workloads", *args.workloads]
            )
            for mode in MODES
        ]
        if any(process.wait() for process in processes):
            sys.exit("a side failed")
        sides = [json.loads(outs[mode].read_text()) for mode in MODES]
    report = compare(*sides)
    report["deepest_bracket_nesting_of_a_text"] = deepest_nesting(args.data, args.workloads)
    latex_strings = sorted({key.split(" ", 1)[1] for key in sides[1]["parses"]})
    report["parse_only_cpu_s_cold_then_warm"] = parse_cpu_seconds(latex_strings)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

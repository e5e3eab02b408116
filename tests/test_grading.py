"""The grader: math-verify's verdicts, golds parsed as lighteval did, bounded and crash-proof workers."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from grpo_trainer.grading import (
    GOLD_UNPARSABLE,
    INVALID_INPUT,
    TIMEOUT,
    WORKER_CRASHED,
    Grader,
    Verdict,
    get_grader,
    grade_here,
    parse_gold,
)

TIMEOUT_S = 2.0

# The extraction Open-RS's accuracy reward used, written out here independently of grading.py.
OPEN_RS_COMPLETION = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]
LIGHTEVAL_LATEX_GOLD = [LatexExtractionConfig()]


def boxed(answer: str) -> str:
    return f"<think>\nWe compute.\n</think>\n<answer>\nThe final answer is $\\boxed{{{answer}}}$.\n</answer>"


@pytest.fixture(scope="module")
def grader():
    """A short bound, so that the adversarial tests are quick."""
    with Grader(workers=2, timeout_s=TIMEOUT_S) as grader:
        yield grader


@pytest.fixture(scope="module")
def default_grader():
    """The production bound: a wrong answer against a gold full of logarithms can take sympy ~4 s."""
    with Grader(workers=2) as grader:
        yield grader


# ------------------------------------------------------------------------ verdicts (in-process)


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (boxed("\\frac{1}{2}"), "$\\frac{1}{2}$"),
        (boxed("0.5"), "$\\frac12$"),
        (boxed("\\left( 3, \\frac{\\pi}{2} \\right)"), "$\\left( 3, \\frac{\\pi}{2} \\right)$"),
        (boxed("x = 5"), "$5$"),
        (boxed("(-\\infty, 2]"), "$(-\\infty, 2]$"),
        (boxed("\\sqrt{2}"), "$1.41421356$"),
        (boxed("27"), "$28$"),
        ("The answer is $\\frac{7}{3}$ I think", "$\\frac{7}{3}$"),
        ("Intermediate $\\boxed{3}$, then finally $\\boxed{4}$", "$4$"),
        ("no final answer here, just 27", "$27$"),
    ],
)
def test_verdict_equals_math_verify_with_open_rs_configs(completion, gold):
    """Where Open-RS's own gold parse works, our verdict is exactly math-verify's."""
    gold_parsed = parse(gold, LIGHTEVAL_LATEX_GOLD)
    expected = bool(verify(parse(completion, OPEN_RS_COMPLETION, extraction_mode="first_match"), gold_parsed))
    verdict = grade_here(completion, gold)
    assert verdict.reason is None
    assert verdict.correct is expected


def test_bare_gold_is_graded_not_skipped():
    """The trap: Open-RS's gold config reads nothing in "27", and its reward then paid 1.0 to anything."""
    assert parse("27", [LatexExtractionConfig()], extraction_mode="first_match") == []
    assert grade_here(boxed("27"), "27") == Verdict(True, "27")
    assert grade_here(boxed("26"), "27") == Verdict(False, "26")
    assert grade_here(boxed("\\frac{14}{3}"), "\\frac{14}{3}").correct
    assert grade_here(boxed("p - q"), "p - q").correct
    assert not grade_here(boxed("p + q"), "p - q").correct


def test_gold_that_marks_its_answer_is_parsed_as_is():
    solution = "Adding, $2 + 3 = 5$, and so the sum is $\\boxed{5}$."
    assert grade_here(boxed("5"), solution).correct
    assert not grade_here(boxed("2"), solution).correct
    assert grade_here(boxed("2^{1009}"), "$2^{1009}$").correct


def test_gold_that_does_not_parse_is_never_rewarded():
    for gold in ["", "   ", "\\boxed{}"]:
        verdict = grade_here(boxed("27"), gold)
        assert verdict == Verdict(False, reason=GOLD_UNPARSABLE), gold


def test_completion_without_answer_is_wrong_not_failed():
    assert grade_here("I have no idea.", "27") == Verdict(False)
    assert grade_here("<answer>\n27\n</answer>", "27") == Verdict(False)  # no box, no $: Open-RS reads nothing


def test_lighteval_profile_reads_unboxed_answers():
    """Open-RS's evaluator also took plain numbers; its reward did not."""
    completion = "So we add them up. The final answer is 27"
    assert grade_here(completion, "27", profile="lighteval").correct
    assert grade_here(completion, "27", profile="open-rs") == Verdict(False)


# ---------------------------------------------------------------------------------- the pool


def test_batch_keeps_input_order(grader):
    golds = [str(n) for n in range(40)]
    completions = [boxed(str(n if n % 3 else n + 1)) for n in range(40)]
    verdicts = grader.verify_batch(completions, golds)
    assert [v.correct for v in verdicts] == [n % 3 != 0 for n in range(40)]
    assert [v.answer for v in verdicts] == [str(n if n % 3 else n + 1) for n in range(40)]


def test_identical_pairs_share_one_verdict(grader):
    verdicts = grader.verify_batch([boxed("3")] * 5 + [boxed("4")], ["3"] * 6)
    assert [v.correct for v in verdicts] == [True] * 5 + [False]
    assert len({id(v) for v in verdicts[:5]}) == 1


def test_bad_items_are_failed_verdicts_not_exceptions(grader):
    verdicts = grader.verify_batch([None, boxed("1"), 17, boxed("2")], ["1", None, "1", "2"])
    assert [v.reason for v in verdicts] == [INVALID_INPUT, INVALID_INPUT, INVALID_INPUT, None]
    assert [v.correct for v in verdicts] == [False, False, False, True]


def test_lengths_must_match(grader):
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        grader.verify_batch(["a", "b"], ["1"])


ADVERSARIAL = {
    "nested braces": "\\boxed{" + "{" * 200_000 + "1" + "}" * 200_000 + "}",
    "million digits": "\\boxed{" + "9" * 1_000_000 + "}",
    "power tower": "\\boxed{10^{10^{10^{10^{10}}}}}",
    "frac bomb": "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}",
    "factorial": "\\boxed{(10^{100})!}",
    "python code": "\\boxed{__import__('os').system('touch /tmp/grpo_grader_pwned')}",
    "python in dollars": "The final answer is $exec(\"open('/tmp/grpo_grader_pwned','w')\")$",
    "deep recursion": "\\boxed{" + "(" * 50_000 + "1" + ")" * 50_000 + "}",
    "sqrt tower": "\\boxed{" + "\\sqrt{" * 5000 + "2" + "}" * 5000 + "}",
    "answer spam": "answer: $" * 20_000,
    "boxed spam": "\\boxed{1" * 50_000,
}


def test_adversarial_completions_finish_within_the_bound_with_no_reward(grader):
    if os.path.exists("/tmp/grpo_grader_pwned"):
        os.remove("/tmp/grpo_grader_pwned")
    started = time.monotonic()
    verdicts = grader.verify_batch(list(ADVERSARIAL.values()), ["1"] * len(ADVERSARIAL))
    elapsed = time.monotonic() - started
    for name, verdict in zip(ADVERSARIAL, verdicts):
        assert not verdict.correct, name
        assert verdict.seconds <= TIMEOUT_S + 1.0, (name, verdict)
    # Two workers: at worst every item uses its full bound, two at a time.
    assert elapsed <= len(ADVERSARIAL) / 2 * (TIMEOUT_S + 1.0)
    assert not os.path.exists("/tmp/grpo_grader_pwned"), "completion text was executed"
    # The pool still grades after whatever timeouts happened.
    assert grader.verify(boxed("7"), "7").correct


def test_timeout_fails_only_the_hung_item(grader):
    completions = [boxed("1"), "\\boxed{10^{10^{10^{10^{10}}}}}", boxed("3"), boxed("4")]
    verdicts = grader.verify_batch(completions, ["1", "2", "3", "5"])
    assert [v.reason for v in verdicts] == [None, TIMEOUT, None, None]
    assert [v.correct for v in verdicts] == [True, False, True, False]
    assert TIMEOUT_S <= verdicts[1].seconds <= TIMEOUT_S + 1.0


def test_a_killed_worker_fails_its_item_and_is_replaced():
    with Grader(workers=1, timeout_s=30) as grader:
        grader.verify("\\boxed{1}", "1")  # start the worker
        worker_pid = grader._pool[0].process.pid
        killer = threading.Timer(1.0, os.kill, (worker_pid, 9))
        killer.start()
        verdicts = grader.verify_batch(["\\boxed{10^{10^{10^{10^{10}}}}}", boxed("2")], ["1", "2"])
        killer.join()
        assert verdicts[0] == Verdict(False, reason=WORKER_CRASHED, seconds=verdicts[0].seconds)
        assert verdicts[0].seconds < 10
        assert verdicts[1].correct
        assert grader._pool[0].process.pid != worker_pid


def test_memory_is_capped_in_the_worker():
    """A worker that would need more than its cap fails that item instead of swapping the node."""
    with Grader(workers=1, timeout_s=20, memory_limit_mb=300) as grader:
        verdict = grader.verify("\\boxed{2^{2^{40}}}", "1")
        assert not verdict.correct
        assert verdict.seconds < 20
        assert grader.verify(boxed("1"), "1").correct


def test_process_grader_is_shared():
    assert get_grader() is get_grader()


# ------------------------------------------------------------------------ the benchmark golds

# Golds that do not verify against themselves when boxed verbatim, and why. Each reason is
# checked by the test below: it fails if a listed gold starts verifying or another one stops.
MALFORMED = "Open-RS requires well-formed LaTeX (malformed_operators=False): {} does not parse in a completion"
NOT_SELF_VERIFYING = {
    ("math500", "11\\sqrt2"): MALFORMED.format("\\sqrt2"),
    ("math500", "\\frac43"): MALFORMED.format("\\frac43"),
    ("math500", "\\frac65"): MALFORMED.format("\\frac65"),
    ("math500", "\\frac{270}7\\text{ degrees}"): MALFORMED.format("\\frac{270}7"),
    ("math500", "\\frac 59"): MALFORMED.format("\\frac 59"),
    ("math500", "\\frac9{19}"): MALFORMED.format("\\frac9{19}"),
    ("math500", "\\frac14"): MALFORMED.format("\\frac14"),
    ("math500", "\\frac 34"): MALFORMED.format("\\frac 34"),
    ("olympiadbench", "$221,$8$"): "upstream typo: stray $ splits the gold; only 221 is read from it",
    (
        "olympiadbench",
        "$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is an arbitrary positive integer with $\\mho(a)=0$",
    ): "a sentence, not an answer: the gold reads as its last formula, \\mho(a)=0",
}
BENCHMARKS = ("aime24", "math500", "amc23", "minerva", "olympiadbench")


def rows(data: Path, benchmark: str) -> list[dict]:
    lines = (data / benchmark / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def inner(gold: str) -> str:
    """The gold as one writes it in a box: OlympiadBench's $…$ and trailing dot removed."""
    match = re.fullmatch(r"\$(.*)\$\.?", gold.strip(), re.DOTALL)
    return match.group(1).strip() if match else gold.strip()


def clearly_wrong(gold: str) -> str:
    return str(int(gold) + 1) if re.fullmatch(r"-?\d+", gold) else "-987654321"


def test_bare_golds_read_as_lighteval_read_them(shared_data):
    """lighteval read AIME and AMC golds with ExprExtractionConfig; boxing them reads the same."""
    golds = {row["answer"] for b in ("aime24", "amc23", "gsm8k") for row in rows(shared_data, b)}
    for gold in golds:  # the parsed values; the matched texts differ ("055" vs "55")
        assert parse_gold(gold)[0] == parse(gold, [ExprExtractionConfig()])[0], gold


@pytest.mark.slow
def test_every_benchmark_gold_verifies_against_itself(shared_data, default_grader):
    items = [(b, row) for b in BENCHMARKS for row in rows(shared_data, b)]
    golds = [row["answer"] for _, row in items]
    right = default_grader.verify_batch([boxed(inner(gold)) for gold in golds], golds)
    wrong = default_grader.verify_batch([boxed(clearly_wrong(inner(gold))) for gold in golds], golds)

    assert all(v.reason is None for v in right + wrong), [v for v in right + wrong if v.reason]
    failing = {(b, row["answer"]) for (b, row), verdict in zip(items, right) if not verdict.correct}
    assert failing == set(NOT_SELF_VERIFYING)
    assert not [row["id"] for (_, row), verdict in zip(items, wrong) if verdict.correct]


@pytest.mark.slow
def test_solution_golds_of_math500_and_minerva_verify(shared_data, default_grader):
    """lighteval graded these two sets against the boxed answer of the worked solution."""
    items = [row for b in ("math500", "minerva") for row in rows(shared_data, b)]
    verdicts = default_grader.verify_batch([boxed(row["answer"]) for row in items], [row["solution"] for row in items])
    failing = {row["answer"] for row, verdict in zip(items, verdicts) if not verdict.correct}
    assert failing == {answer for (b, answer) in NOT_SELF_VERIFYING if b == "math500"}

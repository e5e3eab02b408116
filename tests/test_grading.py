"""The grader: Open-RS's reward and lighteval's verdicts from math-verify, bounded and crash-proof workers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import math_verify
import pytest
import sympy
from antlr4.atn.PredictionMode import PredictionMode
from antlr4.error.Errors import ParseCancellationException
from hypothesis import given, settings
from hypothesis import strategies as st
from latex2sympy2_extended import NormalizationConfig, latex2sympy
from latex2sympy2_extended.gen.PSParser import PSParser
from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify import parser as math_verify_parser
from math_verify.parser import should_treat_as_complex

from grpo_trainer import grading, two_stage_parsing
from grpo_trainer.grading import (
    BENCHMARK_GOLD_COLUMNS,
    BENCHMARK_PROFILES,
    GOLD_UNPARSABLE,
    INVALID_INPUT,
    TIMEOUT,
    WORKER_CRASHED,
    Grader,
    Verdict,
    _Caches,
    _next_chunk,
    get_grader,
    gold_extraction,
    grade_here,
    parse_gold,
)
from grpo_trainer.two_stage_parsing import SllFirstParser

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


def test_lighteval_profiles_read_unboxed_answers():
    """Open-RS's evaluator also took plain numbers; its reward did not."""
    completion = "So we add them up. The final answer is 27"
    assert grade_here(completion, "27", profile="lighteval-expr") == Verdict(True, "27")
    assert grade_here(completion, "$27$", profile="lighteval-latex") == Verdict(True, "27")
    assert grade_here(completion, "27", profile="open-rs") == Verdict(False)


# ------------------------------------------------------- the lighteval profiles (paper-comparable)
# Every lighteval-* verdict expected below is the one lighteval ed08481's own extraction and
# comparison code gives (checked by running it on these inputs; it is not a dependency here).

EXPR, LATEX, BOXED_GOLD = "lighteval-expr", "lighteval-latex", "lighteval-boxed-gold"


def test_a_gold_that_extracts_nothing_is_compared_as_a_string():
    """lighteval fell back to the raw gold: it equals the prediction's matched text, stripped, or nothing."""
    assert gold_extraction("7,14,18", LATEX) == []  # no $…$: LaTeX extraction finds nothing
    assert grade_here(boxed("7,14,18"), "7,14,18", LATEX) == Verdict(True, "7,14,18")
    assert grade_here(boxed("7,14,18"), " 7,14,18\n", LATEX).correct
    assert grade_here(boxed("7, 14, 18"), "7,14,18", LATEX) == Verdict(False, "7, 14, 18")
    assert grade_here(boxed("7, 14, 18"), "7,14,18", BOXED_GOLD).correct
    # Graded, never gold_unparsable; an empty string equals nothing.
    assert grade_here(boxed("1"), "", LATEX) == Verdict(False, "1")
    assert grade_here(boxed("1"), "", BOXED_GOLD) == Verdict(False, reason=GOLD_UNPARSABLE)


@pytest.mark.parametrize("answer", ["2.0", "\\frac{4}{2}", "\\mathbf{2}", "x = 2", "\\{2\\}"])
def test_a_parsed_prediction_never_matches_a_string_gold(answer):
    """The value 2 spelled otherwise than the gold "2": wrong against the string, right against $2$."""
    assert not grade_here(boxed(answer), "2", LATEX).correct
    assert grade_here(boxed(answer), "$2$", LATEX).correct
    assert grade_here(boxed(answer), "2", BOXED_GOLD).correct


@pytest.mark.parametrize(
    ("completion", "gold", "paper", "boxed_gold"),
    [
        (boxed("7, 14, 18"), "7, 14, 18", True, True),
        (boxed("7,14,18"), "7, 14, 18", False, True),
        (boxed("\\{7,14,18\\}"), "7,14,18", False, True),
        (boxed("\\{1,2,3,4\\}"), "\\{1,2,3,4\\}", True, True),  # a bare set is a string too
        (boxed("1,2,3,4"), "\\{1,2,3,4\\}", False, True),
        (boxed("1,2,3,4"), "$\\{1,2,3,4\\}$", True, True),
        ("Thus the answer is $\\mathbf{12}$.", "12", False, True),
        ("Thus the answer is $\\mathbf{12}$.", "$12$", True, True),
        ("Solving, we get $x = 11$.", "11", False, True),
        ("Solving, we get $x = 11$.", "$11$", True, True),
    ],
)
def test_olympiadbench_style_golds(completion, gold, paper, boxed_gold):
    """OlympiadBench spells 409 answers without $…$: lighteval compared those as strings."""
    assert grade_here(completion, gold, LATEX).correct is paper
    assert grade_here(completion, gold, BOXED_GOLD).correct is boxed_gold


def test_expr_and_latex_read_the_same_gold_differently():
    assert gold_extraction("27", EXPR)[0] == 27
    assert gold_extraction("27", LATEX) == []
    assert gold_extraction("\\frac{14}{3}", EXPR) == []
    assert gold_extraction("\\frac{14}{3}", LATEX)[0] == sympy.Rational(14, 3)
    # The plain-expression reader takes a list's last number, so the profile must match the benchmark.
    assert gold_extraction("7, 14, 18", EXPR) == [18, "18"]
    assert grade_here(boxed("18"), "7, 14, 18", EXPR).correct
    assert not grade_here(boxed("18"), "7, 14, 18", LATEX).correct
    # An unboxed $x = 11$ reads as 11 beside a plain gold: an equation's right side.
    assert grade_here("Solving, we get $x = 11$.", "11", EXPR).correct


def test_lighteval_compares_to_five_decimal_places():
    third = "$\\frac{1}{3}$"
    assert grade_here(boxed("0.33333"), third, LATEX).correct
    assert not grade_here(boxed("0.3333"), third, LATEX).correct
    assert not grade_here(boxed("0.33333"), third, "open-rs").correct  # the reward's precision is 6


def test_lighteval_extracts_latex_before_plain_expressions():
    """A plain expression and a LaTeX one matched at the same place: lighteval took the LaTeX reading
    whatever order the targets were listed in; math-verify takes the first listed."""
    completion = "answer = $ 2^3^2 $"  # LaTeX: (2^3)^2; Python: 2**(3**2)
    as_listed = parse(completion, [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)])
    assert as_listed[0].doit() == 512
    assert grade_here(completion, "64", EXPR).correct
    assert not grade_here(completion, "512", EXPR).correct


def test_lighteval_latex_gold_takes_a_final_answer_before_a_box():
    """lighteval's LatexExtractionConfig() boxes at priority 55, after "final answer … is" (50);
    math-verify's at 50, beside it, where the rightmost match wins."""
    gold = "The final answer is $5$, and we check: $\\boxed{6}$"
    assert parse(gold, [LatexExtractionConfig()])[0] == 6
    assert gold_extraction(gold, LATEX)[0] == 5
    assert grade_here(boxed("5"), gold, LATEX).correct
    assert not grade_here(boxed("6"), gold, LATEX).correct


def test_lighteval_profiles_bound_parses_and_comparisons_at_five_seconds(monkeypatch):
    """lighteval's metric gave each parse and comparison a 5 s alarm (math-verify's default is 3 s)."""
    alarms = []

    def recorded(function, alarm):
        def call(*args, **kwargs):
            alarms.append((function.__name__, kwargs[alarm]))
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(math_verify, "parse", recorded(math_verify.parse, "parsing_timeout"))
    monkeypatch.setattr(math_verify, "verify", recorded(math_verify.verify, "timeout_seconds"))
    assert grade_here(boxed("4187"), "$4187$", LATEX).correct  # a gold no other test reads (cached)
    assert alarms == [("parse", 5), ("parse", 5), ("verify", 5)]


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
    for name, verdict in zip(ADVERSARIAL, verdicts, strict=True):
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


# ---------------------------------------------------------------------------- worker caches

# Answers a group repeats, in forms that verify alike and not (a half four ways, a percentage, a
# set, a tuple, an equation, text), one just longer than the caches keep, replies with no answer.
BOXED = ["\\frac{1}{2}", "0.5", "0.50", "\\dfrac{1}{2}", "50\\%", "5", "x = 5", "6", "1, 2", "(1, 2)", "\\text{five}"]
ANSWERS = [
    *(f"$\\boxed{{{answer}}}$" for answer in [*BOXED, "+".join(["1"] * 130)]),
    "The final answer is $5$.",
    "no answer at all",
]
GOLDS = ["$\\frac{1}{2}$", "5", "Adding, $2 + 3$ gives $\\boxed{5}$.", "$(1, 2)$", "130"]
PAIRS = st.tuples(st.sampled_from(ANSWERS), st.sampled_from(GOLDS), st.integers(0, 3))


def group_completion(answer: str, draw: int) -> str:
    """Completions that differ in their working and share their answer, as a group's do."""
    return f"<think>\nAttempt {draw}: we compute.\n</think>\n<answer>\n{answer}\n</answer>"


@functools.cache
def uncached_verdict(completion: str, gold: str) -> Verdict:
    return grade_here(completion, gold)  # this process never installs the worker caches


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(PAIRS, min_size=1, max_size=30), min_size=1, max_size=3))
def test_cached_verdicts_equal_uncached_ones_in_any_order(default_grader, batches):
    """Whatever repeats, in whatever order, across calls: each verdict is the uncached one."""
    for batch in batches:
        completions = [group_completion(answer, draw) for answer, _, draw in batch]
        golds = [gold for _, gold, _ in batch]
        verdicts = default_grader.verify_batch(completions, golds)
        assert [(v.correct, v.answer, v.reason) for v in verdicts] == [
            (v.correct, v.answer, v.reason) for v in map(uncached_verdict, completions, golds)
        ]


def test_a_group_repeating_its_answers_hits_the_caches():
    answers = ["\\frac{3}{7}", "\\frac{3}{7}", "\\frac{6}{14}", "\\frac{4}{7}"] * 4
    completions = [group_completion(f"$\\boxed{{{answer}}}$", draw) for draw, answer in enumerate(answers)]
    golds = ["$\\frac{3}{7}$"] * len(completions)
    with Grader(workers=1, timeout_s=TIMEOUT_S) as grader:
        verdicts = grader.verify_batch(completions, golds)
        stats = grader.cache_stats()
    assert [v.correct for v in verdicts] == [True, True, True, False] * 4
    # Each distinct string was parsed once: \frac{3}{7} (the gold and the right answer),
    # \frac{6}{14} and \frac{4}{7}; each distinct pair verified once.
    assert stats["parse_misses"] == 3
    assert stats["verify_misses"] == 3 and stats["verify_hits"] == 13
    with Grader(workers=1, timeout_s=TIMEOUT_S, cache_entries=0) as grader:
        assert [v.correct for v in grader.verify_batch(completions, golds)] == [True, True, True, False] * 4
        assert grader.cache_stats() == {}


def test_chunks_keep_a_group_together_and_split_a_large_gold():
    queue = deque((i, "completion", gold) for i, gold in enumerate("a" * 5 + "b" * 16 + "c" * 3 + "d" * 61))
    chunks = []
    while queue:
        chunks.append("".join(gold for _, _, gold in _next_chunk(queue, 12)))
    assert chunks == ["a" * 5 + "b" * 16, "ccc" + "d" * 9, "d" * 12, "d" * 12, "d" * 12, "d" * 16]


@pytest.fixture
def caches(monkeypatch):
    """Worker caches installed in this process, math-verify's own parsers put back afterwards."""
    for name in ("parse_latex_with_timeout", "parse_expr_with_timeout"):
        monkeypatch.setattr(math_verify_parser, name, getattr(math_verify_parser, name))
    return _Caches(entries=4)


def test_a_failed_parse_is_not_kept(caches, monkeypatch):
    """A parse that timed out (math-verify's alarm) or failed is run again for the next item."""
    results = iter([TimeoutError("Operation timed out!"), sympy.Integer(7)])
    calls = []

    def latex2sympy(latex, **_):
        calls.append(latex)
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(math_verify_parser, "latex2sympy", latex2sympy)
    with pytest.raises(TimeoutError):
        math_verify_parser.parse_latex_with_timeout("7", timeout_seconds=3)
    assert math_verify_parser.parse_latex_with_timeout("7", timeout_seconds=3) == 7
    assert math_verify_parser.parse_latex_with_timeout("7", timeout_seconds=3) == 7
    assert calls == ["7", "7"]


def test_a_verify_that_may_have_timed_out_is_not_kept(caches, monkeypatch):
    """verify() turns a comparison past its alarm into False: that False must not be reused."""
    clock = [0.0]
    outcomes = iter([(5.0, False), (0.01, True)])  # (seconds taken, result)
    calls = []

    def slow_verify(first, second, precision, timeout_seconds):
        seconds, result = next(outcomes)
        clock[0] += seconds
        calls.append((seconds, timeout_seconds))
        return result

    monkeypatch.setattr(math_verify, "verify", slow_verify)
    monkeypatch.setattr(grading, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    answer, gold = [sympy.Integer(5), "5"], [sympy.Integer(5), "5"]
    assert caches.verify(answer, gold, 5, 5) is False  # the lighteval profiles' 5 s alarm
    assert caches.verify(answer, gold, 5, 5) is True
    assert caches.verify(answer, gold, 5, 5) is True
    assert calls == [(5.0, 5), (0.01, 5)]


def test_verify_results_are_kept_for_the_same_objects_only(caches):
    gold = [sympy.Rational(1, 2), "\\frac{1}{2}"]
    half, other_half = sympy.Float("0.5"), sympy.Float("0.5")
    assert half == other_half and half is not other_half  # equal, but another parse's
    for answer in ([half, "0.5"], [other_half, "0.5"], [half, "0.5"]):
        assert caches.verify(answer, gold, 6, 3)
    assert (caches.verify_misses, caches.verify_hits) == (2, 1)


def test_caches_hold_at_most_their_entries(caches):
    for n in range(10):
        math_verify_parser.parse_latex_with_timeout(str(n), timeout_seconds=3)
        caches.verify([sympy.Integer(n), str(n)], [sympy.Integer(3), "3"], 6, 3)
    long_sum = "+".join(["1"] * 200)
    math_verify_parser.parse_latex_with_timeout(long_sum, timeout_seconds=3)
    assert caches.verify([sympy.Integer(200), long_sum], [sympy.Integer(200), "200"], 6, 3)
    assert caches.parsers[0].cache_info().currsize == 4
    assert len(caches.verified) == 4
    assert caches.stats()["parse_misses"] == 10  # the long string went to math-verify's own cache


# ---------------------------------------------------------------- LaTeX parsed SLL first, then LL

# Answers whose SLL parse meets a syntax error that LL does not (a letter's super- or subscript is
# where SLL's guess goes wrong), so that the second stage parses them: found among the strings the
# benchmark workloads hand to latex2sympy (benchmarks/grading/bench_sll.py).
NEEDS_LL = [
    "x^3", "5r^5", "I_{a}", "1/d^2", "\\theta_a", "a_{1}=1", "x^2 > 0", "a^4 = b^8", "\\frac{1}{4p^2}",
    "x_{1}<x_{2}", "|1+z+z^{2}|=4", "A_{3}=(1+\\sqrt{2}, 1)", "(\\Delta_{3}, \\Delta_{4})",
    "y^{\\prime}+r y-r x(t)=0", "n^{\\text {th }}", "d(n^{n})>1,000,000", "x^{2}, y^{2}, z^{2}",
]
LATEX_ATOMS = ["0", "7", "-3", "1.5", "10^{5}", "\\frac{1}{2}", "\\sqrt{3}", "2\\pi", "x", "n", "T", "\\theta", "a_{1}", "e"]
LATEX_SHAPES = [
    "{p}+{q}", "{p}-{q}", "{p} \\cdot {q}", "{p}{q}", "\\frac{{{p}}}{{{q}}}", "{p}^{{{q}}}", "{p}^{q}", "{p}_{{{q}}}",
    "({p}, {q})", "[{p}, {q})", "\\{{{p}, {q}\\}}", "{p} = {q}", "{p} \\le {q}", "\\sqrt{{{p}}}+{q}", "|{p}|-{q}",
    "{p}\\%", "\\left({p}\\right)^{{{q}}}", "{p}!", "\\sin {p} + {q}", "{p} \\in ({q}, \\infty)", "\\text{{{p}}} {q}",
]
LATEX_SOUP = [
    "{", "}", "^", "_", "\\frac", "(", ")", ",", "=", "x", "2", "\\left(", "\\right)", "\\sqrt", "\\cup", "&", "'", "!", " "
]


@functools.cache
def latex_corpus() -> tuple[str, ...]:
    """About 400 strings as latex2sympy sees them: common answer shapes, NEEDS_LL, token soup (mostly errors)."""
    draw = random.Random(14)
    shaped = [shape.format(p=p, q=q) for shape in LATEX_SHAPES for p in LATEX_ATOMS for q in LATEX_ATOMS]
    soup = ["".join(draw.choices(LATEX_SOUP, k=draw.randint(1, 7))) for _ in range(60)]
    return (*NEEDS_LL, *draw.sample(shaped, 320), *soup)


def latex2sympy_outcome(latex: str) -> tuple[str, str]:
    """latex2sympy's result as math-verify asks for it: the expression's srepr, or the exception."""
    try:
        expression = latex2sympy(latex, is_real=not should_treat_as_complex(latex), normalization_config=None)
    except Exception as error:
        return type(error).__name__, str(error)
    return "parsed", sympy.srepr(expression)


@contextlib.contextmanager
def latex2sympy_parser(create_parser):
    """latex2sympy parses with ``create_parser`` inside, and no parse cached under another leaks in or out."""
    caches = (math_verify_parser.parse_latex_with_timeout, parse_gold, gold_extraction)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Latex2Sympy, "create_parser", create_parser)
        for cache in caches:
            cache.cache_clear()
        yield
    for cache in caches:
        cache.cache_clear()


def sll_parse_tree(latex: str) -> str | None:
    """The first stage's tree, None where SLL met a syntax error."""
    parser = SllFirstParser(functools.partial(two_stage_parsing.latex2sympy_create_parser, _Latex2Sympy(), latex))
    try:
        tree = parser.math_sll()
    except ParseCancellationException:
        return None
    return tree.toStringTree(recog=tree.parser)


def test_sll_first_parses_are_latex2sympys_ll_parses():
    corpus = latex_corpus()
    with latex2sympy_parser(two_stage_parsing.latex2sympy_create_parser):
        ll = [latex2sympy_outcome(latex) for latex in corpus]
    with latex2sympy_parser(two_stage_parsing.create_sll_first_parser):
        sll_first = [latex2sympy_outcome(latex) for latex in corpus]
    assert sll_first == ll
    # Both stages were exercised: SLL alone parsed most strings; the rest went to LL, which parsed
    # some (NEEDS_LL among them) and raised latex2sympy's own errors for the others.
    sll_parses = {latex for latex in corpus if sll_parse_tree(latex) is not None}
    ll_parses = {latex for latex, (outcome, _) in zip(corpus, ll, strict=True) if outcome == "parsed"}
    assert sll_parses < ll_parses and set(NEEDS_LL) <= ll_parses - sll_parses
    assert len(sll_parses) > 200 and len(ll_parses - sll_parses) > 40 and len(corpus) - len(ll_parses) > 80


@pytest.mark.parametrize("latex", ["x^3", "a_{1}=1", "\\frac{1}{4p^2}"])
def test_where_sll_fails_ll_parses_again_from_the_start(latex):
    ll_parser = two_stage_parsing.latex2sympy_create_parser(_Latex2Sympy(), latex)
    ll_tree = ll_parser.math().toStringTree(recog=ll_parser)
    created = []

    def create_ll_parser():
        created.append(two_stage_parsing.latex2sympy_create_parser(_Latex2Sympy(), latex))
        return created[-1]

    with pytest.raises(ParseCancellationException):
        SllFirstParser(create_ll_parser).math_sll()
    created.clear()
    tree = SllFirstParser(create_ll_parser).math()
    assert len(created) == 2 and tree.parser is created[1]  # a fresh LL parser, not the SLL one rewound
    assert tree.toStringTree(recog=tree.parser) == ll_tree
    assert created[1]._interp.predictionMode == PredictionMode.LL


def test_a_syntax_error_is_latex2sympys_own():
    """Where LL fails too, the exception is the one latex2sympy raises today, its message included."""
    with latex2sympy_parser(two_stage_parsing.latex2sympy_create_parser):
        ll = latex2sympy_outcome("\\frac{1}{")
    with latex2sympy_parser(two_stage_parsing.create_sll_first_parser):
        assert latex2sympy_outcome("\\frac{1}{") == ll
    assert ll[0] == "Exception" and ll[1].startswith("I expected something else here")


def test_deep_nesting_goes_to_latex2sympys_ll_parser_alone():
    """Nested deep, LL runs past math-verify's alarm or Python's recursion limit where SLL parses:
    such a string gets latex2sympy's LL parser alone, so that its outcome stays LL's."""
    depth = two_stage_parsing.SLL_MAX_NESTING
    for opening, closing in (("(", ")"), ("[", "]"), ("\\frac{1}{", "}")):
        shallow, deep = (opening * levels + "2" + closing * levels for levels in (depth, depth + 1))
        assert isinstance(two_stage_parsing.create_sll_first_parser(_Latex2Sympy(), shallow), SllFirstParser)
        parser = two_stage_parsing.create_sll_first_parser(_Latex2Sympy(), deep)
        assert isinstance(parser, PSParser) and parser._interp.predictionMode == PredictionMode.LL
    assert max(map(two_stage_parsing._bracket_depth, latex_corpus())) <= depth  # the corpus tests SLL


PROFILES = ("open-rs", EXPR, LATEX, BOXED_GOLD)


def test_verdicts_with_and_without_sll_first_parsing_are_equal():
    """Every profile; a quarter of the corpus, boxed against its own gold or in $…$ against another's."""
    corpus = latex_corpus()[::4]
    items = [
        (boxed(latex), latex) if index % 2 else (f"So $x = {latex}$.", corpus[index - 1])
        for index, latex in enumerate(corpus)
    ]
    verdicts = []
    for create_parser in (two_stage_parsing.latex2sympy_create_parser, two_stage_parsing.create_sll_first_parser):
        with latex2sympy_parser(create_parser):
            verdicts.append([grade_here(*item, profile) for profile in PROFILES for item in items])
    assert verdicts[1] == verdicts[0]
    assert 50 < sum(verdict.correct for verdict in verdicts[0]) < len(verdicts[0]) - 50


def test_grader_workers_parsing_sll_first_grade_as_those_parsing_with_ll():
    """Workers start with SLL-first parsing installed or not; their own answers right, a neighbour's wrong."""
    completions = [boxed(latex) for latex in NEEDS_LL] * 2
    golds = [f"${latex}$" for latex in NEEDS_LL + NEEDS_LL[1:] + NEEDS_LL[:1]]
    verdicts = []
    for sll_first_parsing in (True, False):
        with Grader(workers=1, sll_first_parsing=sll_first_parsing) as grader:
            verdicts.append(grader.verify_batch(completions, golds))
    assert [(v.correct, v.answer, v.reason) for v in verdicts[0]] == [(v.correct, v.answer, v.reason) for v in verdicts[1]]
    assert [verdict.correct for verdict in verdicts[0]] == [True] * len(NEEDS_LL) + [False] * len(NEEDS_LL)


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
        assert parse_gold(gold)[0] == gold_extraction(gold, EXPR)[0], gold


@pytest.mark.slow
def test_every_benchmark_gold_verifies_against_itself(shared_data, default_grader):
    items = [(b, row) for b in BENCHMARKS for row in rows(shared_data, b)]
    golds = [row["answer"] for _, row in items]
    right = default_grader.verify_batch([boxed(inner(gold)) for gold in golds], golds)
    wrong = default_grader.verify_batch([boxed(clearly_wrong(inner(gold))) for gold in golds], golds)

    assert all(v.reason is None for v in right + wrong), [v for v in right + wrong if v.reason]
    failing = {(b, row["answer"]) for (b, row), verdict in zip(items, right, strict=True) if not verdict.correct}
    assert failing == set(NOT_SELF_VERIFYING)
    assert not [row["id"] for (_, row), verdict in zip(items, wrong, strict=True) if verdict.correct]


@pytest.mark.slow
def test_solution_golds_of_math500_and_minerva_verify(shared_data, default_grader):
    """lighteval graded these two sets against the boxed answer of the worked solution."""
    items = [row for b in ("math500", "minerva") for row in rows(shared_data, b)]
    verdicts = default_grader.verify_batch([boxed(row["answer"]) for row in items], [row["solution"] for row in items])
    failing = {row["answer"] for row, verdict in zip(items, verdicts, strict=True) if not verdict.correct}
    assert failing == {answer for (b, answer) in NOT_SELF_VERIFYING if b == "math500"}


# How each benchmark's paper-comparable profile reads its golds, computed from ../shared/data.
# Only OlympiadBench has golds that extract nothing and so are compared as strings: its 409 answers
# written without $…$ (364 of them integers, the rest lists such as 7,14,18, intervals, percentages),
# which LaTeX extraction cannot find without a delimiter. Its 266 answers in $…$ all extract.
STRING_GOLDS = {"aime24": 0, "math500": 0, "amc23": 0, "minerva": 0, "olympiadbench": 409, "gsm8k": 0}
# Golds that match but that sympy cannot parse, so that only the matched text is compared, as a
# string too: Minerva's dM/dt with solar units, -1./3 and E_{1}, E_{2}; OlympiadBench's
# m_{\max}=n^{2}-n-1, t(0,4] and the upstream typo $221,$8$.
TEXT_ONLY_GOLDS = {
    "minerva-27", "minerva-38", "minerva-268", "minerva-269",
    "olympiadbench-1782", "olympiadbench-2045", "olympiadbench-2349",
}


@pytest.mark.slow
def test_benchmark_golds_as_their_profiles_read_them(shared_data):
    string_golds, text_only = {}, set()
    for benchmark, profile in BENCHMARK_PROFILES.items():
        string_golds[benchmark] = []
        for row in rows(shared_data, benchmark):
            gold = row[BENCHMARK_GOLD_COLUMNS[benchmark]]
            extracted = gold_extraction(gold, profile)
            if not extracted:
                string_golds[benchmark].append(gold)
            elif all(isinstance(part, str) for part in extracted):
                text_only.add(row["id"])
            if benchmark != "olympiadbench":  # there the boxed-gold reading finds the same gold
                assert verify(extracted, parse_gold(gold)), row["id"]
    assert {benchmark: len(golds) for benchmark, golds in string_golds.items()} == STRING_GOLDS
    olympiad = rows(shared_data, "olympiadbench")
    undelimited = [row["answer"] for row in olympiad if "$" not in row["answer"]]
    assert sorted(string_golds["olympiadbench"]) == sorted(undelimited)
    assert sum(bool(re.fullmatch(r"-?\d+", gold)) for gold in string_golds["olympiadbench"]) == 364
    assert text_only == TEXT_ONLY_GOLDS


def spaced(answer: str) -> str:
    return ", ".join(item.strip() for item in answer.split(","))


# Completions a model writes for each gold: its answer boxed as the benchmark spells it, boxed with
# ", " between list items, and unboxed as "$x = answer$".
REALISTIC = {
    "boxed": lambda answer: boxed(answer),
    "boxed, spaced": lambda answer: boxed(spaced(answer)),
    "unboxed equation": lambda answer: f"Solving, we get $x = {answer}$.",
}
# OlympiadBench's correct verdicts per completion: (paper-comparable reading, boxed-gold reading).
# The paper compared 409 of its golds as strings: "1, 3" is not "1,3", "x = 11" is not "11". (The
# one boxed gold that is wrong either way is the typo $221,$8$.) Elsewhere the two readings find
# the same golds (checked above), so they give the same verdicts.
OLYMPIADBENCH_CORRECT = {"boxed": (674, 674), "boxed, spaced": (635, 673), "unboxed equation": (260, 669)}


@pytest.mark.slow
def test_paper_reading_against_boxed_gold_reading(shared_data):
    items = [
        (style, write(inner(row["answer"])), row["answer"])
        for row in rows(shared_data, "olympiadbench")
        for style, write in REALISTIC.items()
    ]
    correct = {style: [0, 0] for style in REALISTIC}
    for reading, profile in enumerate([BENCHMARK_PROFILES["olympiadbench"], BOXED_GOLD]):
        with Grader(workers=2, timeout_s=30, profile=profile) as grader:
            verdicts = grader.verify_batch([item[1] for item in items], [item[2] for item in items])
        assert all(verdict.reason is None for verdict in verdicts)
        for (style, _, _), verdict in zip(items, verdicts, strict=True):
            correct[style][reading] += verdict.correct
    assert {style: tuple(counts) for style, counts in correct.items()} == OLYMPIADBENCH_CORRECT

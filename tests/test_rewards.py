"""Reward functions with Open-RS's semantics, and the scorer that weighs them for a step."""

from __future__ import annotations

import math
import random
import re
import time

import pytest

from grpo_trainer.grading import GOLD_UNPARSABLE, TIMEOUT, Grader, Verdict
from grpo_trainer.rewards import (
    RewardScorer,
    accuracy_reward,
    cosine_reward,
    format_reward,
    length_rewards,
    reasoning_steps_reward,
    repetition_reward,
    tag_count_reward,
)
from grpo_trainer.spec import RewardParams, RewardSpec

WELL_FORMED = "<think>\nLet me add 2 and 3.\n</think>\n<answer>\n$\\boxed{5}$\n</answer>"


# ------------------------------------------------------------------------------------ format


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (WELL_FORMED, 1.0),
        ("<think>\n\n</think>\n<answer>\n\n</answer>", 1.0),  # both parts may be empty lines
        (WELL_FORMED + "\nand some words after", 1.0),  # $ under MULTILINE: a line may follow
        (WELL_FORMED + " trailing on the same line", 0.0),
        ("<think>\na\n</think>\nb\n</think>\n<answer>\nc\n</answer>", 1.0),  # lazy .*? spans a </think>
        (" " + WELL_FORMED, 0.0),  # must start with <think>
        ("<think>Let me add.</think>\n<answer>\n5\n</answer>", 0.0),  # newlines inside the tags are required
        ("<think>\nreasoning\n</think><answer>\n5\n</answer>", 0.0),  # "</think>\n<answer>" exactly
        ("<think>\nreasoning\n</think>\n<answer>\n5</answer>", 0.0),
        ("<answer>\n5\n</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


def test_format_reward_is_open_rs_regex_in_linear_time():
    """Equal to Open-RS's regex on random tag soup, and fast where the regex backtracks."""
    open_rs = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)
    pieces = ["<think>\n", "\n</think>\n", "<answer>\n", "\n</answer>", "</answer>", "\n", "x", "<think>", "\n<answer>\n"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert format_reward(text) == (1.0 if open_rs.match(text) else 0.0), repr(text)
    hostile = "<think>\n" + "\n</think>\n<answer>\n" * 7000
    started = time.monotonic()
    assert format_reward(hostile) == 0.0
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (WELL_FORMED, 1.0),
        ("<think>\nx\n</think>\n" + "\n</think>\n" + "<answer>\n5\n</answer>", 0.75),  # exactly one "\n</think>\n"
        ("<think>\nx\n</think>\n<answer>\n5\n</answer>\n</answer>", 0.75),
        ("<think>x</think><answer>5</answer>", 0.0),
        ("<think>\nthinking forever", 0.25),
        ("\n<answer>\n5\n</answer>", 0.5),
        ("", 0.0),
    ],
)
def test_tag_count_reward(completion, expected):
    assert tag_count_reward(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Step 1: add. Step 2: carry. Step 3: done.", 1.0),
        ("First, add. Next, carry. Finally, done. Second, check.", 1.0),
        ("First, add the numbers.", 1 / 3),
        ("1. add\n2. carry", 1 / 3),  # "^\d+\." counts at the start of the text only
        ("We add:\n- two\n- three", 2 / 3),
        ("Just the answer: 5", 0.0),
    ],
)
def test_reasoning_steps_reward(completion, expected):
    assert reasoning_steps_reward(completion) == pytest.approx(expected)


# ----------------------------------------------------------------------------- correctness

COSINE = {"min_value_wrong": 0.0, "max_value_wrong": -0.5, "min_value_correct": 0.5, "max_value_correct": 1.0, "max_len": 1000}


@pytest.mark.parametrize(
    ("correct", "length", "expected"),
    [
        (True, 0, 1.0),  # short and right: max_value_correct
        (True, 1000, 0.5),  # right at max_len: min_value_correct
        (True, 500, 0.75),
        (False, 0, 0.0),  # short and wrong: min_value_wrong (Open-RS ran 0.0; open-r1 had -1.0)
        (False, 1000, -0.5),  # wrong at max_len: max_value_wrong
        (False, 500, -0.25),
        (True, 2000, 1.0),  # Open-RS did not clamp: the cosine comes back up past max_len
    ],
)
def test_cosine_reward(correct, length, expected):
    assert cosine_reward(correct, length, **COSINE) == pytest.approx(expected)


def test_length_rewards_kimi():
    # λ = 0.5 − (len − 10) / 20: 0.5, 0.0, −0.5; a wrong answer keeps only a penalty.
    assert length_rewards([10, 20, 30, 10], [True, True, False, False]) == [0.5, 0.0, -0.5, 0.0]
    assert length_rewards([7, 7], [True, False]) == [0.0, 0.0]
    assert length_rewards([], []) == []


def test_accuracy_reward():
    assert accuracy_reward(Verdict(True, "5")) == 1.0
    assert accuracy_reward(Verdict(False, "4")) == 0.0
    assert accuracy_reward(Verdict(False, reason=GOLD_UNPARSABLE)) == 0.0


@pytest.mark.parametrize(
    ("completion", "ngram_size", "expected"),
    [
        ("a b c a b c", 3, -0.25),  # 4 trigrams, 3 distinct: −1 · (1 − 3/4)
        ("The the THE the", 1, -0.75),  # lowercased: 4 words, 1 distinct
        ("one two three four", 3, 0.0),
        ("too short", 3, 0.0),
        ("", 3, 0.0),
    ],
)
def test_repetition_reward(completion, ngram_size, expected):
    assert repetition_reward(completion, ngram_size=ngram_size, max_penalty=-1.0) == pytest.approx(expected)


# ---------------------------------------------------------------------------------- scorer


class FixedGrader:
    """Answers with given verdicts, so that the scorer is tested without worker processes."""

    def __init__(self, verdicts: list[Verdict]) -> None:
        self.verdicts = verdicts
        self.calls = 0

    def verify_batch(self, completions, golds):
        self.calls += 1
        assert len(completions) == len(golds) == len(self.verdicts)
        return self.verdicts


def test_scorer_weighs_and_reports_each_function():
    completions = [WELL_FORMED, "5", "<think>\nno\n</think>\n<answer>\n$\\boxed{4}$\n</answer>"]
    grader = FixedGrader([Verdict(True, "5"), Verdict(False), Verdict(False, "4")])
    rewards = [
        RewardSpec(name="accuracy", weight=2.0),
        RewardSpec(name="format", weight=0.5),
        RewardSpec(name="cosine", params=RewardParams(length_unit="tokens")),
    ]
    batch = RewardScorer(rewards, grader=grader).score(completions, ["5", "5", "5"], [0, 1000, 500])

    assert grader.calls == 1  # graded once for accuracy and cosine together
    assert batch.per_function["accuracy"] == [1.0, 0.0, 0.0]
    assert batch.per_function["format"] == [1.0, 0.0, 1.0]
    assert batch.per_function["cosine"] == pytest.approx([1.0, -0.5, -0.25])
    assert batch.total == pytest.approx([2.0 + 0.5 + 1.0, -0.5, 0.5 - 0.25])
    assert not batch.failures


def test_cosine_in_characters_counts_characters_as_open_rs():
    scorer = RewardScorer([RewardSpec(name="cosine", params=RewardParams(length_unit="characters", max_len=10))],
                          grader=FixedGrader([Verdict(True, "5")]))
    assert scorer.score(["x" * 10], ["5"]).total == pytest.approx([0.5])


def test_cosine_in_tokens_needs_token_counts():
    scorer = RewardScorer([RewardSpec(name="cosine")], grader=FixedGrader([Verdict(True, "5")]))
    with pytest.raises(ValueError, match="completion_token_counts"):
        scorer.score(["x"], ["5"])


def test_ungradable_items_score_zero_and_are_counted_once():
    verdicts = [Verdict(False, reason=GOLD_UNPARSABLE), Verdict(True, "1"), Verdict(False, reason=TIMEOUT)]
    rewards = [RewardSpec(name="accuracy"), RewardSpec(name="cosine"), RewardSpec(name="length")]
    batch = RewardScorer(rewards, grader=FixedGrader(verdicts)).score(["a", "bb", "ccc"], ["?", "1", "1"], [5, 10, 15])
    for name in ("accuracy", "cosine", "length"):
        assert batch.per_function[name][0] == 0.0 and batch.per_function[name][2] == 0.0, name
    assert batch.per_function["cosine"][1] > 0.9
    assert batch.failures == {GOLD_UNPARSABLE: 1, TIMEOUT: 1}


def test_a_completion_that_is_not_text_does_not_raise():
    rewards = [RewardSpec(name="format"), RewardSpec(name="repetition"), RewardSpec(name="tag_count")]
    batch = RewardScorer(rewards).score([None, WELL_FORMED], ["1", "1"])
    assert batch.total == [0.0, 2.0]
    assert batch.failures == {"format:AttributeError": 1, "repetition:AttributeError": 1, "tag_count:AttributeError": 1}


def test_unknown_reward_or_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="'bogus'"):
        RewardScorer([RewardSpec.model_construct(name="bogus", weight=1.0, params=RewardParams())])
    with pytest.raises(ValueError, match="reward 'format' takes no parameter ngram_size"):
        RewardScorer([RewardSpec.model_construct(name="format", weight=1.0, params=RewardParams(ngram_size=2))])
    with pytest.raises(ValueError, match="'xx'"):
        RewardScorer([RewardSpec(name="language", params=RewardParams(language="xx"))])
    with pytest.raises(ValueError, match="named twice"):
        RewardScorer([RewardSpec(name="format"), RewardSpec(name="format")])


def test_open_rs_recipe_end_to_end():
    """format + 2 × cosine, the spec's default, graded by real worker processes."""
    from grpo_trainer.spec import GRPORunSpec

    rewards = GRPORunSpec.model_fields["rewards"].default_factory()
    completions = [WELL_FORMED, WELL_FORMED.replace("{5}", "{6}"), "I think it is 5"]
    with Grader(workers=2) as grader:
        batch = RewardScorer(rewards, grader=grader).score(completions, ["5", "5", "5"], [100, 100, 100])
    cosine_right, cosine_wrong = (cosine_reward(ok, 100, **COSINE) for ok in (True, False))
    assert batch.per_function["format"] == [1.0, 1.0, 0.0]
    assert batch.per_function["cosine"] == pytest.approx([cosine_right, cosine_wrong, cosine_wrong])
    assert batch.total == pytest.approx([1 + 2 * cosine_right, 1 + 2 * cosine_wrong, 2 * cosine_wrong])
    assert [v.correct for v in batch.verdicts] == [True, False, False]
    assert math.isclose(cosine_right, 0.5 + 0.25 * (1 + math.cos(math.pi / 10)))

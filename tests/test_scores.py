"""The evaluation contract: scores.json, the evaluated termination message, and the best-checkpoint rule."""

from __future__ import annotations

import pytest

from grpo_trainer.scores import best_step, evaluation_prefix, parse_scores, scores_json, selection_score
from grpo_trainer.spec import BenchmarkScore
from grpo_trainer.termination import MAX_BYTES, Outcome, TerminationMessage

FIVE = ["aime24", "math500", "amc23", "minerva", "olympiadbench"]


def score(benchmark: str, step: int, value: float) -> BenchmarkScore:
    return BenchmarkScore(benchmark=benchmark, checkpoint_step=step, score=value, ci_low=0.0, ci_high=1.0, n=30)


def test_scores_json_round_trips_and_names_a_bad_file():
    scores = [score("aime24", 50, 0.4), score("amc23", 50, 0.7)]
    assert parse_scores(scores_json(scores), "x") == scores
    with pytest.raises(ValueError, match=r"s3://b/run/evaluations/step-00000050/scores.json: not a valid"):
        parse_scores(b'{"scores": [{"benchmark": "gsm9k"}]}', "s3://b/run/evaluations/step-00000050/scores.json")
    assert evaluation_prefix(50) == "evaluations/step-00000050"


def test_evaluated_termination_message_carries_five_scores_within_the_kubelets_limit():
    rows = tuple(score(b, 12345678, 1 / 3).model_dump(mode="json", by_alias=True) for b in FIVE)
    message = TerminationMessage(Outcome.EVALUATED, step=12345678, checkpoint_uri="s3://b/" + "x" * 300, scores=rows)
    text = message.to_json()
    assert len(text.encode()) <= MAX_BYTES
    assert TerminationMessage.parse(text) == message
    assert TerminationMessage.parse('{"outcome": "evaluated", "scores": "oops"}').scores == ()


def test_selection_needs_every_benchmark_it_ranks_by():
    assert selection_score({"aime24": 0.5, "amc23": 0.7}, "mean", ["aime24", "amc23"]) == pytest.approx(0.6)
    assert selection_score({"aime24": 0.5}, "mean", ["aime24", "amc23"]) is None
    assert selection_score({"aime24": 0.5}, "aime24", FIVE) == 0.5
    assert selection_score({"amc23": 0.5}, "aime24", FIVE) is None


def test_best_step_ranks_by_the_rule_and_prefers_the_later_checkpoint_on_a_tie():
    evaluations = [
        score("aime24", 50, 0.2), score("amc23", 50, 0.9),  # mean 0.55
        score("aime24", 100, 0.4), score("amc23", 100, 0.6),  # mean 0.5
        score("aime24", 150, 0.4),  # amc23 not scored yet: not comparable
    ]
    assert best_step(evaluations, "mean", ["aime24", "amc23"]) == 50
    assert best_step(evaluations, "aime24", ["aime24", "amc23"]) == 150
    assert best_step(evaluations + [score("amc23", 150, 0.7)], "mean", ["aime24", "amc23"]) == 150
    assert best_step([score("aime24", 50, 0.3), score("aime24", 60, 0.3)], "aime24", ["aime24"]) == 60
    assert best_step([], "mean", FIVE) is None

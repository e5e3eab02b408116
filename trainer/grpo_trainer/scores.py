"""Benchmark scores: what an evaluation reports, where it lands in the store, which checkpoint is best.

The contract between ``grpo eval`` (in an evaluation Job's pod), the trainer (which must not prune a
checkpoint the operator still evaluates) and the operator (which writes ``status.evaluations``,
``status.scores`` and ``status.bestCheckpoint``):

- ``grpo eval`` writes ``<run root>/evaluations/step-NNNNNNNN/`` : per benchmark ``<bench>.jsonl``
  (one row per problem and sample) and ``<bench>.json`` (its summary), then ``scores.json`` last,
  so a folder with a valid ``scores.json`` is a finished evaluation;
- it ends with a termination message of outcome ``evaluated`` carrying the same scores
  (:class:`grpo_trainer.termination.TerminationMessage`), which the operator reads from the Job's pod;
- :func:`best_step` is the one rule that picks the best checkpoint, for the operator's status and
  the trainer's pruning alike.

Light (pydantic and the spec only): the operator image imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from statistics import fmean

from pydantic import ValidationError

from grpo_trainer.spec import BenchmarkScore

EVALUATIONS_DIR = "evaluations"
SCORES_FILE = "scores.json"
MEAN = "mean"
"""spec.evaluation.selectBy: rank checkpoints by the mean score over the run's benchmarks."""


def evaluation_prefix(step: int) -> str:
    """Where the evaluation of checkpoint ``step`` goes, below the run's root (as checkpoints/step-N)."""
    return f"{EVALUATIONS_DIR}/step-{step:08d}"


def scores_json(scores: Iterable[BenchmarkScore]) -> bytes:
    """The ``scores.json`` of a finished evaluation."""
    rows = [score.model_dump(mode="json", by_alias=True, exclude_none=True) for score in scores]
    return json.dumps({"scores": rows}, indent=1).encode()


def parse_scores(data: bytes | str, where: str) -> list[BenchmarkScore]:
    """The scores in a ``scores.json``; ValueError naming ``where`` if it is not one."""
    try:
        rows = json.loads(data)["scores"]
        if not isinstance(rows, list):
            raise TypeError("'scores' is not a list")
        return [BenchmarkScore.model_validate(row) for row in rows]
    except (ValueError, KeyError, TypeError, ValidationError) as error:
        raise ValueError(f"{where}: not a valid {SCORES_FILE} ({error})") from error


def selection_score(scores: Mapping[str, float], select_by: str, benchmarks: Iterable[str]) -> float | None:
    """One number to rank a checkpoint by: its score on ``select_by``, or with ``mean`` the mean over
    ``benchmarks``. None until every benchmark it needs is scored: a checkpoint with half its
    benchmarks is not comparable with one with all."""
    needed = list(benchmarks) if select_by == MEAN else [select_by]
    if not needed or any(benchmark not in scores for benchmark in needed):
        return None
    return fmean(scores[benchmark] for benchmark in needed)


def by_checkpoint(evaluations: Iterable[BenchmarkScore]) -> dict[int, dict[str, float]]:
    """step → benchmark → score. A benchmark scored twice for one checkpoint keeps the later entry."""
    table: dict[int, dict[str, float]] = {}
    for entry in evaluations:
        table.setdefault(entry.checkpoint_step, {})[entry.benchmark] = entry.score
    return table


def best_step(evaluations: Iterable[BenchmarkScore], select_by: str, benchmarks: Iterable[str]) -> int | None:
    """The checkpoint with the highest selection score; the later one on a tie (it trained longer
    for the same score). None while no checkpoint has every benchmark it needs."""
    benchmarks = list(benchmarks)
    ranked = [
        (value, step)
        for step, scores in by_checkpoint(evaluations).items()
        if (value := selection_score(scores, select_by, benchmarks)) is not None
    ]
    return max(ranked)[1] if ranked else None

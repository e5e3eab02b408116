"""The reward functions of a GRPORun and the scorer that sums them for one step.

Each function has Open-RS's semantics (knoveleng/open-rs ``src/open_r1/rewards.py``, itself
open-r1's of March 2025), with two deliberate differences:

- correctness comes from :mod:`grpo_trainer.grading`, graded once per completion and shared by
  accuracy, cosine and length (Open-RS parsed again in each function, cosine and length with
  ``boxed=True`` normalisation where accuracy used ``boxed="all"``; we use accuracy's for all);
- a completion that could not be graded (its gold did not parse, a timeout, a crashed worker)
  scores 0.0 in every correctness-based reward and its reason is counted. Open-RS gave 1.0 to
  every completion of a problem whose gold it could not parse.

The pure functions take one completion (``length_rewards`` takes the batch, as its formula is
relative to the batch). :class:`RewardScorer` applies a run's ``list[RewardSpec]``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpo_trainer.grading import Grader, Verdict, get_grader
from grpo_trainer.language import language_consistency, target_language
from grpo_trainer.spec import REWARD_PARAMETERS, RewardSpec

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------- the reward functions

_THINK_OPEN = "<think>\n"
_THINK_CLOSE_ANSWER_OPEN = "\n</think>\n<answer>\n"
_ANSWER_CLOSE = "\n</answer>"

_TAG_COUNTS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")

# No MULTILINE: "^\d+\." only counts a numbered item at the very start of the completion.
_REASONING_STEP = re.compile(r"Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,")


def accuracy_reward(verdict: Verdict) -> float:
    """1.0 if the final answer verifies against the gold, else 0.0."""
    return 1.0 if verdict.correct else 0.0


def format_reward(completion: str) -> float:
    """1.0 if the completion is ``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>``, else 0.0.

    Open-RS's rule is ``re.match(r"^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$", c,
    re.DOTALL | re.MULTILINE)``. This is the same test in one pass (the regex backtracks
    quadratically: 14 s on 130 kB of repeated tags). As there, the reasoning may contain
    "</think>", and since MULTILINE's ``$`` also matches before a newline, more lines may follow
    "</answer>".
    """
    if not completion.startswith(_THINK_OPEN):
        return 0.0
    # The earliest "</think><answer>" leaves the most room for the closing tag.
    middle = completion.find(_THINK_CLOSE_ANSWER_OPEN, len(_THINK_OPEN))
    if middle < 0:
        return 0.0
    close = completion.find(_ANSWER_CLOSE, middle + len(_THINK_CLOSE_ANSWER_OPEN))
    while close >= 0:
        after = close + len(_ANSWER_CLOSE)
        if after == len(completion) or completion[after] == "\n":
            return 1.0
        close = completion.find(_ANSWER_CLOSE, close + 1)
    return 0.0


def tag_count_reward(completion: str) -> float:
    """0.25 for each of "<think>\\n", "\\n</think>\\n", "\\n<answer>\\n", "\\n</answer>" found exactly once."""
    return sum(0.25 for tag in _TAG_COUNTS if completion.count(tag) == 1)


def reasoning_steps_reward(completion: str) -> float:
    """min(1, n / 3), n = step markers: "Step k:", a leading "k.", "\\n-", "\\n*", "First," "Second," "Next," "Finally,"."""
    return min(1.0, len(_REASONING_STEP.findall(completion)) / 3)


def cosine_reward(
    correct: bool,
    length: int,
    *,
    min_value_wrong: float,
    max_value_wrong: float,
    min_value_correct: float,
    max_value_correct: float,
    max_len: int,
) -> float:
    """Cosine-scaled by length (Open-RS's cosine reward).

    r = lo + ½ (hi − lo)(1 + cos(π · length / max_len)), with (lo, hi) = (min_value_correct,
    max_value_correct) for a right answer and (max_value_wrong, min_value_wrong) for a wrong one.
    So a right answer earns max_value_correct when empty and min_value_correct at max_len; a wrong
    one earns min_value_wrong when empty and max_value_wrong at max_len. (With open-r1's -1.0 and
    -0.5 a short wrong answer loses most; with Open-RS's 0.0 and -0.5 a long one does.) As in
    Open-RS the cosine is not clamped: past max_len it rises again, with period 2 · max_len.
    """
    low, high = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * length / max_len))


def length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi 1.5's length reward over a batch (lengths in characters, as Open-RS counted them).

    λ = ½ − (length − min) / (max − min) with min and max over the batch; a right answer earns λ,
    a wrong one min(0, λ). All 0.0 when every completion has the same length.
    """
    shortest, longest = min(lengths, default=0), max(lengths, default=0)
    if shortest == longest:
        return [0.0] * len(lengths)
    rewards = []
    for length, is_correct in zip(lengths, correct, strict=True):
        relative = 0.5 - (length - shortest) / (longest - shortest)
        rewards.append(relative if is_correct else min(0.0, relative))
    return rewards


def repetition_reward(completion: str, *, ngram_size: int, max_penalty: float) -> float:
    """max_penalty · (1 − distinct n-grams / n-grams), over lowercased whitespace-split words.

    0.0 for a completion of fewer than ngram_size words.
    """
    words = completion.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return (1 - len(set(ngrams)) / len(ngrams)) * max_penalty


# ------------------------------------------------------------------------------- the scorer

VERDICT_REWARDS = frozenset({"accuracy", "cosine", "length"})
"""The rewards that need the grader's verdicts."""


@dataclass
class RewardBatch:
    """One step's rewards, every list in the order of the completions."""

    total: list[float]
    """Σ weight × score over the run's rewards."""
    per_function: dict[str, list[float]]
    """Each reward's unweighted scores."""
    failures: Counter[str] = field(default_factory=Counter)
    """Why items scored 0.0 unjudged: a grading reason once per completion, or "<reward>:<error>"."""
    verdicts: list[Verdict] | None = None
    """The grader's verdicts, when a reward needed them."""


@dataclass(frozen=True)
class _Step:
    completions: Sequence[str]
    verdicts: list[Verdict] | None
    token_counts: Sequence[int] | None

    @property
    def graded(self) -> list[Verdict]:
        """The verdicts, which RewardScorer.score asks the grader for whenever a reward needs them."""
        assert self.verdicts is not None, "a reward needs verdicts that were not asked for"
        return self.verdicts

    def lengths(self, unit: str) -> Sequence[int]:
        """Each completion's length in tokens (which score requires for such a reward) or characters."""
        if unit == "tokens":
            assert self.token_counts is not None, "a reward counts tokens that were not passed"
            return self.token_counts
        return [len(c) if isinstance(c, str) else 0 for c in self.completions]


_BatchReward = Callable[[_Step, Counter], list[float]]


class RewardScorer:
    """Scores a step's completions with a run's rewards: total = Σ weight × reward.

    Correctness is graded once per completion by the grader, in parallel worker processes; the
    language reward detects the whole batch in one parallel call. No completion can make
    :meth:`score` raise: whatever fails scores 0.0 in the reward concerned, counted in
    ``failures`` and logged.
    """

    def __init__(self, rewards: Sequence[RewardSpec], grader: Grader | None = None) -> None:
        names = [spec.name for spec in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: a reward is named twice in {names}")
        self.rewards = list(rewards)
        self._functions = {spec.name: _batch_reward(spec.name, _checked_params(spec)) for spec in self.rewards}
        self._needs_verdicts = any(name in VERDICT_REWARDS for name in names)
        self._needs_tokens = any(
            spec.name == "cosine" and spec.resolved_params()["length_unit"] == "tokens" for spec in self.rewards
        )
        self._grader = grader

    def score(
        self,
        completions: Sequence[str],
        golds: Sequence[str],
        completion_token_counts: Sequence[int] | None = None,
    ) -> RewardBatch:
        """Score ``completions[i]`` against ``golds[i]``; cosine in tokens needs the token counts."""
        if len(golds) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        if completion_token_counts is None and self._needs_tokens:
            raise ValueError("reward cosine counts length in tokens: pass completion_token_counts")
        if completion_token_counts is not None and len(completion_token_counts) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(completion_token_counts)} token counts")
        failures: Counter[str] = Counter()
        verdicts = None
        if self._needs_verdicts:
            verdicts = (self._grader or get_grader()).verify_batch(completions, golds)
            failures.update(verdict.reason for verdict in verdicts if verdict.reason)
        step = _Step(completions, verdicts, completion_token_counts)
        per_function = {spec.name: self._functions[spec.name](step, failures) for spec in self.rewards}
        total = [sum(spec.weight * per_function[spec.name][i] for spec in self.rewards) for i in range(len(completions))]
        if failures:
            log.warning("rewards: %d completions, unjudged items: %s", len(completions), dict(failures))
        return RewardBatch(total, per_function, failures, verdicts)


def _checked_params(spec: RewardSpec) -> dict:
    """The reward's resolved parameters; a ValueError naming it if spec validation was bypassed."""
    if spec.name not in REWARD_PARAMETERS:
        raise ValueError(f"reward {spec.name!r} is unknown; known: {sorted(REWARD_PARAMETERS)}")
    params = spec.resolved_params()
    unknown = sorted(set(params) - set(REWARD_PARAMETERS[spec.name]))
    if unknown:
        raise ValueError(f"reward {spec.name!r} takes no parameter {', '.join(unknown)}")
    if spec.name == "language":
        target_language(params["language"])
    return params


def _batch_reward(name: str, params: dict) -> _BatchReward:
    """The reward as a function of the whole step."""
    if name == "accuracy":
        return lambda step, failures: [accuracy_reward(verdict) for verdict in step.graded]
    if name == "cosine":
        return _cosine_batch(**params)
    if name == "length":
        return _length_batch
    if name == "language":
        return lambda step, failures: _language_batch(step, failures, **params)
    per_completion = {
        "format": format_reward,
        "tag_count": tag_count_reward,
        "reasoning_steps": reasoning_steps_reward,
        "repetition": repetition_reward,
    }[name]
    return lambda step, failures: _each_completion(name, per_completion, params, step, failures)


def _each_completion(name: str, reward: Callable[..., float], params: dict, step: _Step, failures: Counter) -> list[float]:
    scores = []
    for completion in step.completions:
        try:
            scores.append(reward(completion, **params))
        except Exception as error:  # e.g. a completion that is not text
            failures[f"{name}:{type(error).__name__}"] += 1
            log.warning("reward %s failed on one completion: %r", name, error)
            scores.append(0.0)
    return scores


def _cosine_batch(length_unit: str, **params: Any) -> _BatchReward:
    def cosine(step: _Step, failures: Counter) -> list[float]:
        return [
            0.0 if verdict.reason else cosine_reward(verdict.correct, length, **params)
            for verdict, length in zip(step.graded, step.lengths(length_unit), strict=True)
        ]

    return cosine


def _length_batch(step: _Step, failures: Counter) -> list[float]:
    scores = length_rewards(step.lengths("characters"), [verdict.correct for verdict in step.graded])
    return [0.0 if verdict.reason else score for score, verdict in zip(scores, step.graded, strict=True)]


def _language_batch(step: _Step, failures: Counter, language: str) -> list[float]:
    is_text = [isinstance(c, str) for c in step.completions]
    if not all(is_text):
        failures["language:not text"] += is_text.count(False)
    try:
        scores = language_consistency([c if ok else "" for c, ok in zip(step.completions, is_text, strict=True)], language)
    except Exception as error:  # the detector itself failed: no completion is judged
        log.exception("reward language failed for the whole batch")
        failures[f"language:{type(error).__name__}"] += len(step.completions)
        return [0.0] * len(step.completions)
    return [score if ok else 0.0 for score, ok in zip(scores, is_text, strict=True)]

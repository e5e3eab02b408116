r"""``grpo eval``: a model's pass@1 on the paper's benchmarks, computed as Open-RS computed it.

The flow, per benchmark: problems (:mod:`grpo_trainer.benchmarks`) → lighteval's prompt in the
model's chat template → k samples per problem from a backend (vLLM's offline engine on GPUs, the
trainer's own batched sampler elsewhere) → the grader's lighteval profile for that benchmark →
rows, a summary and a score with its confidence interval → ``scores.json`` last.

Fidelity to the paper's evaluation (lighteval ed08481 with vLLM, Open-RS's README settings):
- the prompt is the chat template applied to one user turn (no system prompt), tokenized again with
  ``add_special_tokens=True`` as lighteval's vLLM model did: a tokenizer that adds a BOS (the
  DeepSeek-R1 distills' does) gets a second one, as the paper's runs did;
- sampling: temperature 0.6, top-p 0.95, nothing else (top-k, min-p, penalties off), k = 1;
- length: lighteval passed ``max_new_tokens`` 32768 with ``max_model_length`` 32768, and its own
  prompt truncation was a no-op (``input[-0:]`` is the whole prompt), so vLLM stopped each sequence
  at the model length: a completion gets at most ``maxModelLen - len(prompt)`` tokens. We cap it
  so explicitly, for every backend;
- pass@1 is the mean over problems of each problem's mean over its k samples;
- beside it, ``boxedGoldScore`` reads each gold as the training reward does (a bare gold is
  ``\boxed{gold}``, never compared as a string): the answer's value, not the paper's number. They
  differ on OlympiadBench, whose 409 golds without ``$…$`` lighteval compared as strings.

The 95 % interval is Wilson's score interval over problems (n = problems, not samples): exact for
k = 1, where each problem is one Bernoulli draw, and conservative for k > 1, since a per-problem mean
in [0, 1] with mean p has variance at most p(1 − p). On 30 AIME problems 46.7 % is [30.2 %, 63.9 %].
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from grpo_trainer.benchmarks import BenchmarkProblem, hash_examples, load_benchmark
from grpo_trainer.model import chat_prompt
from grpo_trainer.scores import SCORES_FILE, scores_json
from grpo_trainer.spec import BenchmarkScore

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from grpo_trainer.storage import Storage

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054
CI_METHOD = "Wilson score interval, 95 %, over problems"
GRADING_TIMEOUT_S = 30.0
"""A bound on one item's grading: lighteval had none, only 5 s per parse and per comparison."""


@dataclass(frozen=True)
class EvalSettings:
    """How to generate: the paper's settings by default (spec.evaluation's defaults)."""

    samples_per_problem: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    max_model_len: int = 32768
    seed: int = 1234  # lighteval's vLLM default
    limit: int | None = None
    """Only the first N problems of each benchmark (a quick look; not comparable with the paper)."""


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    truncated: bool
    """Stopped by the token cap, not by an end-of-sequence token."""


Progress = Callable[[int], None]


class Backend(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], caps: Sequence[int], settings: EvalSettings, advance: Progress
    ) -> list[list[Sample]]:
        """``settings.samples_per_problem`` samples of each prompt, prompt i capped at ``caps[i]``
        new tokens; ``advance(n)`` after each n samples finished."""
        ...


@dataclass
class BenchmarkResult:
    """What one benchmark's evaluation produced: its rows and its summary."""

    benchmark: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def score(self, step: int) -> BenchmarkScore:
        s = self.summary
        return BenchmarkScore(
            benchmark=self.benchmark,
            checkpoint_step=step,
            score=s["score"],
            ci_low=s["ciLow"],
            ci_high=s["ciHigh"],
            n=s["n"],
            samples_per_problem=s["k"],
        )


# ---------------------------------------------------------------------------------- statistics


def wilson_interval(mean: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``mean`` observed over ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    denominator = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denominator
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_1(rows: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """The mean over problems of each problem's mean verdict, and the number of problems."""
    by_problem: dict[str, list[bool]] = {}
    for row in rows:
        by_problem.setdefault(row["id"], []).append(row["correct"])
    if not by_problem:
        return 0.0, 0
    return sum(sum(v) / len(v) for v in by_problem.values()) / len(by_problem), len(by_problem)


# ---------------------------------------------------------------------------------------- prompts


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, problems: Sequence[BenchmarkProblem]) -> list[list[int]]:
    """Each problem as lighteval posed it with --use-chat-template to its vLLM model."""
    texts = [chat_prompt(tokenizer, [{"role": "user", "content": p.query}]) for p in problems]
    return tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []


def token_caps(prompts: Sequence[Sequence[int]], settings: EvalSettings) -> list[int]:
    """Each prompt's cap on new tokens: maxNewTokens, and never past the model length."""
    return [max(0, min(settings.max_new_tokens, settings.max_model_len - len(prompt))) for prompt in prompts]


# ------------------------------------------------------------------------------------------ backends


class TransformersBackend:
    """The trainer's own batched sampler (rollout.py) on the model in this process: CPUs and small GPUs.

    Prompts go in batches of similar length (less padding); each batch draws from its own seed, so a
    run is reproducible for a given batch size. A batch generates up to its largest cap and each row
    is then cut at its own: the tokens before the cut are the same as with that cap alone.
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, prompts_per_batch: int = 8) -> None:
        from grpo_trainer.model import eos_token_ids, pad_token_id
        from grpo_trainer.rollout import TransformersSampler

        self.sampler = TransformersSampler(
            model,
            eos_token_ids=eos_token_ids(model, tokenizer),
            pad_token_id=pad_token_id(tokenizer),
            prompts_per_batch=prompts_per_batch,
        )
        self.prompts_per_batch = prompts_per_batch

    def generate(
        self, prompts: Sequence[Sequence[int]], caps: Sequence[int], settings: EvalSettings, advance: Progress
    ) -> list[list[Sample]]:
        k = settings.samples_per_problem
        samples: list[list[Sample]] = [[Sample([], truncated=True)] * k if cap == 0 else [] for cap in caps]
        order = sorted((i for i, cap in enumerate(caps) if cap > 0), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.prompts_per_batch):
            batch = order[start : start + self.prompts_per_batch]
            rollouts = self.sampler.generate(
                [prompts[i] for i in batch],
                num_generations=k,
                max_new_tokens=max(caps[i] for i in batch),
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed + start,
            )
            for row, (ids, truncated) in enumerate(zip(rollouts.completion_ids, rollouts.truncated, strict=True)):
                index = batch[row // k]
                cut = len(ids) > caps[index]
                samples[index].append(Sample(ids[: caps[index]], truncated=truncated or cut))
            advance(len(batch) * k)
        return samples


# ------------------------------------------------------------------------------------- one benchmark


def evaluate_benchmark(
    name: str,
    problems: Sequence[BenchmarkProblem],
    tokenizer: PreTrainedTokenizerBase,
    backend: Backend,
    settings: EvalSettings,
    advance: Progress,
) -> BenchmarkResult:
    """Generate, grade and summarise one benchmark."""
    from grpo_trainer.grading import BENCHMARK_PROFILES, Grader

    started = time.monotonic()
    prompts = prompt_token_ids(tokenizer, problems)
    caps = token_caps(prompts, settings)
    if blocked := sum(cap == 0 for cap in caps):
        logger.warning(
            "%s: %d prompts are as long as maxModelLen (%d): their completions are empty", name, blocked, settings.max_model_len
        )
    samples = backend.generate(prompts, caps, settings, advance)
    generated = time.monotonic()

    rows = []
    for problem, prompt_samples in zip(problems, samples, strict=True):
        for index, sample in enumerate(prompt_samples):
            rows.append(
                {
                    "id": problem.id,
                    "sample": index,
                    "completion": tokenizer.decode(sample.token_ids, skip_special_tokens=True),
                    "tokens": len(sample.token_ids),
                    "truncated": sample.truncated,
                    "gold": problem.gold,
                }
            )
    completions, golds = [row["completion"] for row in rows], [row["gold"] for row in rows]
    with Grader(profile=BENCHMARK_PROFILES[name], timeout_s=GRADING_TIMEOUT_S) as grader:
        verdicts = grader.verify_batch(completions, golds)
    with Grader(profile="lighteval-boxed-gold", timeout_s=GRADING_TIMEOUT_S) as grader:
        boxed_gold = grader.verify_batch(completions, golds)
    for row, verdict, value_verdict in zip(rows, verdicts, boxed_gold, strict=True):
        row.update(answer=verdict.answer, correct=verdict.correct, reason=verdict.reason, boxedGoldCorrect=value_verdict.correct)
    graded = time.monotonic()

    score, n = pass_at_1(rows)
    low, high = wilson_interval(score, n)
    value_score, _ = pass_at_1([{"id": row["id"], "correct": row["boxedGoldCorrect"]} for row in rows])
    tokens = sum(row["tokens"] for row in rows)
    summary = {
        "benchmark": name,
        "score": score,
        "ciLow": low,
        "ciHigh": high,
        "ciMethod": CI_METHOD,
        "boxedGoldScore": value_score,
        "n": n,
        "k": settings.samples_per_problem,
        "truncated": sum(row["truncated"] for row in rows),
        "ungraded": sum(row["reason"] is not None for row in rows),
        "tokens": tokens,
        "tokensPerSecond": tokens / max(generated - started, 1e-9),
        "generationSeconds": generated - started,
        "gradingSeconds": graded - generated,
        "wallSeconds": graded - started,
        "hashExamples": hash_examples([p.query for p in problems]),
        "settings": asdict(settings),
    }
    return BenchmarkResult(name, rows, summary)


# ------------------------------------------------------------------------------------------ a run


def write_result(storage: Storage, result: BenchmarkResult, model: str) -> None:
    """``<bench>.jsonl`` (a row per problem and sample) and ``<bench>.json`` (the summary)."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
    storage.put_bytes(f"{result.benchmark}.jsonl", lines.encode("utf-8"))
    summary = {"model": model, **result.summary}
    storage.put_bytes(f"{result.benchmark}.json", json.dumps(summary, indent=1).encode("utf-8"))


def load_benchmarks(names: Sequence[str], data_dir: Path | None, settings: EvalSettings) -> dict[str, list[BenchmarkProblem]]:
    """Every benchmark's problems, before anything is generated: a bad set fails the run at once."""
    return {name: load_benchmark(name, data_dir, limit=settings.limit) for name in names}


def run_evaluation(
    model: str,
    loaded: dict[str, list[BenchmarkProblem]],
    settings: EvalSettings,
    storage: Storage,
    backend: Backend,
    tokenizer: PreTrainedTokenizerBase,
    *,
    step: int,
    console: Console,
) -> list[BenchmarkResult]:
    """Every benchmark in turn, each written as it finishes; ``scores.json`` last."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks = {
            name: bar.add_task(name, total=len(problems) * settings.samples_per_problem) for name, problems in loaded.items()
        }
        for name, problems in loaded.items():
            advance = _Advance(bar, tasks[name], logged=not console.is_terminal)
            result = evaluate_benchmark(name, problems, tokenizer, backend, settings, advance)
            write_result(storage, result, model)
            results.append(result)
    storage.put_bytes(SCORES_FILE, scores_json(result.score(step) for result in results))
    return results


class _Advance:
    """Moves a benchmark's progress bar; where no terminal shows it (a Job's log), it also logs the
    count every LOG_EVERY_S seconds, so ``kubectl logs`` says where an evaluation stands."""

    LOG_EVERY_S = 60.0

    def __init__(self, bar, task, *, logged: bool) -> None:
        self.bar, self.task, self.logged = bar, task, logged
        self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.bar.advance(self.task, n)
        if self.logged and time.monotonic() - self.last >= self.LOG_EVERY_S:
            self.last = time.monotonic()
            task = self.bar.tasks[self.task]
            logger.info("%s: %d of %d samples, %.0f s", task.description, task.completed, task.total, task.elapsed or 0)


def print_table(results: Sequence[BenchmarkResult], console: Console, where: str) -> None:
    from rich.table import Table

    table = Table(title=f"pass@1 (95 % CI: Wilson, over problems) — {where}")
    for heading in ("benchmark", "score", "95 % CI", "boxed gold", "n × k", "truncated", "tokens/s", "wall"):
        table.add_column(heading, justify="left" if heading == "benchmark" else "right")
    for result in results:
        s = result.summary
        table.add_row(
            result.benchmark,
            f"{100 * s['score']:.1f} %",
            f"[{100 * s['ciLow']:.1f}, {100 * s['ciHigh']:.1f}]",
            f"{100 * s['boxedGoldScore']:.1f} %",
            f"{s['n']} × {s['k']}",
            str(s["truncated"]),
            f"{s['tokensPerSecond']:.0f}",
            f"{s['wallSeconds']:.0f} s",
        )
    console.print(table)

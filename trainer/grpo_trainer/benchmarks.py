r"""The evaluation sets: the paper's five benchmarks (and GSM8K for CPU runs), read as lighteval read them.

Open-RS scored its models with lighteval (commit ed08481) and the custom tasks of its
``src/open_r1/evaluate.py``: each problem becomes ``MATH_QUERY_TEMPLATE.format(Question=...)``, the
user turn of the model's chat template, and is graded against the column lighteval took as its gold
(the whole worked solution for MATH-500 and Minerva, whose ``\boxed{}`` the grader extracts). The
sets come from the hub ids lighteval used, or from a local folder of ``<name>/test.jsonl`` files in
the normalised format of the project's shared data (``problem``, ``answer``, ``solution``), whose
problem texts are byte-identical to the hub's: :func:`hash_examples` reproduces the ``hash_examples``
lighteval logged for Open-RS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_trainer.data import DatasetError, read_table
from grpo_trainer.spec import DatasetSpec

# Verbatim from knoveleng/open-rs src/open_r1/evaluate.py (lighteval's math prompt), after .strip().
MATH_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think "
    "step by step before answering.\n\n{Question}"
)

LOCAL_FILE = "test.jsonl"
LOCAL_PROBLEM_COLUMN = "problem"


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's problems come from and which column is its gold."""

    name: str
    hub_id: str
    hub_split: str
    hub_problem_column: str
    gold_column: str
    """lighteval's gold column; the local files keep the same column name."""
    hub_config: str | None = None
    logged_hash: str | None = None
    """The hash_examples lighteval logged for this set in Open-RS's results (None: not one of them)."""
    gold_marker: str | None = None
    """Keep only the text after the last occurrence of this marker (GSM8K's ``#### 72``)."""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", logged_hash="ddec8fc79d0a014b"),
        Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "problem", "solution", logged_hash="adf0cc8311011db2"),
        Benchmark("amc23", "knoveleng/AMC-23", "train", "problem", "answer", logged_hash="57f3ead69f601b6a"),
        Benchmark("minerva", "knoveleng/Minerva-Math", "train", "problem", "solution", logged_hash="2380609739db80f4"),
        Benchmark("olympiadbench", "knoveleng/OlympiadBench", "train", "question", "answer", logged_hash="96eebb759f237c57"),
        # Not one of the paper's: a set on which a small model on a CPU scores above zero.
        Benchmark("gsm8k", "openai/gsm8k", "test", "question", "answer", hub_config="main", gold_marker="####"),
    )
}


@dataclass(frozen=True)
class BenchmarkProblem:
    id: str
    question: str
    gold: str
    """The gold as lighteval took it: the raw column text, extracted by the grader."""

    @property
    def query(self) -> str:
        """The user turn lighteval built for this problem."""
        return MATH_QUERY_TEMPLATE.format(Question=self.question)


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(name: str, data_dir: Path | None = None, *, limit: int | None = None) -> list[BenchmarkProblem]:
    """The problems of benchmark ``name`` in the set's own order: from ``data_dir/<name>/test.jsonl``,
    or from the hub when ``data_dir`` is None. ``limit`` keeps the first N. DatasetError names the
    file (or hub id) and row of anything unusable."""
    spec = benchmark(name)
    if data_dir is not None:
        path = data_dir / name / LOCAL_FILE
        source = DatasetSpec(source=str(path.absolute()), split="test")
        problem_column, where = LOCAL_PROBLEM_COLUMN, str(path)
    else:
        source = DatasetSpec(source=spec.hub_id, config=spec.hub_config, split=spec.hub_split)
        problem_column, where = spec.hub_problem_column, f"hub dataset {spec.hub_id} ({spec.hub_split})"
    columns, rows = read_table(source)
    for column in (problem_column, spec.gold_column):
        if column not in columns:
            known = ", ".join(columns) or "(none)"
            raise DatasetError(f"{where}: no column {column!r} (benchmark {name}); its columns are {known}")
    rows = rows[:limit] if limit is not None else rows
    return [_problem(spec, row, index, problem_column, where) for index, row in enumerate(rows)]


def _problem(spec: Benchmark, row: dict[str, Any], index: int, problem_column: str, where: str) -> BenchmarkProblem:
    question, gold = row.get(problem_column), row.get(spec.gold_column)
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: row {index + 1} has no {problem_column!r} text")
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        gold = str(int(gold)) if float(gold).is_integer() else str(gold)
    if not isinstance(gold, str):
        raise DatasetError(f"{where}: row {index + 1} has no {spec.gold_column!r} text (its gold)")
    if spec.gold_marker and spec.gold_marker in gold:
        gold = gold.rsplit(spec.gold_marker, 1)[1].strip().replace(",", "")
    return BenchmarkProblem(id=str(row.get("id") or index), question=question, gold=gold)


def hash_examples(queries: list[str]) -> str:
    """lighteval's fingerprint of a task's documents: xxh64 of the sorted xxh64 digests of the queries."""
    import xxhash

    digests = sorted(xxhash.xxh64(query.encode("utf-8")).hexdigest() for query in queries)
    return xxhash.xxh64("".join(digests).encode("utf-8")).hexdigest()

r"""Training problems: where they come from, their gold answers, and the prompts built from them.

A DatasetSpec source is one of:

- a local ``.jsonl``, ``.json`` or ``.parquet`` file, or a directory written by
  ``datasets``' ``save_to_disk``, written absolute, ``./relative``, ``~/...`` or ``file://...``;
- a Hugging Face hub dataset id, read with ``datasets.load_dataset``;
- ``s3://bucket/key`` of such a file, or ``s3://bucket/prefix`` of such a directory, downloaded
  through :mod:`grpo_trainer.storage`;
- ``builtin://arithmetic``, a seeded synthetic task that needs no download.

A row's gold answer is its answer column when that is non-empty, else the last ``\boxed{...}`` of
its solution column. Rows with neither are skipped and counted; a dataset where no row has one is
an error. Prompts are the problem in the model's chat template after the spec's system prompt;
those longer than max_prompt_length tokens are dropped and counted (truncating a problem would
change the question). Everything fails here, before training, never mid-run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_trainer.model import CACHE_DIR, chat_prompt, check_chat_template, local_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from grpo_trainer.spec import DatasetSpec

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the source and what is wrong."""


@dataclass(frozen=True)
class Problem:
    """One training problem: the question as the dataset states it and its gold final answer."""

    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class Prompt:
    """A problem posed to the model: its chat messages, rendered by the chat template (ending
    with the assistant's turn opening) and tokenized."""

    problem: Problem
    messages: list[dict[str, str]]
    text: str
    token_ids: list[int]


# ------------------------------------------------------------------------------------- loading


def load_problems(
    spec: DatasetSpec, *, cache_dir: Path | None = None, endpoint_url: str | None = None
) -> list[Problem]:
    """The spec's problems with their golds: shuffled with its seed if asked, then the first
    max_samples. ``cache_dir`` and ``endpoint_url`` apply to s3:// sources."""
    source = spec.source
    if source.startswith("builtin://"):
        problems = builtin_problems(source)
    else:
        columns, rows = read_table(spec, cache_dir, endpoint_url)
        problems = problems_from_rows(
            rows,
            columns,
            problem_column=spec.problem_column,
            answer_column=spec.answer_column,
            solution_column=spec.solution_column,
            where=source,
        )
    if spec.shuffle:
        random.Random(spec.seed).shuffle(problems)
    if spec.max_samples is not None:
        problems = problems[: spec.max_samples]
    logger.info("%s: %d problems", source, len(problems))
    return problems


def problems_from_rows(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    *,
    problem_column: str,
    answer_column: str,
    solution_column: str,
    where: str,
) -> list[Problem]:
    """Problems from table rows, skipping (and counting) rows without a question or a gold.

    ``columns`` are the table's column names, ``where`` names it in messages. A row's id is its
    ``id`` column, else its index.
    """
    if problem_column not in columns:
        raise DatasetError(
            f"{where}: no problem column {problem_column!r}; its columns are {_listed(columns)} "
            "(set dataset.problemColumn)"
        )
    problems, no_question, no_gold = [], 0, 0
    for index, row in enumerate(rows):
        question = row.get(problem_column)
        if not isinstance(question, str) or not question.strip():
            no_question += 1
            continue
        gold = gold_answer(row.get(answer_column), row.get(solution_column))
        if gold is None:
            no_gold += 1
            continue
        row_id = row.get("id")
        problems.append(Problem(id=str(index if row_id in (None, "") else row_id), question=question, answer=gold))
    total = len(problems) + no_question + no_gold
    if not problems:
        raise DatasetError(
            f"{where}: none of its {total} rows has a question in {problem_column!r} and a gold answer "
            f"(a non-empty {answer_column!r}, or a \\boxed{{}} in {solution_column!r}); its columns are "
            f"{_listed(columns)} (set dataset.answerColumn / dataset.solutionColumn)"
        )
    if no_question:
        logger.warning("%s: skipped %d of %d rows with an empty %r", where, no_question, total, problem_column)
    if no_gold:
        logger.warning(
            "%s: skipped %d of %d rows without a gold answer (empty %r, no \\boxed{} in %r)",
            where, no_gold, total, answer_column, solution_column,
        )
    return problems


def gold_answer(answer: Any, solution: Any) -> str | None:
    """The gold of a row: its answer when non-empty, else the last \\boxed{} of its solution."""
    if isinstance(answer, bool):
        answer = None  # a flag, not an answer
    elif isinstance(answer, int):
        return str(answer)
    elif isinstance(answer, float) and math.isfinite(answer):
        # JSON and parquet store integers as floats at times (AMC23 upstream writes 27.0).
        return str(int(answer)) if answer.is_integer() else str(answer)
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    if isinstance(solution, str):
        return last_boxed(solution)
    return None


_BOXED = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
    """The contents of the last complete ``\\boxed{...}`` in ``text`` (braces matched), or None."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                found = text[start:position].strip() or found
                break
    return found


def read_table(
    spec: DatasetSpec, cache_dir: Path | None = None, endpoint_url: str | None = None
) -> tuple[list[str], list[dict]]:
    """The column names and rows of a dataset source (local, s3:// or hub; not builtin://)."""
    source = spec.source
    if source.startswith("s3://"):
        return _read_local(_download(source, cache_dir, endpoint_url), spec.split, source)
    path = local_path(source)
    if path is not None:
        return _read_local(path, spec.split, source)
    return _read_hub(source, spec.config, spec.split)


def _read_local(path: Path, split: str, source: str) -> tuple[list[str], list[dict]]:
    if path.is_dir():
        return _read_saved_dataset(path, split, source)
    if not path.is_file():
        raise DatasetError(f"{source}: {path} does not exist")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DatasetError(f"{source}: {path.name} is not a {', '.join(readers)} file or a saved-dataset directory")
    try:
        return readers[path.suffix](path, source)
    except DatasetError:
        raise
    except (OSError, ValueError) as err:  # ValueError: bad UTF-8, or pyarrow's ArrowInvalid
        raise DatasetError(f"{source}: cannot read {path}: {err}") from err


def _read_jsonl(path: Path, source: str) -> tuple[list[str], list[dict]]:
    return _columns_and_rows(_json_lines(path.read_text(encoding="utf-8"), source))


def _read_json(path: Path, source: str) -> tuple[list[str], list[dict]]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        # datasets' to_json writes JSON Lines, whatever the file is called.
        return _columns_and_rows(_json_lines(text, source))
    if not isinstance(records, list):
        raise DatasetError(f"{source}: expected a JSON list of objects (or JSON Lines), found a {type(records).__name__}")
    return _columns_and_rows(records)


def _read_parquet(path: Path, source: str) -> tuple[list[str], list[dict]]:
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(path)
    return table.column_names, table.to_pylist()


def _json_lines(text: str, source: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{source}: line {number} is not JSON: {err}") from None
    return rows


def _columns_and_rows(rows: list[Any]) -> tuple[list[str], list[dict]]:
    rows = [row if isinstance(row, dict) else {} for row in rows]  # a non-object line: a row without a question
    return list(dict.fromkeys(key for row in rows for key in row)), rows


def _read_saved_dataset(path: Path, split: str, source: str) -> tuple[list[str], list[dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{source}: {path} is not a directory written by save_to_disk: {err}") from err
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            splits = _listed(str(name) for name in dataset)
            raise DatasetError(f"{source}: no split {split!r}; its splits are {splits} (set dataset.split)")
        dataset = dataset[split]
    return dataset.column_names, dataset.to_list()


def _read_hub(dataset_id: str, config: str | None, split: str) -> tuple[list[str], list[dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except (OSError, ValueError) as err:
        subset = f"config {config!r}, " if config else ""
        hint = f"; for a local file write ./{dataset_id}" if dataset_id.endswith(FILE_SUFFIXES) else ""
        raise DatasetError(
            f"cannot load hub dataset {dataset_id!r} ({subset}split {split!r}): {err}. The Hugging "
            f"Face hub may be unreachable (offline, or HF_HUB_OFFLINE=1), or the id, config or split is wrong; "
            f"offline, use a local file or builtin://arithmetic{hint}"
        ) from err
    return dataset.column_names, dataset.to_list()


def _download(source: str, cache_dir: Path | None, endpoint_url: str | None) -> Path:
    from grpo_trainer.storage import open_storage

    target = (cache_dir or CACHE_DIR).expanduser() / "datasets" / source.removeprefix("s3://")
    # A fresh copy: files left from an older version of the prefix would be read too.
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    parent, _, name = source.rpartition("/")
    if name.endswith(FILE_SUFFIXES):
        open_storage(parent, endpoint_url=endpoint_url).download_file(name, target)
    elif not open_storage(source, endpoint_url=endpoint_url).download_dir("", target):
        raise DatasetError(f"{source}: no objects under this prefix")
    return target


def _listed(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names) or "(none)"


# ----------------------------------------------------------------------------- builtin tasks

ARITHMETIC_SIZE = 10_000
ARITHMETIC_SEED = 0
"""The task is one fixed dataset, like a file: the spec's seed shuffles it, never changes it."""

ANSWER_EXAMPLE = "Example: What is 2 + 3?\nAnswer: 2 + 3 = 5. The answer is \\boxed{5}.\n\nNow answer: "
r"""Put before every question. SmolLM2-135M-Instruct follows a worked example in the user's turn
where it ignores one in the system prompt: with it a quarter to a half of its answers carry a
``\boxed{}`` the grader can read, without it under a tenth."""

_NAMES = ("Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Lily", "Max", "Emma", "Noah", "Ella")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "coins", "cards", "balloons")


def arithmetic_rows(count: int = ARITHMETIC_SIZE, seed: int = ARITHMETIC_SEED) -> list[dict[str, Any]]:
    """Additions and subtractions with exact non-negative answers, in three levels sized to what a
    135M model gets right at all: a bare sum or difference of one-digit numbers (level 1, 60%),
    of numbers up to 20 (level 2, 25%), and a one-step word problem with numbers up to 20
    (level 3, 15%). Each question follows :data:`ANSWER_EXAMPLE`.

    Each row has ``id``, ``problem``, ``answer``, ``level`` and ``expression``: the computation
    in Python syntax over the question's numbers as it states them, in order.
    """
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        level = rng.choices((1, 2, 3), weights=(60, 25, 15))[0]
        question, expression, answer = rng.choice(_TEMPLATES[level])(rng)
        rows.append(
            {
                "id": f"arithmetic-{index:05d}",
                "problem": ANSWER_EXAMPLE + question,
                "answer": str(answer),
                "level": level,
                "expression": expression,
            }
        )
    return rows


def _operands(rng: random.Random, top: int, subtract: bool) -> tuple[int, int]:
    """Two numbers from 1 to ``top``; for a subtraction the larger first, so the answer is >= 0."""
    a, b = rng.randint(1, top), rng.randint(1, top)
    return (max(a, b), min(a, b)) if subtract else (a, b)


def _bare(top: int, subtract: bool) -> _Template:
    def template(rng: random.Random) -> tuple[str, str, int]:
        a, b = _operands(rng, top, subtract)
        expression = f"{a} - {b}" if subtract else f"{a} + {b}"
        return f"What is {expression}?", expression, a - b if subtract else a + b

    return template


def _buy(rng: random.Random) -> tuple[str, str, int]:
    a, b = _operands(rng, 20, subtract=False)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", f"{a} + {b}", a + b


def _give(rng: random.Random) -> tuple[str, str, int]:
    a, b = _operands(rng, 20, subtract=True)
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    text = f"{name} has {a} {item} and gives {b} of them to {friend}. How many {item} does {name} have left?"
    return text, f"{a} - {b}", a - b


_Template = Callable[[random.Random], tuple[str, str, int]]
_TEMPLATES: dict[int, tuple[_Template, ...]] = {
    1: (_bare(9, subtract=False), _bare(9, subtract=True)),
    2: (_bare(20, subtract=False), _bare(20, subtract=True)),
    3: (_buy, _give),
}

BUILTIN_TASKS: dict[str, Callable[[], list[dict[str, Any]]]] = {"arithmetic": arithmetic_rows}


def builtin_problems(source: str) -> list[Problem]:
    """The problems of ``builtin://NAME``."""
    name = source.removeprefix("builtin://")
    if name not in BUILTIN_TASKS:
        raise DatasetError(f"{source}: no such built-in task; there are {_listed(f'builtin://{n}' for n in BUILTIN_TASKS)}")
    rows = BUILTIN_TASKS[name]()
    return problems_from_rows(
        rows, list(rows[0]), problem_column="problem", answer_column="answer", solution_column="solution", where=source
    )


# ------------------------------------------------------------------------------------- prompts


def chat_messages(question: str, system_prompt: str) -> list[dict[str, str]]:
    """The conversation a problem is posed as: the system prompt (none when empty), then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": question}]


def build_prompts(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str,
    max_prompt_length: int,
) -> list[Prompt]:
    """The problems in the tokenizer's chat template, ending where the assistant's answer starts;
    those longer than ``max_prompt_length`` tokens are dropped and counted."""
    check_chat_template(tokenizer, tokenizer.name_or_path or "the tokenizer")
    conversations = [chat_messages(problem.question, system_prompt) for problem in problems]
    texts = [chat_prompt(tokenizer, messages) for messages in conversations]
    # The template writes every special token itself (a BOS included, where the model has one).
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prompts = [
        Prompt(problem, messages, text, ids)
        for problem, messages, text, ids in zip(problems, conversations, texts, token_ids, strict=True)
        if len(ids) <= max_prompt_length
    ]
    dropped = len(problems) - len(prompts)
    if problems and not prompts:
        raise DatasetError(
            f"all {len(problems)} prompts are longer than maxPromptLength={max_prompt_length} tokens "
            f"(the shortest has {min(map(len, token_ids))}); raise grpo.maxPromptLength"
        )
    if dropped:
        logger.warning(
            "dropped %d of %d prompts longer than maxPromptLength=%d tokens", dropped, len(problems), max_prompt_length
        )
    return prompts

"""Problems from every source kind, their golds, the built-in task, and the prompts built from them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from grpo_trainer.data import (
    ANSWER_EXAMPLE,
    ARITHMETIC_SIZE,
    DatasetError,
    Problem,
    arithmetic_rows,
    build_prompts,
    chat_messages,
    gold_answer,
    last_boxed,
    load_problems,
)
from grpo_trainer.model import ModelError
from grpo_trainer.spec import DatasetSpec
from grpo_trainer.validation import load_manifest

REPO = Path(__file__).resolve().parent.parent

ROWS = [
    {"id": "a", "problem": "What is 2 + 3?", "answer": "5", "solution": "2 + 3 = \\boxed{5}"},
    {"id": "b", "problem": "What is half of 1?", "answer": "", "solution": "It is \\boxed{\\frac{1}{2}}."},
    {"id": "c", "problem": "Unanswered?", "answer": None, "solution": "No box here."},
    {"id": "d", "problem": "What is 6 * 7?", "answer": " 42 ", "solution": None},
]
EXPECTED = [
    Problem("a", "What is 2 + 3?", "5"),
    Problem("b", "What is half of 1?", "\\frac{1}{2}"),
    Problem("d", "What is 6 * 7?", "42"),
]


def spec(source: str | Path, **fields) -> DatasetSpec:
    return DatasetSpec(source=str(source), shuffle=fields.pop("shuffle", False), **fields)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ source kinds


def _jsonl(tmp: Path) -> Path:
    return write_jsonl(tmp / "rows.jsonl", ROWS)


def _json_list(tmp: Path) -> Path:
    path = tmp / "rows.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    return path


def _json_written_by_datasets(tmp: Path) -> Path:
    import datasets

    path = tmp / "rows.json"
    datasets.Dataset.from_list(ROWS).to_json(path)  # JSON Lines under a .json name
    return path


def _parquet(tmp: Path) -> Path:
    import pyarrow
    import pyarrow.parquet

    path = tmp / "rows.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), path)
    return path


def _saved_dataset(tmp: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(tmp / "saved")
    return tmp / "saved"


def _saved_dataset_dict(tmp: Path) -> Path:
    import datasets

    other = [{"id": "z", "problem": "Other split?", "answer": "0", "solution": None}]
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(other)}
    datasets.DatasetDict(splits).save_to_disk(tmp / "saved")
    return tmp / "saved"


@pytest.mark.parametrize(
    "write", [_jsonl, _json_list, _json_written_by_datasets, _parquet, _saved_dataset, _saved_dataset_dict]
)
def test_every_local_source_kind_gives_the_same_problems(tmp_path, caplog, write):
    path = write(tmp_path)
    with caplog.at_level(logging.WARNING, logger="grpo_trainer.data"):
        problems = load_problems(spec(path))
    assert problems == EXPECTED
    assert "skipped 1 of 4 rows without a gold answer" in caplog.text


def test_file_uri_and_home_relative_paths(tmp_path, monkeypatch):
    _jsonl(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_problems(spec(f"file://{tmp_path}/rows.jsonl")) == EXPECTED
    assert load_problems(spec("~/rows.jsonl")) == EXPECTED
    monkeypatch.chdir(tmp_path)
    assert load_problems(spec("./rows.jsonl")) == EXPECTED


def test_saved_dataset_dict_split_is_chosen_and_a_missing_one_is_named(tmp_path):
    path = _saved_dataset_dict(tmp_path)
    assert [p.id for p in load_problems(spec(path, split="test"))] == ["z"]
    with pytest.raises(DatasetError, match=r"no split 'validation'; its splits are 'train', 'test'"):
        load_problems(spec(path, split="validation"))


def test_ids_fall_back_to_the_row_index(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"problem": "p0", "answer": "1"}, {"problem": "p1", "answer": "2"}])
    assert [p.id for p in load_problems(spec(path))] == ["0", "1"]


# ------------------------------------------------------------------------------------ golds


@pytest.mark.parametrize(
    ("answer", "solution", "gold"),
    [
        ("42", "so \\boxed{7}", "42"),  # the answer column wins
        ("", "so \\boxed{7}", "7"),
        ("   ", "so \\boxed{7}", "7"),
        (None, "so \\boxed{7}", "7"),
        (27.0, None, "27"),  # AMC23 upstream stores integers as floats
        (0.5, None, "0.5"),
        (3, None, "3"),
        (float("nan"), "\\boxed{1}", "1"),  # pandas' missing value
        (True, "\\boxed{1}", "1"),
        (None, "no box", None),
        (None, None, None),
        (["5"], None, None),
    ],
)
def test_gold_answer(answer, solution, gold):
    assert gold_answer(answer, solution) == gold


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{x^{2}} and a cut-off \\boxed{4", "x^{2}"),
        ("\\boxed {5}", "5"),
        ("\\boxed{3} \\boxed{}", "3"),
        ("no box at all", None),
    ],
)
def test_last_boxed_matches_braces(text, boxed):
    assert last_boxed(text) == boxed


def test_no_row_with_a_gold_is_an_error_naming_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "bare.jsonl", [{"problem": "p", "solution": "no box"}] * 3)
    with pytest.raises(DatasetError) as error:
        load_problems(spec(path))
    message = str(error.value)
    assert str(path) in message and "none of its 3 rows" in message
    assert "'answer'" in message and "'solution'" in message and "its columns are 'problem', 'solution'" in message


def test_missing_problem_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"no problem column 'problem'; its columns are 'question', 'answer'"):
        load_problems(spec(path))
    assert load_problems(spec(path, problem_column="question")) == [Problem("0", "q", "1")]


def test_rows_without_a_question_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"problem": "", "answer": "1"}, {"problem": None, "answer": "1"}, {"problem": "ok", "answer": "1"}]
    with caplog.at_level(logging.WARNING, logger="grpo_trainer.data"):
        problems = load_problems(spec(write_jsonl(tmp_path / "rows.jsonl", rows)))
    assert [p.question for p in problems] == ["ok"]
    assert "skipped 2 of 3 rows with an empty 'problem'" in caplog.text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, r"missing.jsonl does not exist"),
        ("rows.csv", "problem,answer\n", r"rows.csv is not a .jsonl, .json, .parquet file"),
        ("broken.jsonl", '{"problem": "p", "answer": "1"}\n{oops\n', r"line 2 is not JSON"),
        ("object.json", '{"problem": "p"}', r"expected a JSON list of objects"),
        ("bad.parquet", "not parquet", r"cannot read .*bad.parquet"),
    ],
)
def test_unreadable_files_are_clear_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_problems(spec(tmp_path / name))


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(DatasetError, match=r"builtin://nope: no such built-in task; there are 'builtin://arithmetic'"):
        load_problems(spec("builtin://nope"))


def test_hub_dataset_unreachable_names_the_id(tmp_path):
    # In a fresh process: the offline switch is read when huggingface_hub is imported.
    code = (
        "from grpo_trainer.data import load_problems\n"
        "from grpo_trainer.spec import DatasetSpec\n"
        "load_problems(DatasetSpec(source='knoveleng/open-rs', split='train'))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("grpo_trainer.data.DatasetError: cannot load hub dataset 'knoveleng/open-rs'")
    assert "hub may be unreachable" in error


# --------------------------------------------------------------------------------------- s3




def test_s3_file_and_saved_dataset_prefix(tmp_path, s3):
    s3.upload_file(str(_jsonl(tmp_path)), "grpo-data", "sets/rows.jsonl")
    for path in _saved_dataset(tmp_path).rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "grpo-data", f"saved/{path.relative_to(tmp_path / 'saved').as_posix()}")
    cache = tmp_path / "cache"
    assert load_problems(spec("s3://grpo-data/sets/rows.jsonl"), cache_dir=cache) == EXPECTED
    assert load_problems(spec("s3://grpo-data/saved"), cache_dir=cache) == EXPECTED
    with pytest.raises(DatasetError, match=r"s3://grpo-data/empty: no objects under this prefix"):
        load_problems(spec("s3://grpo-data/empty"), cache_dir=cache)


# --------------------------------------------------------------------------- built-in task


EXPRESSION = re.compile(r"(\d+) ([-+]) (\d+)")


def evaluate(expression: str) -> int:
    """A sum or difference of two integers, as the built-in task writes them."""
    match = EXPRESSION.fullmatch(expression)
    assert match, expression
    left, sign, right = match.groups()
    return int(left) + int(right) if sign == "+" else int(left) - int(right)


def test_arithmetic_is_a_fixed_dataset():
    rows = arithmetic_rows()
    assert len(rows) == ARITHMETIC_SIZE
    assert rows == arithmetic_rows()
    assert arithmetic_rows(10, seed=1) != arithmetic_rows(10)
    assert rows[0] == {
        "id": "arithmetic-00000",
        "problem": ANSWER_EXAMPLE + "What is 9 - 2?",
        "answer": "7",
        "level": 2,
        "expression": "9 - 2",
    }
    # Runs and resumed runs must see the same task: a change to it has to update this on purpose.
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "26ebeabaf3dae29eea2831dbeff3647b46128cf5899d474674f8dd69e1324f64"


def test_arithmetic_answers_are_exact_and_levels_graded():
    rows = arithmetic_rows()
    largest_operand = {1: 9, 2: 20, 3: 20}
    for row in rows:
        assert row["problem"].startswith(ANSWER_EXAMPLE), row
        question = row["problem"].removeprefix(ANSWER_EXAMPLE)
        # The expression is the question's own numbers, in the question's order.
        assert re.findall(r"\d+", question) == re.findall(r"\d+", row["expression"]), row
        assert row["answer"] == str(evaluate(row["expression"])), row
        assert int(row["answer"]) >= 0
        assert max(map(int, re.findall(r"\d+", row["expression"]))) <= largest_operand[row["level"]], row
        # Levels 1 and 2 ask the bare computation; level 3 tells it as a story.
        assert (question == f"What is {row['expression']}?") == (row["level"] < 3), row
    shares = Counter(row["level"] for row in rows)
    for level, share in {1: 0.60, 2: 0.25, 3: 0.15}.items():
        assert abs(shares[level] / len(rows) - share) < 0.02, shares
    assert {EXPRESSION.fullmatch(row["expression"]).group(2) for row in rows} == {"+", "-"}


def test_the_answer_example_shows_a_right_answer_the_grader_reads():
    question, answer = ANSWER_EXAMPLE.split("\nAnswer: ")
    expression = re.fullmatch(r"Example: What is (.+)\?", question).group(1)
    assert last_boxed(answer) == str(evaluate(expression))


def test_shuffle_and_max_samples():
    ordered = load_problems(spec("builtin://arithmetic"))
    assert [p.id for p in ordered[:3]] == ["arithmetic-00000", "arithmetic-00001", "arithmetic-00002"]
    shuffled = load_problems(spec("builtin://arithmetic", shuffle=True, seed=7))
    assert sorted(shuffled, key=lambda p: p.id) == ordered and shuffled != ordered
    assert load_problems(spec("builtin://arithmetic", shuffle=True, seed=7, max_samples=50)) == shuffled[:50]
    assert load_problems(spec("builtin://arithmetic", shuffle=True, seed=8, max_samples=50)) != shuffled[:50]


# ---------------------------------------------------------------------------- shared data


def test_gsm8k_test_set_loads_with_every_gold(shared_data):
    problems = load_problems(spec(shared_data / "gsm8k" / "test.jsonl"))
    assert len(problems) == 1319
    assert problems[0] == Problem(problems[0].id, problems[0].question, "18") and problems[0].id == "gsm8k-test-0"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)


def test_minerva_golds_from_solutions_match_the_derived_answers(shared_data):
    # Minerva's answer field is the brace-matched \boxed{} of each solution (data README); rebuild it.
    path = shared_data / "minerva" / "test.jsonl"
    derived = load_problems(spec(path, answer_column="no_such_column"))
    given = load_problems(spec(path))
    assert len(derived) == 272
    assert [p.answer for p in derived] == [p.answer for p in given]


# ---------------------------------------------------------------------------------- prompts

QUESTIONS = [Problem("short", "What is 2 + 3?", "5"), Problem("long", "Count the words. " + "word " * 200, "200")]


def test_prompts_follow_the_chat_template(tiny_tokenizer):
    [prompt] = build_prompts(QUESTIONS[:1], tiny_tokenizer, system_prompt="Box the answer.", max_prompt_length=512)
    assert prompt.messages == chat_messages("What is 2 + 3?", "Box the answer.")
    assert prompt.messages[0] == {"role": "system", "content": "Box the answer."}
    assert prompt.text == (
        "<|im_start|>system\nBox the answer.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.token_ids == tiny_tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(prompt.token_ids) == prompt.text


def test_an_empty_system_prompt_sends_no_system_message(tiny_tokenizer):
    [prompt] = build_prompts(QUESTIONS[:1], tiny_tokenizer, system_prompt="", max_prompt_length=512)
    assert prompt.messages == [{"role": "user", "content": "What is 2 + 3?"}]


def test_long_prompts_are_dropped_and_counted(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="grpo_trainer.data"):
        prompts = build_prompts(QUESTIONS, tiny_tokenizer, system_prompt="", max_prompt_length=100)
    assert [p.problem.id for p in prompts] == ["short"]
    assert all(len(p.token_ids) <= 100 for p in prompts)
    assert "dropped 1 of 2 prompts longer than maxPromptLength=100 tokens" in caplog.text
    with pytest.raises(DatasetError, match=r"all 2 prompts are longer than maxPromptLength=5 tokens"):
        build_prompts(QUESTIONS, tiny_tokenizer, system_prompt="", max_prompt_length=5)


def test_a_prompt_of_exactly_max_prompt_length_is_kept(tiny_tokenizer):
    [prompt] = build_prompts(QUESTIONS[:1], tiny_tokenizer, system_prompt="", max_prompt_length=512)
    length = len(prompt.token_ids)
    assert build_prompts(QUESTIONS[:1], tiny_tokenizer, system_prompt="", max_prompt_length=length) == [prompt]
    with pytest.raises(DatasetError):
        build_prompts(QUESTIONS[:1], tiny_tokenizer, system_prompt="", max_prompt_length=length - 1)


def test_a_tokenizer_without_chat_template_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ModelError, match=r"the tokenizer has no chat template"):
        build_prompts(QUESTIONS, tokenizer, system_prompt="", max_prompt_length=512)


def test_the_cpu_example_keeps_every_arithmetic_prompt(tiny_tokenizer):
    run = load_manifest(REPO / "examples" / "cpu-smollm2.yaml").spec
    problems = load_problems(run.dataset)
    prompts = build_prompts(
        problems, tiny_tokenizer, system_prompt=run.dataset.system_prompt, max_prompt_length=run.grpo.max_prompt_length
    )
    assert len(prompts) == len(problems) == run.dataset.max_samples

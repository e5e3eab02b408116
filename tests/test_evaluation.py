"""grpo eval: the paper's questions, lighteval's prompts, the backends, the scores and their intervals."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from grpo_trainer.benchmarks import BENCHMARKS, MATH_QUERY_TEMPLATE, hash_examples, load_benchmark
from grpo_trainer.cli import main
from grpo_trainer.data import DatasetError
from grpo_trainer.evaluation import (
    EvalSettings,
    Sample,
    TransformersBackend,
    pass_at_1,
    prompt_token_ids,
    run_evaluation,
    token_caps,
    wilson_interval,
)
from grpo_trainer.scores import parse_scores
from grpo_trainer.storage import open_storage
from grpo_trainer.termination import EXIT_INVALID, Outcome, TerminationMessage

PAPER_SETS = ("aime24", "math500", "amc23", "minerva", "olympiadbench")


# ------------------------------------------------------------------------------- the questions


@pytest.mark.parametrize("name", PAPER_SETS)
def test_we_ask_the_papers_questions(shared_data, name):
    """The formatted queries reproduce the hash_examples lighteval logged for Open-RS."""
    problems = load_benchmark(name, shared_data)
    assert hash_examples([p.query for p in problems]) == BENCHMARKS[name].logged_hash


def test_one_changed_character_changes_the_hash(shared_data):
    problems = load_benchmark("aime24", shared_data)
    queries = [p.query for p in problems]
    queries[7] = queries[7].replace(" ", "  ", 1)
    assert hash_examples(queries) != BENCHMARKS["aime24"].logged_hash


def test_golds_come_from_lightevals_columns(shared_data):
    assert "\\boxed" in load_benchmark("math500", shared_data)[0].gold  # the whole solution
    assert "\\boxed" in load_benchmark("minerva", shared_data)[0].gold
    assert load_benchmark("amc23", shared_data)[0].gold == "27"
    assert load_benchmark("gsm8k", shared_data, limit=3)[0].gold == "18"
    assert len(load_benchmark("olympiadbench", shared_data, limit=5)) == 5


def test_query_is_lightevals_template():
    assert MATH_QUERY_TEMPLATE.startswith("Solve the following math problem efficiently and clearly.  The last")
    assert MATH_QUERY_TEMPLATE.format(Question="What is 1+1?").endswith(
        "'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) where ANSWER is "
        "just the final number or expression that solves the problem. Think step by step before answering.\n\nWhat is 1+1?"
    )


def write_set(folder: Path, name: str, rows: list[dict]) -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_bad_sets_name_the_file_and_row(tmp_path):
    with pytest.raises(DatasetError, match=r"aime24/test.jsonl: no column 'answer'"):
        load_benchmark("aime24", write_set(tmp_path / "a", "aime24", [{"problem": "x"}]))
    with pytest.raises(DatasetError, match=r"aime24/test.jsonl: row 2 has no 'problem' text"):
        rows = [{"problem": "x", "answer": "1"}, {"problem": "", "answer": "2"}]
        load_benchmark("aime24", write_set(tmp_path / "b", "aime24", rows))
    with pytest.raises(DatasetError, match=r"test.jsonl does not exist"):
        load_benchmark("amc23", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"unknown benchmark 'aime25'"):
        load_benchmark("aime25", tmp_path)


# ----------------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(14 / 30, 30)  # 46.7 % on AIME24
    assert (round(low, 3), round(high, 3)) == (0.302, 0.639)
    assert wilson_interval(0.0, 30)[0] == 0.0 and 0.10 < wilson_interval(0.0, 30)[1] < 0.12
    assert wilson_interval(1.0, 30)[1] == pytest.approx(1.0) and wilson_interval(1.0, 30)[0] > 0.88
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_pass_at_1_is_the_mean_over_problems_of_each_problems_mean():
    rows = [
        {"id": "a", "correct": True}, {"id": "a", "correct": False}, {"id": "a", "correct": False}, {"id": "a", "correct": False},
        {"id": "b", "correct": True}, {"id": "b", "correct": True}, {"id": "b", "correct": True}, {"id": "b", "correct": True},
    ]
    assert pass_at_1(rows) == (pytest.approx(0.625), 2)


def test_completions_stop_at_the_model_length_as_in_the_papers_vllm_runs():
    settings = EvalSettings(max_new_tokens=32768, max_model_len=32768)
    assert token_caps([[1] * 120, [1] * 40000], settings) == [32768 - 120, 0]
    assert token_caps([[1] * 120], EvalSettings(max_new_tokens=512)) == [512]


# --------------------------------------------------------------------------------------- prompts


def test_prompt_is_the_chat_template_around_one_user_turn_tokenized_with_special_tokens(tmp_path, tiny_tokenizer):
    problems = load_benchmark("amc23", write_set(tmp_path, "amc23", [{"problem": "What is 2+2?", "answer": "4"}]))
    [ids] = prompt_token_ids(tiny_tokenizer, problems)
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": problems[0].query}], tokenize=False, add_generation_prompt=True
    )
    assert ids == tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert tiny_tokenizer.decode(ids).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")


# -------------------------------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_tokenizer):
    from grpo_trainer.model import ModelLocation, load_model

    return load_model(ModelLocation(source="tiny", path=str(tiny_model_dir)), tiny_tokenizer, device="cpu")


def test_transformers_backend_cuts_each_prompt_at_its_own_cap_and_is_reproducible(tiny, tiny_tokenizer):
    backend = TransformersBackend(tiny, tiny_tokenizer, prompts_per_batch=2)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    settings = EvalSettings(samples_per_problem=2, temperature=1.0, top_p=1.0, seed=3)
    advanced = []
    first = backend.generate(prompts, [7, 3, 0], settings, advanced.append)
    assert [len(samples) for samples in first] == [2, 2, 2]
    assert all(len(s.token_ids) <= 7 for s in first[0]) and all(len(s.token_ids) <= 3 for s in first[1])
    assert first[2] == [Sample([], truncated=True)] * 2  # no room: empty, counted as truncated
    assert all(s.truncated == (len(s.token_ids) == cap and tiny_tokenizer.eos_token_id not in s.token_ids)
               for samples, cap in zip(first[:2], (7, 3), strict=True) for s in samples)
    assert sum(advanced) == 4
    assert backend.sampler.prompts_per_batch == 2, "the batch size is the sampler's, not only the progress bar's"
    assert backend.generate(prompts, [7, 3, 0], settings, lambda n: None) == first


def install_fake_vllm(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for vllm's offline API (LLM, SamplingParams) that logs every engine's arguments
    and answers each prompt with tokens derived from it, so order and caps can be checked."""
    package = root / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(f"""
        import json, os
        from types import SimpleNamespace
        LOG = {str(root / "engines.jsonl")!r}

        class SamplingParams:
            def __init__(self, **fields):
                self.fields = fields

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                with open(LOG, "a") as log:
                    log.write(json.dumps({{"engine": kwargs, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")

            def generate(self, prompts, params, use_tqdm=True):
                outputs = []
                for prompt, p in zip(prompts, params):
                    with open(LOG, "a") as log:
                        log.write(json.dumps({{"params": p.fields}}) + "\\n")
                    ids = prompt["prompt_token_ids"]
                    tokens = [ids[0]] * min(p.fields["max_tokens"], 4)
                    reason = "length" if p.fields["max_tokens"] <= 4 else "stop"
                    sample = SimpleNamespace(token_ids=tokens, finish_reason=reason)
                    outputs.append(SimpleNamespace(outputs=[sample] * p.fields["n"]))
                return outputs
    """))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    return root / "engines.jsonl"


@pytest.mark.parametrize("gpus", [1, 2])
def test_vllm_backend_sends_every_sampling_field_and_keeps_prompt_order(tmp_path, monkeypatch, gpus):
    from grpo_trainer.eval_vllm import EngineConfig, VLLMBackend

    log = install_fake_vllm(tmp_path, monkeypatch)
    backend = VLLMBackend(EngineConfig(model="/models/m", revision=None), gpus=gpus)
    prompts = [[10 + i] * (i + 1) for i in range(5)]
    settings = EvalSettings(samples_per_problem=3, max_new_tokens=32768, max_model_len=32768, seed=7)
    caps = token_caps(prompts, settings)
    caps[2] = 3
    caps[4] = 0
    samples = backend.generate(prompts, caps, settings, lambda n: None)

    assert [s[0].token_ids[:1] for s in samples] == [[10], [11], [12], [13], []]
    assert [s[0].truncated for s in samples] == [False, False, True, False, True]
    assert all(len(s) == 3 for s in samples)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    engines = [e for e in entries if "engine" in e]
    assert len(engines) == gpus
    assert sorted(e["gpu"] for e in engines) == (["0", "1"] if gpus == 2 else [None])
    for engine in engines:
        assert engine["engine"] == {"model": "/models/m", "revision": None, "dtype": "bfloat16", "seed": 7,
                                    "max_model_len": 32768, "gpu_memory_utilization": 0.8}
    params = sorted((e["params"] for e in entries if "params" in e), key=lambda p: p["seed"])
    assert params == [
        {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
         "max_tokens": cap, "seed": 7 + index}
        for index, cap in enumerate(caps) if cap > 0
    ]


# ------------------------------------------------------------------------------------- end to end


def test_a_run_writes_rows_summaries_and_scores_last(tmp_path, storage, tiny_tokenizer, caplog, monkeypatch):
    """On a folder and on S3 alike; without a terminal, progress goes to the log."""
    from grpo_trainer import evaluation

    monkeypatch.setattr(evaluation._Advance, "LOG_EVERY_S", 0.0)
    data = write_set(tmp_path / "data", "amc23", [{"problem": f"What is {n}+{n}?", "answer": str(2 * n)} for n in range(3)])
    loaded = {"amc23": load_benchmark("amc23", data)}
    settings = EvalSettings(samples_per_problem=2, max_new_tokens=6)

    class Scripted:
        """Problem 0 (gold 0) right twice, problem 1 (gold 2) once, problem 2 (gold 4) never."""

        def generate(self, prompts, caps, settings, advance):
            texts = [["$\\boxed{0}$", "so $\\boxed{0}$"], ["$\\boxed{2}$", "$\\boxed{3}$"], ["$\\boxed{7}$", "no idea"]]
            advance(6)
            return [
                [Sample(tiny_tokenizer(t, add_special_tokens=False)["input_ids"], truncated=t == "$\\boxed{3}$") for t in row]
                for row in texts
            ]

    from rich.console import Console

    with caplog.at_level("INFO", logger="grpo_trainer.evaluation"):
        [result] = run_evaluation(
            "m", loaded, settings, storage, Scripted(), tiny_tokenizer, step=50, console=Console(quiet=True)
        )
    assert "amc23: 6 of 6 samples" in caplog.text
    assert [o.key for o in storage.list_objects()] == ["amc23.json", "amc23.jsonl", "scores.json"]
    rows = [json.loads(line) for line in storage.get_bytes("amc23.jsonl").decode().splitlines()]
    assert [(r["id"], r["sample"], r["correct"]) for r in rows] == [
        ("0", 0, True), ("0", 1, True), ("1", 0, True), ("1", 1, False), ("2", 0, False), ("2", 1, False)
    ]
    assert rows[2]["answer"] == "2" and rows[3]["truncated"]
    summary = json.loads(storage.get_bytes("amc23.json"))
    assert summary["score"] == pytest.approx(0.5) and (summary["n"], summary["k"], summary["truncated"]) == (3, 2, 1)
    assert summary["ciLow"] < 0.5 < summary["ciHigh"] and summary["model"] == "m"
    assert result.summary == {key: value for key, value in summary.items() if key != "model"}
    [score] = parse_scores(storage.get_bytes("scores.json"), "scores.json")
    assert (score.benchmark, score.checkpoint_step, score.score, score.n, score.samples_per_problem) == ("amc23", 50, 0.5, 3, 2)


@pytest.mark.slow
def test_grpo_eval_on_a_cpu_prints_scores_and_writes_the_termination_message(tmp_path, tiny_model_dir, capsys, monkeypatch):
    data = write_set(tmp_path / "data", "gsm8k", [{"problem": f"What is {n}+1?", "answer": str(n + 1)} for n in range(4)])
    termination = tmp_path / "termination-log"
    termination.touch()
    monkeypatch.setenv("GRPO_TERMINATION_LOG", str(termination))
    code = main(["eval", str(tiny_model_dir), "--benchmarks", "gsm8k", "--data-dir", str(data), "-k", "2",
                 "--max-new-tokens", "8", "--backend", "transformers", "-o", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().err
    assert "pass@1" in out and "gsm8k" in out and "4 × 2" in out
    message = TerminationMessage.parse(termination.read_text())
    assert message.outcome is Outcome.EVALUATED and message.step == 0
    assert message.scores[0]["benchmark"] == "gsm8k" and message.scores[0]["n"] == 4
    assert len((tmp_path / "out" / "gsm8k.jsonl").read_text().splitlines()) == 8


def test_bad_input_is_one_line_and_exit_2_before_any_generation(tmp_path, tiny_model_dir, capsys):
    data = write_set(tmp_path / "data", "amc23", [{"problem": "1+1?", "answer": "2"}])
    blocker = tmp_path / "file"
    blocker.write_text("")

    def run(*args):
        code = main(["eval", *args, "--backend", "transformers", "--data-dir", str(data)])
        return code, capsys.readouterr().err.strip().splitlines()

    code, lines = run(str(tmp_path / "no-model"), "--benchmarks", "amc23", "-o", str(blocker / "out"))
    assert code == EXIT_INVALID and len(lines) == 1 and str(blocker) in lines[0]  # the output is checked first
    code, lines = run(str(tmp_path / "no-model"), "--benchmarks", "amc23", "-o", str(tmp_path / "out"))
    assert code == EXIT_INVALID and len(lines) == 1 and "no-model" in lines[0] and "does not exist" in lines[0]
    code, lines = run(str(tiny_model_dir), "--benchmarks", "aime24", "-o", str(tmp_path / "out"))
    assert code == EXIT_INVALID and len(lines) == 1 and "aime24/test.jsonl" in lines[0]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tiny_model_dir), "--benchmarks", "aime24,aime25"])
    assert exit_.value.code == 2 and "unknown benchmark aime25" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_an_output_the_job_may_not_write_fails_before_the_model_loads(bucket, moto_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.reader.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.reader.secret_access_key)
    code = main(["eval", str(tmp_path / "no-model"), "--benchmarks", "gsm8k", "--backend", "transformers",
                 "-o", f"s3://{bucket}/run/evaluations/step-00000050", "--endpoint-url", moto_server.endpoint])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INVALID and len(lines) == 1, lines
    assert f"s3://{bucket}/run/evaluations/step-00000050" in lines[0] and "no-model" not in lines[0].split(":", 1)[1]


def test_the_boxed_gold_score_reads_the_answers_value_where_the_papers_compared_strings(tmp_path, tiny_tokenizer):
    """OlympiadBench's gold "7,14,18" extracts nothing, so lighteval compared it as a string."""
    from rich.console import Console

    data = write_set(tmp_path / "data", "olympiadbench", [{"problem": "Which three?", "answer": "7,14,18"}])

    class Spaced:
        def generate(self, prompts, caps, settings, advance):
            return [[Sample(tiny_tokenizer("So $\\boxed{7, 14, 18}$", add_special_tokens=False)["input_ids"], False)]]

    storage = open_storage(f"file://{tmp_path / 'out'}")
    loaded = {"olympiadbench": load_benchmark("olympiadbench", data)}
    [result] = run_evaluation("m", loaded, EvalSettings(), storage, Spaced(), tiny_tokenizer, step=0, console=Console(quiet=True))
    assert (result.summary["score"], result.summary["boxedGoldScore"]) == (0.0, 1.0)
    assert result.rows[0]["boxedGoldCorrect"] and not result.rows[0]["correct"]


def test_a_grader_that_cannot_start_is_one_line_and_a_retryable_exit(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from grpo_trainer import grading
    from grpo_trainer.termination import EXIT_RETRYABLE

    def no_workers(self, completions, golds):
        raise grading.GraderStartError("a grader worker could not start (exit code -9)")

    monkeypatch.setattr(grading.Grader, "verify_batch", no_workers)
    data = write_set(tmp_path / "data", "gsm8k", [{"problem": "1+1?", "answer": "2"}])
    code = main(["eval", str(tiny_model_dir), "--benchmarks", "gsm8k", "--data-dir", str(data), "--max-new-tokens", "2",
                 "--backend", "transformers", "-o", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "✗" in line or "Traceback" in line]
    assert code == EXIT_RETRYABLE and lines == [f"✗ grpo eval {tiny_model_dir}: a grader worker could not start (exit code -9)"]

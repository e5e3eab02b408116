"""Realistic completions built from the benchmark sets in ../shared/data, for the grading benchmarks.

Completions come in Open-RS's ``<think>…</think><answer>…</answer>`` shape unless their kind says
otherwise. The reasoning is the row's own worked solution with its boxes removed (so it reads like
a model's LaTeX-heavy working) or, where a set has no solution, a restatement of the problem. The
gold is the row's ``answer``. Two workloads, both seeded:

- :func:`build_samples`: every problem gets a few completions of distinct kinds;
- :func:`build_grpo_steps`: what a GRPO trainer grades, steps of prompts each with a group of
  completions (see there).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

BENCHMARK_SETS = ("aime24", "amc23", "math500", "minerva", "olympiadbench", "gsm8k")

KINDS = (
    "correct_boxed",  # the gold, boxed, in the Open-RS format
    "wrong_boxed",  # another answer, boxed
    "intermediate_boxed",  # a wrong value boxed mid-reasoning, the gold boxed at the end
    "latex_variant",  # the gold written differently: \dfrac, x = …, 27.0, \left( … \right)
    "answer_dollar",  # no box: "The answer is $…$."
    "answer_tag_plain",  # no box, no math delimiters: <answer>\n27\n</answer>
    "truncated",  # cut off mid-reasoning by the length limit: no answer at all
    "drift",  # reasoning drifts into Chinese, answer boxed
    "bare",  # no tags: a short reply ending in a boxed answer
)


@dataclass(frozen=True)
class Sample:
    benchmark: str
    row_id: str
    kind: str
    completion: str
    gold: str


def math_content(gold: str) -> str:
    """The gold as one would box it: OlympiadBench's ``$…$`` delimiters and trailing dot removed."""
    gold = gold.strip()
    match = re.fullmatch(r"\$(.*)\$\.?", gold, re.DOTALL)
    return match.group(1).strip() if match else gold


def load_rows(data_dir: Path, benchmark: str) -> list[dict]:
    path = data_dir / benchmark / "test.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _reasoning(row: dict) -> str:
    solution = row.get("solution") or f"We need to solve: {row['problem']}\nLet me work through it carefully."
    # \boxed{x} -> x, so that the only box in the completion is the one the kind puts there.
    return solution.replace("\\boxed", "").replace("\\fbox", "")


def _wrong(answer: str, others: list[str], rng: random.Random) -> str:
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + rng.choice([-2, -1, 1, 7, 10]))
    candidates = [other for other in others if math_content(other) != answer]
    return math_content(rng.choice(candidates))


def _variant(answer: str, rng: random.Random) -> str:
    if re.fullmatch(r"-?\d+", answer):
        return rng.choice([f"{answer}.0", f"x = {answer}", f"{{{answer}}}"])
    if "\\frac" in answer:
        return answer.replace("\\frac", "\\dfrac")
    if answer.startswith("(") and answer.endswith(")"):
        return f"\\left{answer[:-1]}\\right)"
    return f"{answer} "


def _think(reasoning: str, answer_section: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer_section}\n</answer>"


def _completion(kind: str, reasoning: str, answer: str, wrong: str, rng: random.Random) -> str:
    if kind == "correct_boxed":
        return _think(reasoning, f"The final answer is $\\boxed{{{answer}}}$.")
    if kind == "wrong_boxed":
        return _think(reasoning, f"The final answer is $\\boxed{{{wrong}}}$.")
    if kind == "intermediate_boxed":
        middle = len(reasoning) // 2
        reasoning = f"{reasoning[:middle]}\nSo far we have $\\boxed{{{wrong}}}$, but let me double check.\n{reasoning[middle:]}"
        return _think(reasoning, f"Therefore, the final answer is: $\\boxed{{{answer}}}$. I hope it is correct")
    if kind == "latex_variant":
        return _think(reasoning, f"\\[\\boxed{{{_variant(answer, rng)}}}\\]")
    if kind == "answer_dollar":
        return _think(reasoning, f"The answer is ${answer}$.")
    if kind == "answer_tag_plain":
        return _think(reasoning, answer)
    if kind == "truncated":
        return f"<think>\n{reasoning[: rng.randint(len(reasoning) // 3, max(len(reasoning) // 3, len(reasoning) - 1))]}"
    if kind == "drift":
        drifted = f"{reasoning[: len(reasoning) // 2]}\n所以我们得到这个结果，接下来验证一下答案是否正确。"
        return _think(drifted, f"答案是 $\\boxed{{{answer}}}$")
    if kind == "bare":
        return f"Let me think step by step.\nFirst, we set up the equations.\nFinally, $\\boxed{{{answer}}}$"
    raise ValueError(kind)


# Completions per problem. The sets whose golds Open-RS's reward can parse (LaTeX solutions,
# $…$ answers) get more, so that over 5,000 completions compare verdicts with it.
PER_ROW = {"aime24": 2, "amc23": 2, "gsm8k": 2, "math500": 5, "minerva": 5, "olympiadbench": 5}


def build_samples(data_dir: Path, per_row: dict[str, int] = PER_ROW, seed: int = 0) -> list[Sample]:
    """``per_row[set]`` completions of distinct kinds for every row of every benchmark set, seeded."""
    rng = random.Random(seed)
    samples = []
    for benchmark in BENCHMARK_SETS:
        rows = load_rows(data_dir, benchmark)
        golds = [row["answer"] for row in rows]
        for row in rows:
            answer = math_content(row["answer"])
            wrong = _wrong(answer, golds, rng)
            for kind in rng.sample(KINDS, per_row[benchmark]):
                completion = _completion(kind, _reasoning(row), answer, wrong, rng)
                samples.append(Sample(benchmark, row["id"], kind, completion, row["answer"]))
    return samples


def _resampled(reasoning: str, rng: random.Random, keep: float = 0.8) -> str:
    """Another sample of the same working: each sentence or line kept with probability ``keep``."""
    sentences = re.split(r"(?<=[.!?])\s+|\n+", reasoning)
    return "\n".join([sentence for sentence in sentences if rng.random() < keep] or sentences[:1])


def _with_check(completion: str, rng: random.Random) -> str:
    """The completion with a check of some arithmetic after its first line, as models write them."""
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    first, _, rest = completion.partition("\n")
    return f"{first}\nLet me check: ${a} \\times {b} = {a * b}$.\n{rest}"


def build_grpo_steps(
    data_dir: Path, group_size: int, steps: int, batch: int = 96, wrong_per_problem: int = 3, seed: int = 0
) -> list[Sample]:
    """The completions a GRPO trainer grades: ``steps`` steps of ``batch`` completions, in order.

    Each step draws ``batch // group_size`` prompts, without replacement over the run, from all the
    sets' problems shuffled together; each prompt's ``group_size`` completions are adjacent, as
    TRL's sampler orders them. Each completion's kind is drawn uniformly from :data:`KINDS`, with
    replacement. Its reasoning is a resample of the solution (each sentence kept with probability
    0.8), and a check of some random arithmetic follows its first line, so that no two
    completions are the same text. A problem's wrong answers come from ``wrong_per_problem`` drawn
    once for it (models repeat a few popular wrong answers); its right ones are the gold's. A
    group repeats answers, then, as far as the kinds' uniform draws make it.
    """
    if batch % group_size:
        raise ValueError(f"batch {batch} is not a multiple of group_size {group_size}")
    rng = random.Random(seed)
    problems = [(benchmark, row) for benchmark in BENCHMARK_SETS for row in load_rows(data_dir, benchmark)]
    prompts = steps * batch // group_size
    if prompts > len(problems):
        raise ValueError(f"{steps} steps need {prompts} prompts; the sets have {len(problems)} problems")
    golds = {benchmark: [row["answer"] for b, row in problems if b == benchmark] for benchmark in BENCHMARK_SETS}
    samples = []
    for benchmark, row in rng.sample(problems, prompts):
        answer = math_content(row["answer"])
        wrongs = [_wrong(answer, golds[benchmark], rng) for _ in range(wrong_per_problem)]
        for _ in range(group_size):
            kind = rng.choice(KINDS)
            reasoning = _resampled(_reasoning(row), rng)
            completion = _with_check(_completion(kind, reasoning, answer, rng.choice(wrongs), rng), rng)
            samples.append(Sample(benchmark, row["id"], kind, completion, row["answer"]))
    return samples

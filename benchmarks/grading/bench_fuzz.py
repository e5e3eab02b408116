"""Fuzz: adversarial completions through the grader; no item may outlast the bound.

    .venv/bin/python benchmarks/grading/bench_fuzz.py --count 10000 --timeout 1
    .venv/bin/python benchmarks/grading/bench_fuzz.py --count 40 --hazard-share 1 --timeout 5

Strings come from a seeded generator of hostile families, each graded against a real benchmark
gold: hazards that often need the whole bound (deep nesting, huge numbers, \\frac and \\sqrt
bombs, power towers, huge sums and factorials; ``--hazard-share`` of the items) and hostile text
that should not (Python code, regex-hostile anchors, random LaTeX token soup, random Unicode,
mangled real completions). Each hazard can hold a worker for the whole bound, so the 10,000-item
run uses a short bound and the worst case at the default bound (5 s) is measured on hazards
alone. Passes when every item got a verdict within ``timeout + slack`` seconds (the slack covers
killing and replacing a worker) and no Python in a completion ran (a sentinel file must not
appear).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from completions import BENCHMARK_SETS, load_rows  # noqa: E402

SENTINEL = Path("/tmp/grpo_fuzz_executed")
SLACK_S = 1.0
TOKENS = [
    "\\frac{", "}{", "}", "{", "^", "_", "\\sqrt{", "\\left(", "\\right)", "\\boxed{", "$", "$$", "\\\\", "&",
    "\\begin{pmatrix}", "\\end{pmatrix}", "\\sum_{i=1}^{n}", "\\int", "\\lim", "!", "=", "<", "\\leq", ",",
    "\\pi", "e", "x", "\\infty", "\\cup", "\\{", "\\}", "\\text{", "%", "\\%", "1", "9", "0.5", "-", "+",
    "\\cdot", "\\times", "(", ")", "[", "]", "|", "\\mathbb{R}", "\\log", "\\sin", "i", "answer", "final answer is",
]
PYTHON = [
    "__import__('os').system('touch {s}')",
    "exec(\"open('{s}','w')\")",
    "eval('__import__(\"os\").remove(\"/\")')",
    "(lambda: open('{s}','w'))()",
    "[c for c in ().__class__.__base__.__subclasses__()]",
    "import os; os.system('touch {s}')",
    "globals()['__builtins__']['exec']('open(\"{s}\",\"w\")')",
]


def family_generators(real: list[str]):
    """(hazards, hostile): families that often need the whole bound, and ones that should not."""
    def nested(rng):
        d = rng.choice([10, 1000, 10**4, 10**5])
        return "\\boxed{" + "{" * d + "1" + "}" * d + "}"

    def digits(rng):
        return f"\\boxed{{{rng.choice('123456789') * rng.choice([50, 5000, 10**5, 10**6])}}}"

    def frac_bomb(rng):
        d = rng.choice([10, 100, 1000, 5000])
        return "\\boxed{" + "\\frac{1}{" * d + "2" + "}" * d + "}"

    def sqrt_bomb(rng):
        d = rng.choice([10, 100, 1000])
        return "$\\boxed{" + "\\sqrt{" * d + "2" + "}" * d + "}$"

    def tower(rng):
        return "\\boxed{" + "^".join(str(rng.randint(2, 99)) for _ in range(rng.randint(2, 6))) + "}"

    def python(rng):
        code = rng.choice(PYTHON).replace("{s}", str(SENTINEL))
        wrappers = ["\\boxed{%s}", "The final answer is $%s$", "answer: %s", "```python\n%s\n```\n\\boxed{%s}"]
        return rng.choice(wrappers).replace("%s", code)

    def parens(rng):
        d = rng.choice([100, 10**4, 10**5])
        return "\\boxed{" + "(" * d + "1" + ")" * d + "}"

    def anchors(rng):
        unit = rng.choice(["answer: $", "final answer is ", "\\boxed{", "$\\boxed{1}", "Answer $1$ and ", "\\(", "\\["])
        return unit * rng.choice([10, 1000, 20000])

    def soup(rng):
        return "".join(rng.choice(TOKENS) for _ in range(rng.choice([5, 50, 500, 5000])))

    def boxed_soup(rng):
        return "The final answer is $\\boxed{" + soup(rng) + "}$"

    def unicode(rng):
        return "\\boxed{" + "".join(chr(rng.randint(1, 0x10FFFF)) for _ in range(rng.choice([10, 1000, 10000]))) + "}"

    def mangled(rng):
        text = list(rng.choice(real))
        for _ in range(rng.randint(1, 50)):
            position = rng.randrange(len(text) + 1)
            text.insert(position, rng.choice(TOKENS))
        return "".join(text)

    def huge(rng):
        return rng.choice(["\\boxed{(10^{100})!}", "\\boxed{\\sum_{i=1}^{10^{10}} i}", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
                           "\\boxed{\\prod_{k=1}^{10^{9}} k}", "\\boxed{\\lim_{n\\to\\infty} n!^{n!}}",
                           "\\boxed{\\begin{pmatrix}" + "&".join(["1"] * 300) + "\\\\" * 300 + "\\end{pmatrix}}"])

    hazards = {
        "nested_braces": nested, "digits": digits, "frac_bomb": frac_bomb, "sqrt_bomb": sqrt_bomb,
        "power_tower": tower, "parentheses": parens, "huge_values": huge,
    }
    hostile = {
        "python": python, "anchor_spam": anchors, "latex_soup": soup, "boxed_soup": boxed_soup,
        "unicode": unicode, "mangled_real": mangled,
    }
    return hazards, hostile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1].parent / "shared" / "data")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=5.0, help="the grader's bound per item (its default)")
    parser.add_argument(
        "--hazard-share", type=float, default=0.1,
        help="share of items from families that often take the whole bound (they set the run's length)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from grpo_trainer.grading import Grader

    rng = random.Random(args.seed)
    rows = [row for benchmark in BENCHMARK_SETS for row in load_rows(args.data, benchmark)]
    real = [
        f"<think>\n{row['solution'] or row['problem']}\n</think>\n<answer>\n$\\boxed{{{row['answer']}}}$\n</answer>"
        for row in rows[:500]
    ]
    hazards, hostile = family_generators(real)
    families = hazards | hostile
    names = [rng.choice(list(hazards if rng.random() < args.hazard_share else hostile)) for _ in range(args.count)]
    items = [(families[name](rng), rng.choice(rows)["answer"]) for name in names]
    SENTINEL.unlink(missing_ok=True)

    started = time.monotonic()
    verdicts = []
    with Grader(workers=args.workers, timeout_s=args.timeout) as grader:
        for start in range(0, len(items), args.batch):
            chunk = items[start : start + args.batch]
            verdicts += grader.verify_batch([c for c, _ in chunk], [g for _, g in chunk])
            print(f"{len(verdicts)}/{len(items)} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started

    per_family = collections.defaultdict(lambda: collections.Counter())
    slowest = collections.defaultdict(float)
    for name, verdict in zip(names, verdicts, strict=True):
        per_family[name][verdict.reason or ("correct" if verdict.correct else "wrong")] += 1
        slowest[name] = max(slowest[name], verdict.seconds)
    over_bound = [v for v in verdicts if v.seconds > args.timeout + SLACK_S]
    report = {
        "items": len(items),
        "timeout_s": args.timeout,
        "workers": args.workers,
        "elapsed_s": round(elapsed, 1),
        "verdicts_returned": len(verdicts),
        "over_bound_plus_slack": len(over_bound),
        "max_item_s": round(max(v.seconds for v in verdicts), 3),
        "python_executed": SENTINEL.exists(),
        "outcomes": dict(collections.Counter(v.reason or ("correct" if v.correct else "wrong") for v in verdicts)),
        "per_family": {name: dict(counts) for name, counts in sorted(per_family.items())},
        "max_item_s_per_family": {name: round(s, 3) for name, s in sorted(slowest.items())},
    }
    print(json.dumps(report, indent=2))
    if over_bound or len(verdicts) != len(items) or report["python_executed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

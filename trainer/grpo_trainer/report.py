"""`grpo report RUN_DIR`: the curves of a run (reward, accuracy, completion length, KL) as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [  # (metric, title); a metric the run did not log is left out
    ("reward", "reward (weighted sum)"),
    ("accuracy", "accuracy reward"),
    ("completions/mean_length", "completion length (tokens)"),
    ("kl", "KL to the reference"),
]


class ReportError(ValueError):
    """A run directory without readable metrics; the message names the file."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: no metrics here (grpo train writes metrics.jsonl into the run directory)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ReportError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    if not records:
        raise ReportError(f"{path}: empty, no step has finished yet")
    return records


def render(run_dir: Path, output: Path | None = None) -> Path:
    """Plot the run's curves to ``output`` (default RUN_DIR/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(key, title) for key, title in PANELS if any(key in record for record in records)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        points = [(record["step"], record[key]) for record in records if key in record]
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, linewidth=1, alpha=0.45, color="tab:blue")
        axis.plot(steps, _moving_average(values, max(1, len(values) // 10)), linewidth=2, color="tab:blue")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    output = output or run_dir / "curves.png"
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def _moving_average(values, window: int) -> list[float]:
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged

"""What a run reports: one JSON line per step, a progress bar on a terminal, sample completions,
and optionally TensorBoard scalars.

The JSON lines (metrics.jsonl in the run directory) are the record `grpo report` plots and the
operator reads progress from; the names follow TRL's where TRL has one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)

SAMPLE_EVERY = 10  # steps between logged sample completions


class StepTimer:
    """Wall-clock seconds per phase of one step: generate, score, train, and sync (the server's weights)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - began

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def step_record(
    step: int,
    *,
    rewards: torch.Tensor,
    per_function: dict[str, torch.Tensor],
    reward_failures: dict[str, int],
    completion_lengths: torch.Tensor,
    truncated: torch.Tensor,
    num_generations: int,
    loss_metrics: dict[str, float],
    learning_rate: float,
    timer: StepTimer,
    weight_version: str | None = None,
    stale_weights: bool = False,
    weight_sync: dict | None = None,
) -> dict:
    """The JSON record of one step, from the whole generation batch (every rank's completions).
    ``weight_version`` labels the weights that sampled it; ``stale_weights`` says they were not the
    policy's; ``weight_sync`` holds what the server's weight sync reported (sync/…, rollout/…)."""
    groups = rewards.view(-1, num_generations)
    seconds = timer.total
    record = {
        "step": step,
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        **{f"rewards/{name}/mean": values.float().mean().item() for name, values in per_function.items()},
        **{f"rewards/{name}/std": values.float().std().item() if len(values) > 1 else 0.0
           for name, values in per_function.items()},
        "frac_reward_zero_std": (groups.std(dim=1) < 1e-9).float().mean().item(),
        "completions/mean_length": completion_lengths.float().mean().item(),
        "completions/max_length": int(completion_lengths.max()),
        "completions/clipped_ratio": truncated.float().mean().item(),
        **loss_metrics,
        "learning_rate": learning_rate,
        "tokens_per_second": completion_lengths.sum().item() / seconds,
        "time/generate": timer.seconds.get("generate", 0.0),
        "time/score": timer.seconds.get("score", 0.0),
        "time/train": timer.seconds.get("train", 0.0),
        **({"time/sync": timer.seconds["sync"]} if "sync" in timer.seconds else {}),
        "time/step": seconds,
    }
    if "accuracy" in per_function:
        record["accuracy"] = record["rewards/accuracy/mean"]
    if reward_failures:
        record["reward_failures"] = reward_failures
    if weight_version is not None:
        record["rollout/weight_version"] = weight_version
        record["rollout/stale_weights"] = stale_weights
    record.update(weight_sync or {})
    return record


class MetricsLog:
    """Writes step records to ``path`` and shows progress; a no-op on every rank but the first.

    ``history`` holds the records of the steps already done (from a checkpoint): the file is
    rewritten to exactly those before new steps are appended, so a resumed run's stream has every
    step once, even when the previous attempt logged steps past its last checkpoint.
    """

    def __init__(
        self,
        path: Path,
        *,
        total_steps: int,
        enabled: bool,
        show_progress: bool,
        history: Sequence[dict] = (),
        tensorboard_dir: Path | None = None,
    ):
        self.enabled = enabled
        self.path = path
        self.records = list(history)
        if not enabled:
            return
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what an earlier attempt logged past its checkpoint.
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=len(self.records) + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")
        self.file.writelines(json.dumps(record) + "\n" for record in self.records)
        self.file.flush()
        self.console = Console(stderr=True, soft_wrap=True)
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("reward {task.fields[reward]:.3f}  len {task.fields[length]:.0f}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (show_progress and sys.stderr.isatty()),
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=len(self.records), reward=0.0, length=0.0)
        self.progress.start()

    def step(self, step: int, *, sample: tuple[str, str], **measurements) -> dict | None:
        if not self.enabled:
            return None
        record = step_record(step, **measurements)
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.progress.update(self.task, completed=step, reward=record["reward"], length=record["completions/mean_length"])
        if self.progress.disable:
            logger.info("step %d: reward %.3f, length %.0f", step, record["reward"], record["completions/mean_length"])
        if self.tensorboard is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.tensorboard.add_scalar(name, value, step)
        if step == 1 or step % SAMPLE_EVERY == 0:
            completion, gold = sample
            logger.info("step %d sample (gold %s):\n%s", step, gold, completion)
            if self.tensorboard is not None:
                self.tensorboard.add_text("sample", f"gold: {gold}\n\n{completion}", step)
        return record

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

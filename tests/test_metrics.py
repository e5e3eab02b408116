"""The step record's TensorBoard copy across a resume."""

from __future__ import annotations

import pytest
import torch

from grpo_trainer.metrics import MetricsLog, StepTimer


def _log_steps(log: MetricsLog, steps: range, reward: float) -> None:
    for step in steps:
        log.step(
            step,
            sample=("The answer is \\boxed{5}.", "5"),
            rewards=torch.full((4,), reward),
            per_function={"accuracy": torch.full((4,), reward)},
            reward_failures={},
            completion_lengths=torch.tensor([3, 4, 5, 6]),
            truncated=torch.tensor([False, False, True, False]),
            num_generations=2,
            loss_metrics={"kl": 0.0},
            learning_rate=1e-6,
            timer=StepTimer(),
        )


def test_a_resumed_run_replaces_the_tensorboard_steps_logged_past_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def open_log(history):
        return MetricsLog(tmp_path / "metrics.jsonl", total_steps=4, enabled=True, show_progress=False,
                          history=history, tensorboard_dir=tmp_path / "tb")

    first = open_log([])
    _log_steps(first, range(1, 4), reward=0.25)  # steps 1-3; say the checkpoint holds step 1 only
    checkpointed = first.records[:1]
    first.close()

    resumed = open_log(checkpointed)
    _log_steps(resumed, range(2, 5), reward=0.75)
    resumed.close()

    logged = [(event.step, event.value) for event in EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("reward")]
    assert logged == [(1, 0.25), (2, 0.75), (3, 0.75), (4, 0.75)]
    assert [r["reward"] for r in resumed.records] == [0.25, 0.75, 0.75, 0.75]
    assert resumed.records[-1]["rewards/accuracy/std"] == pytest.approx(0.0)

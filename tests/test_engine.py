"""The engine: the LR schedule, and DeepSpeed ZeRO-2 on 2 CPU processes (gloo) equal to plain torch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import ACCUMULATION, MICRO_STEPS, OPTIMIZER_STEPS, WORLD_SIZE, batch, grpo_spec, tiny_model

from grpo_trainer.engine import CPU_BUCKET_ELEMENTS, deepspeed_config, lr_scheduler, warmup_steps
from grpo_trainer.spec import GRPOSpec

TESTS = Path(__file__).resolve().parent


def test_cosine_with_min_lr_follows_its_formula():
    """Linear warmup to the peak, then cosine from the peak down to min_lr_rate × peak at max_steps."""
    grpo = GRPOSpec(max_steps=500, warmup_ratio=0.1, learning_rate=1e-6, min_lr_rate=0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=grpo.learning_rate)
    scheduler = lr_scheduler(optimizer, grpo)
    assert warmup_steps(grpo) == 50
    seen = []
    for _ in range(grpo.max_steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    for step in (0, 25, 50, 100, 275, 499):
        if step < 50:
            expected = 1e-6 * step / 50
        else:
            progress = (step - 50) / (500 - 50)
            expected = 1e-6 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert seen[step] == pytest.approx(expected, rel=1e-9, abs=1e-15), step


def test_deepspeed_config_follows_the_spec():
    grpo = GRPOSpec()
    config = deepspeed_config(grpo, on_gpu=True)
    assert config["train_micro_batch_size_per_gpu"] == 6 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == 2 and config["bf16"]["enabled"] is True
    assert deepspeed_config(grpo, on_gpu=False)["bf16"]["enabled"] is False
    # DeepSpeed's own buckets on GPUs; on CPU a 200 MB one, not a 2 GB buffer per micro-batch.
    assert "reduce_bucket_size" not in config["zero_optimization"]
    cpu = deepspeed_config(grpo, on_gpu=False)["zero_optimization"]
    assert cpu["reduce_bucket_size"] == cpu["allgather_bucket_size"] == CPU_BUCKET_ELEMENTS == 50_000_000
    # One CPU process: no ZeRO partitioning (and none of its copies); one GPU still gets the spec's stage.
    assert deepspeed_config(grpo, on_gpu=False, world_size=1)["zero_optimization"]["stage"] == 0
    assert deepspeed_config(grpo, on_gpu=True, world_size=1)["zero_optimization"]["stage"] == 2


def _reference_training(world_size: int):
    """What the engine over ``world_size`` ranks must compute: the mean gradient over ranks and micro-batches,
    clipped by global norm, then AdamW and the scheduler, all in one process with plain torch."""
    grpo = grpo_spec()
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=grpo.learning_rate, weight_decay=grpo.weight_decay)
    scheduler = lr_scheduler(optimizer, grpo)
    learning_rates = []
    for step in range(OPTIMIZER_STEPS):
        optimizer.zero_grad()
        for micro_step in range(step * ACCUMULATION, (step + 1) * ACCUMULATION):
            for rank in range(world_size):
                input_ids = batch(rank, micro_step)
                (model(input_ids=input_ids, labels=input_ids).loss / (ACCUMULATION * world_size)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grpo.max_grad_norm)
        optimizer.step()
        scheduler.step()
        learning_rates.append(scheduler.get_last_lr()[0])
    return dict(model.named_parameters()), learning_rates


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [WORLD_SIZE, 1], ids=["ZeRO-2 on 2 processes", "stage 0 on 1 process"])
def test_the_engine_on_cpu_processes_equals_single_process_adamw(tmp_path, world_size):
    output = tmp_path / "rank0.pt"
    # The checkout's trainer, not whichever the environment installed (an editable install of another tree).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "trainer")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_port", str(29533 + world_size), str(TESTS / "engine_worker.py"), str(output)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = torch.load(output)
    assert trained["global_steps"] == OPTIMIZER_STEPS == MICRO_STEPS // ACCUMULATION
    assert trained["zero_stage"] == (2 if world_size > 1 else 0)
    assert trained["backward_allreduce"] == (world_size > 1), "one process has no gradient to all-reduce"
    reference, learning_rates = _reference_training(world_size)
    assert trained["lr"] == pytest.approx(learning_rates, rel=1e-9)
    initial = dict(tiny_model().named_parameters())
    for name, parameter in reference.items():
        assert not torch.allclose(parameter, initial[name]), f"{name} did not train"
        torch.testing.assert_close(trained["params"][name], parameter.detach(), atol=2e-5, rtol=1e-4, msg=name)

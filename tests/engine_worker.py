"""Run by torchrun from test_engine.py: train a tiny model with build_engine on this rank's shard."""

import sys

import torch
from engine_fixtures import MICRO_STEPS, batch, grpo_spec, tiny_model

from grpo_trainer.engine import build_engine, init_distributed

init_distributed()
rank = torch.distributed.get_rank()
engine = build_engine(tiny_model(), grpo_spec())
learning_rates = []
for micro_step in range(MICRO_STEPS):
    input_ids = batch(rank, micro_step)
    engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
    steps_before = engine.global_steps
    engine.step()
    if engine.global_steps > steps_before:  # an optimizer step (and a scheduler step) happened
        learning_rates.append(engine.get_lr()[0])
if rank == 0:
    state = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    torch.save({"params": state, "global_steps": engine.global_steps, "lr": learning_rates,
                "zero_stage": engine.zero_optimization_stage(),
                "backward_allreduce": engine.enable_backward_allreduce}, sys.argv[1])

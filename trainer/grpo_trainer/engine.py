"""The optimisation engine: DeepSpeed ZeRO (stage 2 or 3) around AdamW and the spec's LR schedule.

The same code runs on GPUs with NCCL and on CPUs with gloo (tests, laptops). One engine step is one
micro-batch; DeepSpeed accumulates gradients and steps the optimizer and the scheduler every
``gradient_accumulation_steps`` micro-batches, so a "step" in the spec is an optimizer step, as in TRL.
"""

from __future__ import annotations

import math
import os
import socket
from typing import TYPE_CHECKING, Any

import torch

from grpo_trainer.spec import GRPOSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CPU_BUCKET_ELEMENTS = 50_000_000
"""ZeRO's gradient bucket on CPU (200 MB in float32). DeepSpeed's default, 5e8 elements, is a 2 GB
buffer allocated afresh every micro-batch, filled with the whole model's gradients before it is
flushed: on a laptop that is resident memory the run cannot spare, and a smaller bucket only
flushes more often."""


def deepspeed_config(grpo: GRPOSpec, *, on_gpu: bool, world_size: int = 2) -> dict[str, Any]:
    # One CPU process has nothing to partition: ZeRO would only add a flat float32 copy of the weights
    # and a flat gradient buffer (1 GiB for 135 M parameters), which is what keeps a laptop run above
    # 4 GB (benchmarks/README.md). Stage 0 steps torch's AdamW on the model's own weights and grads.
    stage = 0 if world_size == 1 and not on_gpu else grpo.zero_stage
    zero = {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if not on_gpu:
        zero.update(reduce_bucket_size=CPU_BUCKET_ELEMENTS, allgather_bucket_size=CPU_BUCKET_ELEMENTS)
    return {
        "train_micro_batch_size_per_gpu": grpo.per_device_batch_size,
        "gradient_accumulation_steps": grpo.gradient_accumulation_steps,
        "gradient_clipping": grpo.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": grpo.bf16 and on_gpu},
        # torch's AdamW: the same optimizer on CPU and GPU; DeepSpeed only shards its state.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def warmup_steps(grpo: GRPOSpec) -> int:
    """As transformers' TrainingArguments counts them: ceil(warmup_ratio × max_steps)."""
    return math.ceil(grpo.warmup_ratio * grpo.max_steps)


def lr_scheduler(optimizer: torch.optim.Optimizer, grpo: GRPOSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """The spec's schedule over max_steps optimizer steps, from transformers' own implementations."""
    from transformers import get_scheduler

    extra = {"min_lr_rate": grpo.min_lr_rate} if grpo.lr_scheduler == "cosine_with_min_lr" else {}
    scheduler = get_scheduler(
        grpo.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(grpo),
        num_training_steps=grpo.max_steps,
        scheduler_specific_kwargs=extra,
    )
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)  # every schedule the spec allows is one
    return scheduler


def build_engine(model: PreTrainedModel, grpo: GRPOSpec):
    """Wrap ``model`` in a DeepSpeed engine; torch.distributed must be initialised (see init_distributed)."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    if grpo.gradient_checkpointing:
        # Non-reentrant: the prompt's keys and values reach a layer through its cache, not as arguments
        # (grpo_trainer.shared_prompts), and only the non-reentrant checkpoint carries their gradient.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # fused: one kernel for the whole update instead of a dozen per parameter tensor (CPU and CUDA).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=grpo.learning_rate,
        weight_decay=grpo.weight_decay,
        fused=True,
    )
    world_size = torch.distributed.get_world_size()
    config = deepspeed_config(grpo, on_gpu=on_gpu, world_size=world_size)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # DeepSpeed annotates torch's deprecated _LRScheduler, and takes any LRScheduler
        lr_scheduler=lr_scheduler(optimizer, grpo),  # pyright: ignore[reportArgumentType]
        config=config,
    )
    if world_size == 1 and config["zero_optimization"]["stage"] == 0:
        # A group of one has nothing to average, yet stage 0 would flatten every gradient into one
        # buffer after each backward, all-reduce it alone and copy it back: 1.7 s a step for SmolLM2
        # on one core (benchmarks/README.md), a sixth of the training phase.
        engine.enable_backward_allreduce = False
    return engine


def init_distributed() -> None:
    """Join the process group set up by torchrun or the deepspeed launcher (a group of one otherwise)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # not under a launcher: a group of one, on a port of its own
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _free_port() -> int:
    """A TCP port nothing listens on now, so two single-process runs on one machine do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

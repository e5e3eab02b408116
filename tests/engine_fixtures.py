"""What test_engine.py and its torchrun worker share: the model, the data and the spec."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_trainer.spec import GRPOSpec

WORLD_SIZE, ACCUMULATION, OPTIMIZER_STEPS = 2, 2, 3
MICRO_STEPS = ACCUMULATION * OPTIMIZER_STEPS


def grpo_spec() -> GRPOSpec:
    return GRPOSpec(preset="custom", per_device_batch_size=2, gradient_accumulation_steps=ACCUMULATION,
                    learning_rate=1e-2, max_steps=OPTIMIZER_STEPS, warmup_ratio=0.34, max_grad_norm=0.5,
                    weight_decay=0.01, gradient_checkpointing=True, bf16=False, zero_stage=2)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def batch(rank: int, micro_step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + micro_step)
    return torch.randint(0, 64, (2, 12), generator=generator)

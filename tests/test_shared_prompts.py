"""The shared-prompt forward gives the log-probs, entropies, loss and gradients of one forward per
row (the plain path), in float64, with and without gradient checkpointing, through the training phase.

Not bit for bit: Llama's RMSNorm computes in float32 whatever the weights' dtype, so summing a
prompt's gradient over its rows before the norm's backward (shared) or after it (plain) differs in
float32's last places (about 1e-8 relative here; 1e-13 with the norm patched to float64)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import grpo_trainer.shared_prompts
from grpo_trainer.rollout import Rollouts
from grpo_trainer.spec import GRPOSpec
from grpo_trainer.train import _completion_logps, _optimize, _padded_batch

TOLERANCE = 1e-5
"""Of the largest difference relative to the largest value, per tensor."""


def assert_relatively_close(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape
    difference, scale = float((got - want).abs().max()), float(want.abs().max())
    assert difference <= TOLERANCE * scale, f"{difference:.3g} off at a scale of {scale:.3g}"


def tiny_llama(gradient_checkpointing: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).double().train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def groups(prompt_lengths, completion_lengths, num_generations: int, seed: int = 1) -> Rollouts:
    """Rows as the sampler orders them: each prompt's completions next to each other."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in prompt_lengths]
    completions = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in completion_lengths]
    rows = [prompt for prompt in prompts for _ in range(num_generations)]
    assert len(rows) == len(completions)
    return Rollouts(rows, completions, None, [False] * len(rows))


@contextmanager
def plain_path() -> Iterator[None]:
    """Every model taken for one the shared caches cannot serve: the plain path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_trainer.shared_prompts, "shares_prompts", lambda causal_lm: False)
        yield


def forwarded_rows(model) -> list[int]:
    """A list that gets the number of rows of each forward of ``model`` (a hook left in place)."""
    rows: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    return rows


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_shared_prompt_log_probs_and_gradients_equal_the_plain_paths(gradient_checkpointing):
    """Prompts of 3, 6 and 2 tokens (left padding) × 3 completions of 1 to 7 tokens (right padding)."""
    model = tiny_llama(gradient_checkpointing)
    rollouts = groups((3, 6, 2), (5, 2, 7, 1, 4, 6, 3, 3, 2), num_generations=3)
    batch = _padded_batch(rollouts, 0, torch.device("cpu"))
    upstream = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = forwarded_rows(model)

    def logps_entropy_gradients():
        logps, entropy = _completion_logps(model, batch, 0.7)
        return logps, entropy, torch.autograd.grad((logps * upstream).sum(), list(model.parameters()))

    shared = logps_entropy_gradients()
    assert rows == [3, 9]  # one forward of the 3 distinct prompts, one of the 9 rows after them
    with plain_path():
        plain = logps_entropy_gradients()
    assert rows[2:] == [9]
    assert_relatively_close(shared[0], plain[0])
    assert_relatively_close(shared[1], plain[1])
    for got, want in zip(shared[2], plain[2], strict=True):
        assert_relatively_close(got, want)


class Engine(torch.nn.Module):
    """What _optimize asks of DeepSpeed's engine at stage 0 (one CPU process), without optimizer steps:
    the gradients of all micro-batches add up in the parameters' .grad. So the prompts' pass runs on
    aliases of the weights (grpo_trainer.shared_prompts)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)

    def zero_optimization_stage(self) -> int:
        return 0

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


@pytest.fixture
def process_group(tmp_path):
    """_optimize's collectives in a group of one."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_the_training_phase_gives_the_plain_paths_loss_and_gradients(gradient_checkpointing, process_group):
    """β > 0 (the reference model's forward shares prompts too) and micro-batches of 4 rows of groups
    of 3, so two of the four prompts have completions in two micro-batches: [A A A B] [B B C C] [C D D D]."""
    policy = tiny_llama(gradient_checkpointing)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for parameter in reference.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    rollouts = groups((4, 7, 2, 5), (3, 6, 1, 5, 2, 4, 7, 3, 2, 6, 5, 1), num_generations=3)
    grpo = GRPOSpec(preset="custom", num_generations=3, per_device_batch_size=4, gradient_accumulation_steps=3,
                    beta=0.04, max_completion_length=7, temperature=0.7, bf16=False,
                    gradient_checkpointing=gradient_checkpointing)
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    rows = forwarded_rows(policy), forwarded_rows(reference)

    def loss_and_gradients():
        policy.zero_grad()
        metrics = _optimize(Engine(policy), reference, rollouts, advantages, grpo, 0, torch.device("cpu"))
        return metrics, [parameter.grad.clone() for parameter in policy.parameters()]

    shared_metrics, shared_gradients = loss_and_gradients()
    assert rows == ([2, 4, 2, 4, 2, 4], [4, 12])  # each micro-batch's prompts once; the reference's whole batch
    with plain_path():
        plain_metrics, plain_gradients = loss_and_gradients()
    assert shared_metrics.keys() == plain_metrics.keys() and shared_metrics["kl"] > 0
    for name, value in shared_metrics.items():
        assert value == pytest.approx(plain_metrics[name], rel=TOLERANCE), name
    for got, want in zip(shared_gradients, plain_gradients, strict=True):
        assert_relatively_close(got, want)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_each_pass_adds_its_gradients_into_the_parameters_as_they_arrive(gradient_checkpointing):
    """Under a stage-0 engine no weight's gradient from one pass waits in autograd for another's: when
    the prompts' pass (the last) adds a layer's, its parameter already holds the completions' pass's.
    The gradients are a bare model's, of one forward per row (a checkpointed layer's recomputation
    reads the weights themselves, which the aliases share)."""
    model = tiny_llama(gradient_checkpointing)
    batch = _padded_batch(groups((3, 6), (5, 2, 7, 1, 4, 6), num_generations=3), 0, torch.device("cpu"))
    weight = model.model.layers[0].mlp.down_proj.weight
    held_before_the_prompts: list[torch.Tensor] = []
    add = torch.Tensor.add_

    def recording_add(tensor, other, *args, **kwargs):
        if tensor is weight.grad:
            held_before_the_prompts.append(tensor.clone())
        return add(tensor, other, *args, **kwargs)

    logps, _ = _completion_logps(Engine(model), batch, 0.7)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "add_", recording_add)
        logps.sum().backward()
    assert len(held_before_the_prompts) == 1 and held_before_the_prompts[0].abs().sum() > 0
    bare = tiny_llama(gradient_checkpointing)
    with plain_path():
        plain, _ = _completion_logps(bare, batch, 0.7)
    plain.sum().backward()
    for got, want in zip(model.parameters(), bare.parameters(), strict=True):
        assert got.grad is not None and want.grad is not None
        assert_relatively_close(got.grad, want.grad)


def test_a_model_with_sliding_window_layers_takes_the_plain_path():
    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=4))
    assert not grpo_trainer.shared_prompts.shares_prompts(sliding)
    assert grpo_trainer.shared_prompts.shares_prompts(tiny_llama(False))

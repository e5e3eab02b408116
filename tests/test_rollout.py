"""In-process rollouts on a tiny random model: grouping, EOS handling, seeding and the log-probs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_trainer.rollout import TransformersSampler, sample_token

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _sample(model, seed=1, prompts=([5, 6, 7], [9, 10]), **overrides):
    sampler = TransformersSampler(model, eos_token_ids=[EOS], pad_token_id=PAD, prompts_per_batch=1)
    args = dict(num_generations=3, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=seed) | overrides
    return sampler.generate([list(p) for p in prompts], **args)


def test_groups_are_contiguous_and_completions_end_at_the_first_eos(model):
    rollouts = _sample(model)
    assert len(rollouts) == 6
    assert rollouts.prompt_ids == [[5, 6, 7]] * 3 + [[9, 10]] * 3
    for ids, logprobs, truncated in zip(rollouts.completion_ids, rollouts.sampler_logprobs, rollouts.truncated, strict=True):
        assert len(ids) == len(logprobs) and 1 <= len(ids) <= 12
        assert EOS not in ids[:-1]
        assert truncated == (ids[-1] != EOS)
        assert truncated or len(ids) <= 12


def test_same_seed_same_completions_and_global_rng_untouched(model):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, second = _sample(model, seed=7), _sample(model, seed=7)
    assert torch.equal(before, torch.random.get_rng_state())
    assert first.completion_ids == second.completion_ids
    assert _sample(model, seed=8).completion_ids != first.completion_ids


@pytest.mark.parametrize("temperature, prompts_per_batch", [(0.7, 1), (1.3, 1), (1.0, 2)])
def test_sampler_logprobs_equal_the_trainers_recomputation(model, temperature, prompts_per_batch):
    """The log-probs a trainer computes with a forward pass over prompt + completion, at the same
    temperature and without padding, must equal what the sampler reported: that is what importance
    sampling assumes. Two prompts of different lengths in one batch check the left padding."""
    sampler = TransformersSampler(model, eos_token_ids=[EOS], pad_token_id=PAD, prompts_per_batch=prompts_per_batch)
    rollouts = sampler.generate([[5, 6, 7, 8, 9], [9, 10]], num_generations=2, max_new_tokens=8,
                                temperature=temperature, top_p=1.0, seed=3)
    for prompt, completion, reported in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.sampler_logprobs, strict=True):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        recomputed = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(recomputed, torch.tensor(reported), atol=1e-4, rtol=1e-4)


def test_sample_token_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    draws = 40_000
    generator = torch.Generator().manual_seed(0)
    tokens = sample_token(probs.log().expand(draws, -1), 1.0, generator)
    frequencies = torch.bincount(tokens, minlength=len(probs)).float() / draws
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)
    assert frequencies[-1] == 0  # a token of probability 0 is never drawn


def test_sample_token_keeps_to_the_top_p_nucleus():
    """The fewest most likely tokens whose probability reaches top_p: 0.5 + 0.25 ≥ 0.7 keeps two."""
    probs = torch.tensor([0.1, 0.25, 0.15, 0.5])
    generator = torch.Generator().manual_seed(0)
    tokens = sample_token(probs.log().expand(10_000, -1), 0.7, generator)
    assert set(tokens.tolist()) == {1, 3}
    assert sample_token(probs.log()[None], 0.3, generator).item() == 3  # the most likely alone


def test_temperature_zero_is_greedy_whatever_the_seed(model):
    greedy = _sample(model, seed=1, temperature=0.0)
    assert greedy.completion_ids == _sample(model, seed=2, temperature=0.0).completion_ids
    prompt = torch.tensor([[5, 6, 7]])
    first = model(prompt).logits[0, -1].argmax().item()
    assert greedy.completion_ids[0][0] == first
    most_likely = torch.log_softmax(model(prompt).logits[0, -1], -1).max().item()
    assert greedy.sampler_logprobs[0][0] == pytest.approx(most_likely, abs=1e-5)

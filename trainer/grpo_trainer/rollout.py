"""Rollouts: sample a group of completions per prompt, as token ids with the sampler's log-probs.

One interface, two implementations: in-process transformers generation here (CPU and local runs),
and the vLLM sidecar client (GPU runs). The trainer sees only :class:`Rollouts`.

The sampler's log-prob of a token is log softmax(logits / temperature) at that position, the same
quantity the trainer computes, so the importance-sampling correction compares like with like. top-p
changes which tokens can be drawn, not the log-probs reported (vLLM's convention too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass
class Rollouts:
    """Completions grouped by prompt: rows g·n … g·n + n − 1 belong to prompt g."""

    prompt_ids: list[list[int]]  # one per completion (the group's prompt, repeated)
    completion_ids: list[list[int]]  # up to and including the first EOS; no padding
    sampler_logprobs: list[list[float]] | None  # per completion token; None if the sampler gives none
    truncated: list[bool]  # stopped by max_new_tokens before an EOS

    def __len__(self) -> int:
        return len(self.completion_ids)


class Sampler(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> Rollouts: ...


class TransformersSampler:
    """Generation with the policy itself, in this process: batched, n samples per prompt, seeded."""

    def __init__(self, model, *, eos_token_ids: Sequence[int], pad_token_id: int, prompts_per_batch: int = 8):
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.prompts_per_batch = prompts_per_batch

    @torch.no_grad()
    def generate(self, prompts, *, num_generations, max_new_tokens, temperature, top_p, seed) -> Rollouts:
        rollouts = Rollouts([], [], [], [])
        was_training = self.model.training
        self.model.eval()
        # A private RNG stream: the same seed gives the same completions, and the trainer's global
        # RNG (dropout, data order) is left exactly as it was, which exact resume relies on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.prompts_per_batch):
                batch = [list(prompt) for prompt in prompts[start : start + self.prompts_per_batch]]
                self._generate_batch(batch, num_generations, max_new_tokens, temperature, top_p, rollouts)
        self.model.train(was_training)
        return rollouts

    def _generate_batch(self, prompts, num_generations, max_new_tokens, temperature, top_p, rollouts) -> None:
        width = max(map(len, prompts))
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_generations,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        generated = output.sequences[:, width:]
        logits = torch.stack(output.logits, dim=1).float() / temperature  # (rows, new tokens, vocab)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        is_eos = torch.isin(generated, torch.tensor(self.eos_token_ids, device=generated.device))
        for row in range(generated.shape[0]):
            eos_positions = is_eos[row].nonzero()
            length = int(eos_positions[0]) + 1 if len(eos_positions) else generated.shape[1]
            rollouts.prompt_ids.append(prompts[row // num_generations])
            rollouts.completion_ids.append(generated[row, :length].tolist())
            rollouts.sampler_logprobs.append(logprobs[row, :length].tolist())
            rollouts.truncated.append(not len(eos_positions))

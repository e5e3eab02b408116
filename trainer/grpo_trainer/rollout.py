"""Rollouts: sample a group of completions per prompt, as token ids with the sampler's log-probs.

One interface, two implementations: in-process generation with the policy itself here (CPU and
local runs), and the vLLM sidecar client (GPU runs). The trainer sees only :class:`Rollouts`.

The sampler's log-prob of a token is log softmax(logits / temperature) at that position, the same
quantity the trainer computes, so the importance-sampling correction compares like with like. top-p
changes which tokens can be drawn, not the log-probs reported here. (vLLM's processed_logprobs, which
the sidecar reports, do renormalise over the nucleus: see docs/vllm-sidecar.md.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache


@dataclass
class Rollouts:
    """Completions grouped by prompt: rows g·n … g·n + n − 1 belong to prompt g."""

    prompt_ids: list[list[int]]  # one per completion (the group's prompt, repeated)
    completion_ids: list[list[int]]  # up to and including the first EOS; no padding
    sampler_logprobs: list[list[float]] | None  # per completion token; None if the sampler gives none
    truncated: list[bool]  # stopped by max_new_tokens before an EOS
    # The labels of the server weights that sampled them (vLLM's weight versions), in first-seen
    # order; None when the policy itself sampled them, which is current by construction.
    weight_versions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    def add(self, prompt_ids: list[int], completion_ids: list[int], logprobs: list[float], truncated: bool) -> None:
        """Append one sampled completion with its sampler's log-probs."""
        assert self.sampler_logprobs is not None, "these rollouts were made without the sampler's log-probs"
        self.prompt_ids.append(prompt_ids)
        self.completion_ids.append(completion_ids)
        self.sampler_logprobs.append(logprobs)
        self.truncated.append(truncated)


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
    """Generation with the policy itself, in this process: batched, n samples per prompt, seeded.

    A decoding loop of its own rather than ``model.generate``, for three reasons, each measured on
    CPU (benchmarks/trainer): each prompt is run through the model once and its KV cache shared by
    its n completions (generate runs it n times); a token is drawn by inverting the CDF with one
    uniform per row (torch.multinomial draws one exponential per vocabulary entry, 10 ms a step at
    a 49k vocabulary, as long as the model's forward); and the log-probs are taken step by step,
    where generate's ``output_logits`` keeps every step's logits, rows × tokens × vocabulary floats.
    """

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
        device = next(self.model.parameters()).device
        # A private RNG stream: the same seed gives the same completions, and the trainer's global
        # RNG (dropout, data order) is left exactly as it was, which exact resume relies on.
        generator = torch.Generator(device).manual_seed(seed)
        for start in range(0, len(prompts), self.prompts_per_batch):
            batch = [list(prompt) for prompt in prompts[start : start + self.prompts_per_batch]]
            tokens, logprobs = self._sample(batch, num_generations, max_new_tokens, temperature, top_p, generator)
            self._collect(batch, num_generations, tokens, logprobs, rollouts)
        self.model.train(was_training)
        return rollouts

    def _sample(self, prompts, num_generations, max_new_tokens, temperature, top_p, generator):
        """``num_generations`` completions of each prompt as [rows, T] token ids and log-probs,
        rows grouped by prompt; after a row's EOS come pad tokens."""
        device = generator.device
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        # Left padding shifts nothing: each row's positions count its own tokens from 0.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        # The prompt's cache, copied to each of its completions.
        cache.batch_repeat_interleave(num_generations)
        logits = logits.repeat_interleave(num_generations, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_generations, dim=0)
        position = positions[:, -1:].repeat_interleave(num_generations, dim=0)

        rows = logits.shape[0]
        eos_ids = torch.tensor(self.eos_token_ids, device=device, dtype=torch.long)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            # Temperature 0 is greedy decoding (evaluations); its log-probs are the plain softmax's.
            log_probs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
            token = log_probs.argmax(-1) if temperature == 0 else sample_token(log_probs, top_p, generator)
            token = token.masked_fill(finished, self.pad_token_id)
            tokens.append(token)
            logprobs.append(log_probs.gather(-1, token[:, None]).squeeze(-1))
            finished |= torch.isin(token, eos_ids)
            if finished.all():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=-1)
            position = position + 1
            logits = self.model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)

    def _collect(self, prompts, num_generations, tokens, logprobs, rollouts: Rollouts) -> None:
        """Cut each row after its first EOS and append it to ``rollouts``."""
        is_eos = torch.isin(tokens, torch.tensor(self.eos_token_ids, device=tokens.device, dtype=torch.long))
        for row, (ids, logps) in enumerate(zip(tokens.tolist(), logprobs.tolist(), strict=True)):
            eos_positions = is_eos[row].nonzero()
            length = int(eos_positions[0]) + 1 if len(eos_positions) else len(ids)
            rollouts.add(prompts[row // num_generations], ids[:length], logps[:length], truncated=not len(eos_positions))


def sample_token(log_probs: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``log_probs`` [rows, vocab], drawn from the distribution cut to its
    top-p nucleus (the fewest most likely tokens whose probability reaches ``top_p``; 1.0 keeps all).

    Draws by inverting the CDF, accumulated in float64, with one uniform per row."""
    probs = log_probs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token stays if the more likely ones before it hold less than top_p: the first always does.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1, dtype=torch.float64)
    draw = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device, generator=generator)
    # The first token whose cumulative probability exceeds the draw; tokens of probability 0 never are.
    return torch.searchsorted(cdf, draw * cdf[:, -1:], right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)

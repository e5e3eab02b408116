"""The GRPO loss, one pure function per piece, composed by :func:`grpo_loss`.

A generation batch is P prompts × G completions (G = ``num_generations``), sampled once and then
optimised on in micro-batches of B completions, right-padded to T tokens. Per micro-batch:

    logps          [B, T]  log π_θ(o_t | q, o_<t) of each sampled token under the policy being trained
    old_logps      [B, T]  the same under π_old, the policy that sampled the batch (no grad)
    ref_logps      [B, T]  the same under the frozen reference π_ref (no grad; only when β > 0)
    sampler_logps  [B, T]  the same as the sampler (vLLM) reported it; its numerics differ from ours
    completion_mask[B, T]  1 on the completion tokens that count in the loss
    advantages     [B]     one per completion, shared by all its tokens

and the loss per token, DeepSeekMath's GRPO with DAPO's clip-higher:

    ρ_t = π_θ / π_old = exp(logps_t − old_logps_t)
    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε_high)·A) · w_t + β·KL_t

where w_t is the importance-sampling weight against the sampler (1 without correction) and KL_t the
k3 estimate of KL(π_θ ‖ π_ref). The ℓ_t are then averaged over tokens in the way ``loss_type`` says.

Every function matches TRL 1.16's GRPOTrainer on identical inputs (tests/test_loss_trl_equivalence.py
drives TRL's own code); docs/grpo-math.md has the equations in one place and the differences.
Trainer-side only: this imports torch, never trl.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSampling = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

ADVANTAGE_EPS = 1e-4
"""Added to the reward std so that a group whose rewards are all equal gets advantages 0, not 0/0."""


def group_advantages(rewards: Tensor, num_generations: int, scale: ScaleRewards) -> Tensor:
    """Each completion's advantage: its reward relative to the other completions of its prompt.

    ``rewards`` [N] is the whole generation batch, gathered from every rank, in groups of
    ``num_generations`` consecutive completions of the same prompt. With g(i) the group of i:

        A_i = (r_i − mean_{g(i)} r) / (std_{g(i)} r + 1e-4)   scale = "group"  (GRPO, Open-RS)
        A_i = (r_i − mean_{g(i)} r) / (std_batch r + 1e-4)    scale = "batch"  (still the group's mean)
        A_i =  r_i − mean_{g(i)} r                            scale = "none"   (Dr. GRPO)

    std is Bessel-corrected (divides by n − 1). Rewards must be finite. Returns [N]; each rank keeps
    the slice of its own completions.
    """
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True)
    elif scale == "batch":
        std = rewards.std()
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return (centred / (std + ADVANTAGE_EPS)).flatten()


def mask_truncated_completions(completion_mask: Tensor, is_truncated: Tensor) -> Tensor:
    """DAPO's overlong filtering: drop from the loss every completion cut off at max_completion_length.

        m_it ← m_it · 1[completion i ended with EOS]

    ``is_truncated`` [B] is True where the sampler stopped for length (the last token is not EOS).
    Apply it once to the generation batch, before counting ``num_items_in_batch``: a truncated
    completion then counts nowhere, neither in the loss nor in its normaliser.
    """
    return completion_mask * ~is_truncated.unsqueeze(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(π_θ ‖ π_ref), Schulman's k3 estimator (unbiased, never negative):

        KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref_logps − logps) − (ref_logps − logps) − 1
    """
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def importance_sampling_weights(
    trainer_logps: Tensor,
    sampler_logps: Tensor,
    completion_mask: Tensor,
    mode: ImportanceSampling,
    cap: float,
) -> Tensor:
    """Weights w that correct for sampling from vLLM's π_sampler while the loss assumes π_old.

    The sampler and the trainer compute the same policy with different kernels and precision, so
    the batch comes from π_sampler ≠ π_old. Reweighting each token by w = π_old / π_sampler makes
    the estimate unbiased; capping w bounds its variance (TIS: truncate; MIS: mask):

        token level:     w_t = exp(old_t − sampler_t)                        [B, T]
        sequence level:  w   = exp(Σ_t m_t (old_t − sampler_t))              [B, 1]
        truncate:        w ← min(w, cap)
        mask:            w ← w · 1[w ≤ cap]

    ``trainer_logps`` are π_old's: the trainer's log-probs of the batch before any update on it.
    Padding and tokens the sampler could not score (NaN) get w = 1. The weights carry no gradient.
    """
    log_ratio = torch.nan_to_num((trainer_logps - sampler_logps).detach() * completion_mask, nan=0.0)
    level, _, action = mode.partition("_")
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True)
    weights = torch.exp(log_ratio)
    if action == "truncate":
        return weights.clamp(max=cap)
    if action == "mask":
        return weights.masked_fill(weights > cap, 0.0)
    raise ValueError(f"unknown importance_sampling {mode!r}")


def clipped_surrogate(ratio: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float) -> Tensor:
    """PPO's clipped objective per token, negated to be minimised, with DAPO's clip-higher:

        ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε_high)·A)

    ``ratio`` ρ [B, T] is π_θ / π_old, ``advantages`` [B]. Once ρ leaves the trust region on the side
    the advantage pushes it, the token's gradient is zero; ε_high > ε leaves more room to raise the
    probability of unlikely tokens, which keeps exploration alive.
    """
    advantages = advantages.unsqueeze(-1)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped_ratio * advantages)


def aggregate_loss(
    per_token_loss: Tensor,
    completion_mask: Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int,
    gradient_accumulation_steps: int,
    num_items_in_batch: float | Tensor | None,
    num_processes: int,
) -> Tensor:
    """Reduce the per-token losses ℓ [B, T] of one micro-batch to the scalar to backpropagate.

    With m the mask, K = gradient_accumulation_steps micro-batches summed into one update and the
    update's gradients averaged over R = num_processes ranks (DDP / DeepSpeed do both):

        grpo:    L = 1/K · 1/B · Σ_i (Σ_t m_it ℓ_it / max(1, Σ_t m_it))   sequence mean, then batch mean
        bnpo:    L = 1/K · Σ_it m_it ℓ_it / max(1, Σ_it m_it)             token mean of the micro-batch
        dr_grpo: L = 1/K · Σ_it m_it ℓ_it / (B · max_completion_length)   constant normaliser
        dapo:    L = Σ_it m_it ℓ_it / (max(1, N) / R)                      token mean of the whole batch

    For dapo, N = ``num_items_in_batch`` is the number of active tokens (Σ m) in the whole generation
    batch, summed over all ranks, which is one update's K micro-batches per rank. After the sum over
    micro-batches and the mean over ranks, every token of the update then weighs exactly 1/N.
    grpo / bnpo weigh long completions less (grpo) or depend on the micro-batch split (bnpo).
    A fully masked completion contributes 0 (and still counts in grpo's B and dr_grpo's B).
    """
    masked_loss = per_token_loss * completion_mask
    if loss_type == "grpo":
        tokens_per_completion = completion_mask.sum(dim=-1).clamp(min=1)
        return (masked_loss.sum(dim=-1) / tokens_per_completion).mean() / gradient_accumulation_steps
    if loss_type == "bnpo":
        return masked_loss.sum() / completion_mask.sum().clamp(min=1) / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        return masked_loss.sum() / (per_token_loss.size(0) * max_completion_length) / gradient_accumulation_steps
    if loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("loss_type dapo needs num_items_in_batch: active tokens of the generation batch")
        tokens = torch.as_tensor(num_items_in_batch, dtype=masked_loss.dtype, device=masked_loss.device)
        return masked_loss.sum() / (tokens.clamp(min=1) / num_processes)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(
    logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    *,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    sampler_logps: Tensor | None = None,
    loss_type: LossType,
    beta: float,
    epsilon: float,
    epsilon_high: float,
    importance_sampling: ImportanceSampling = "none",
    importance_sampling_cap: float = 2.0,
    max_completion_length: int,
    gradient_accumulation_steps: int,
    num_items_in_batch: float | Tensor | None = None,
    num_processes: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of one micro-batch, and detached metrics about it.

        ρ_t = exp(logps_t − old_logps_t)
        ℓ_t = clipped_surrogate(ρ_t, A) · w_t + β · k3_kl_t
        L   = aggregate_loss(ℓ, m)                      (see aggregate_loss for each loss_type)

    ``old_logps`` is None when each batch gets one update (num_iterations = 1): the policy that
    sampled is the one being optimised, so π_old = sg(π_θ), ρ = 1 and only its gradient is used.
    With num_iterations > 1 the caller computes old_logps once per generation batch, under no_grad,
    before the first update, and reuses them for all its updates. ``ref_logps`` is needed only when
    beta > 0, ``sampler_logps`` only when importance_sampling is not "none". ``completion_mask`` has
    mask_truncated_completions already applied, and ``num_items_in_batch`` (dapo only) counts the
    tokens of that mask over the whole generation batch and every rank.

    Metrics, means over the micro-batch's active tokens (TRL's names): kl; clip_ratio/low_mean,
    high_mean, region_mean, the share of tokens whose gradient the clip cut off (ρ below 1 − ε with
    A < 0, above 1 + ε_high with A > 0, either); policy_ratio/mean; and with importance sampling
    sampling/importance_sampling_ratio/min, mean, max (over active tokens, or over completions at
    sequence level).
    """
    completion_mask = completion_mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)
    per_token_loss = clipped_surrogate(ratio, advantages, epsilon, epsilon_high)

    metrics: dict[str, Tensor] = {}
    if importance_sampling != "none":
        if sampler_logps is None:
            raise ValueError(f"importance_sampling {importance_sampling!r} needs the sampler's log-probs")
        weights = importance_sampling_weights(
            old_logps, sampler_logps, completion_mask, importance_sampling, importance_sampling_cap
        )
        per_token_loss = per_token_loss * weights
        metrics.update(_importance_sampling_metrics(weights, completion_mask, importance_sampling))
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        kl = k3_kl(logps, ref_logps)
        per_token_loss = per_token_loss + beta * kl
        metrics["kl"] = _masked_mean(kl, completion_mask)

    loss = aggregate_loss(
        per_token_loss,
        completion_mask,
        loss_type,
        max_completion_length=max_completion_length,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_items_in_batch=num_items_in_batch,
        num_processes=num_processes,
    )
    metrics.update(_clip_metrics(ratio, advantages, completion_mask, epsilon, epsilon_high))
    return loss, metrics


# ------------------------------------------------------------------------------------- metrics


def _masked_mean(values: Tensor, completion_mask: Tensor) -> Tensor:
    values = values.detach()
    return (values * completion_mask).sum() / completion_mask.sum().clamp(min=1)


def _clip_metrics(
    ratio: Tensor, advantages: Tensor, completion_mask: Tensor, epsilon: float, epsilon_high: float
) -> dict[str, Tensor]:
    advantages = advantages.unsqueeze(-1)
    clipped_low = (ratio < 1 - epsilon) & (advantages < 0)
    clipped_high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {
        "clip_ratio/low_mean": _masked_mean(clipped_low.to(ratio.dtype), completion_mask),
        "clip_ratio/high_mean": _masked_mean(clipped_high.to(ratio.dtype), completion_mask),
        "clip_ratio/region_mean": _masked_mean((clipped_low | clipped_high).to(ratio.dtype), completion_mask),
        "policy_ratio/mean": _masked_mean(ratio, completion_mask),
    }


def _importance_sampling_metrics(
    weights: Tensor, completion_mask: Tensor, mode: ImportanceSampling
) -> dict[str, Tensor]:
    # Token weights are summarised over active tokens, sequence weights over every completion.
    active = weights.flatten() if mode.startswith("sequence") else weights[completion_mask.bool()]
    if active.numel() == 0:
        active = weights.new_full((1,), float("nan"))
    return {
        "sampling/importance_sampling_ratio/min": active.min(),
        "sampling/importance_sampling_ratio/mean": active.mean(),
        "sampling/importance_sampling_ratio/max": active.max(),
    }

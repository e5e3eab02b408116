"""grpo_trainer.loss on cases small enough to work out by hand (TRL equivalence: test_loss_trl_equivalence.py)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from grpo_trainer.loss import (
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    importance_sampling_weights,
    k3_kl,
    mask_truncated_completions,
)

F64 = torch.float64


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------------------------- advantages


def test_group_advantages_of_a_pair():
    # mean 0.5; Bessel std = sqrt((0.5² + 0.5²) / 1) = sqrt(0.5)
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(group_advantages(tensor([1.0, 0.0]), 2, "group"), tensor([expected, -expected]))
    torch.testing.assert_close(group_advantages(tensor([1.0, 0.0]), 2, "none"), tensor([0.5, -0.5]))


def test_group_advantages_batch_scale_keeps_the_group_mean():
    # group means 0.5 and 1 → centred [0.5, -0.5, 0, 0]; batch mean 0.75, Bessel variance 0.75 / 3 → std 0.5
    advantages = group_advantages(tensor([1.0, 0.0, 1.0, 1.0]), 2, "batch")
    torch.testing.assert_close(advantages, tensor([0.5, -0.5, 0.0, 0.0]) / (0.5 + 1e-4))


def test_a_group_with_equal_rewards_has_no_advantage():
    advantages = group_advantages(tensor([0.3, 0.3, 0.3, 1.0, 0.0, 0.5]), 3, "group")
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]


# -------------------------------------------------------------------------------------- pieces


def test_mask_truncated_completions_zeroes_whole_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert mask_truncated_completions(mask, torch.tensor([False, True])).tolist() == [[1, 1, 0], [0, 0, 0]]


def test_k3_kl():
    # π_ref / π_θ = 0.25 / 0.5 = 0.5 → 0.5 − log 0.5 − 1
    kl = k3_kl(tensor([math.log(0.5), math.log(0.3)]), tensor([math.log(0.25), math.log(0.3)]))
    torch.testing.assert_close(kl, tensor([0.5 - math.log(0.5) - 1, 0.0]))


def test_clipped_surrogate_and_where_its_gradient_stops():
    # one completion of one token per case: (ratio, advantage) → loss, d loss / d ratio; ε 0.2, ε_high 0.28
    cases = [
        (1.5, 1.0, -1.28, 0.0),  # raised past 1 + ε_high with A > 0: clipped
        (1.25, 1.0, -1.25, -1.0),  # inside the higher bound: not clipped
        (0.5, 1.0, -0.5, -1.0),  # lowered with A > 0: the unclipped term is the smaller, it stays
        (0.5, -1.0, 0.8, 0.0),  # lowered past 1 − ε with A < 0: clipped
        (1.5, -1.0, 1.5, 1.0),  # raised with A < 0: never clipped
    ]
    ratio, advantages, expected_loss, expected_grad = (tensor(column) for column in zip(*cases, strict=True))
    ratio = ratio.unsqueeze(1).requires_grad_()
    loss = clipped_surrogate(ratio, advantages, epsilon=0.2, epsilon_high=0.28)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach().squeeze(1), expected_loss)
    torch.testing.assert_close(ratio.grad.squeeze(1), expected_grad)


def test_importance_sampling_weights():
    trainer_logps = tensor([[-1.0, -1.0, -1.0]])
    sampler_logps = tensor([[-1.5, -0.5, 0.0]])  # the third token is padding
    mask = tensor([[1.0, 1.0, 0.0]])
    up, down = math.exp(0.5), math.exp(-0.5)  # π_old / π_sampler per token
    expected = {
        "token_truncate": [[1.5, down, 1.0]],
        "token_mask": [[0.0, down, 1.0]],
        "sequence_truncate": [[1.0]],  # exp(0.5 − 0.5): the two tokens cancel
        "sequence_mask": [[1.0]],
    }
    for mode, weights in expected.items():
        computed = importance_sampling_weights(trainer_logps, sampler_logps, mask, mode, cap=1.5)
        torch.testing.assert_close(computed, tensor(weights))
    # one token left: the sequence weight is that token's, e^0.5 > 1.5
    first_only = tensor([[1.0, 0.0, 0.0]])
    assert importance_sampling_weights(trainer_logps, sampler_logps, first_only, "sequence_truncate", 1.5).item() == 1.5
    assert importance_sampling_weights(trainer_logps, sampler_logps, first_only, "sequence_mask", 1.5).item() == 0.0
    assert importance_sampling_weights(trainer_logps, sampler_logps, first_only, "sequence_mask", 2.0).item() == up


def test_a_token_the_sampler_could_not_score_is_not_corrected():
    trainer_logps, sampler_logps = tensor([[-1.0, -1.0]]), tensor([[float("nan"), -0.5]])
    weights = importance_sampling_weights(trainer_logps, sampler_logps, torch.ones(1, 2), "sequence_truncate", 2.0)
    torch.testing.assert_close(weights, tensor([[math.exp(-0.5)]]))


# --------------------------------------------------------------------------------- aggregation

# Two completions: ℓ = [1, 2, 3] over 3 tokens and [4] over 1 token.
PER_TOKEN_LOSS = tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (6 / 3 + 4 / 1) / 2),  # mean of the completions' token means
        ("bnpo", 10 / 4),  # token mean
        ("dr_grpo", 10 / (2 * 5)),  # B · max_completion_length
        ("dapo", 10 / (20 / 2)),  # N / R: 20 tokens over 2 ranks
    ],
)
@pytest.mark.parametrize("gradient_accumulation_steps", [1, 4])
def test_aggregate_loss(loss_type, expected, gradient_accumulation_steps):
    loss = aggregate_loss(
        PER_TOKEN_LOSS,
        MASK,
        loss_type,
        max_completion_length=5,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_items_in_batch=20,
        num_processes=2,
    )
    # dapo's N already spans the accumulated micro-batches; the others average over them
    accumulated = 1 if loss_type == "dapo" else gradient_accumulation_steps
    assert loss.item() == pytest.approx(expected / accumulated)


def test_a_fully_masked_completion_adds_nothing():
    mask = tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    kwargs = dict(max_completion_length=5, gradient_accumulation_steps=1, num_items_in_batch=3, num_processes=1)
    assert aggregate_loss(PER_TOKEN_LOSS, mask, "grpo", **kwargs).item() == pytest.approx(2 / 2)  # still one of B = 2
    assert aggregate_loss(PER_TOKEN_LOSS, mask, "bnpo", **kwargs).item() == pytest.approx(2)
    assert aggregate_loss(PER_TOKEN_LOSS, torch.zeros_like(mask), "bnpo", **kwargs).item() == 0


def test_dapo_weighs_every_token_of_the_batch_alike_however_it_is_split():
    g = torch.Generator().manual_seed(0)
    per_token_loss = torch.randn(6, 4, generator=g, dtype=F64)
    mask = (torch.rand(6, 4, generator=g) < 0.6).to(F64)
    n = mask.sum()

    def total(loss_type: str, micro_batches: int) -> float:
        return sum(
            aggregate_loss(
                per_token_loss[rows],
                mask[rows],
                loss_type,
                max_completion_length=4,
                gradient_accumulation_steps=micro_batches,
                num_items_in_batch=n,
                num_processes=1,
            ).item()
            for rows in torch.arange(6).chunk(micro_batches)
        )

    token_mean = (per_token_loss * mask).sum().item() / n.item()
    assert total("dapo", 1) == pytest.approx(token_mean)
    assert total("dapo", 3) == pytest.approx(token_mean)
    assert total("bnpo", 1) != pytest.approx(total("bnpo", 3))  # bnpo depends on the split


# ------------------------------------------------------------------------------------ the loss


def test_grpo_loss_of_two_completions_worked_by_hand():
    """On-policy (ρ = 1), completions of 2 and 1 tokens with A = ±1, β = 0.1, bnpo over the 3 tokens.

    ℓ_t = −A·ρ_t + β·KL_t, so d ℓ_t / d logp_t = −A + β·(1 − π_ref/π_θ), each divided by 3 tokens.
    """
    logps = tensor([[math.log(0.5), math.log(0.2)], [math.log(0.4), 0.0]]).requires_grad_()
    ref_logps = tensor([[math.log(0.25), math.log(0.2)], [math.log(0.8), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = tensor([1.0, -1.0])
    loss, metrics = grpo_loss(
        logps,
        mask,
        advantages,
        ref_logps=ref_logps,
        loss_type="bnpo",
        beta=0.1,
        epsilon=0.2,
        epsilon_high=0.2,
        max_completion_length=2,
        gradient_accumulation_steps=1,
    )
    loss.backward()

    ref_over_policy = [0.5, 1.0, 2.0]  # the three active tokens
    kl = [r - math.log(r) - 1 for r in ref_over_policy]
    per_token = [-1 + 0.1 * kl[0], -1 + 0.1 * kl[1], 1 + 0.1 * kl[2]]
    assert loss.item() == pytest.approx(sum(per_token) / 3)
    grads = [(-a + 0.1 * (1 - r)) / 3 for a, r in zip([1, 1, -1], ref_over_policy, strict=True)]
    torch.testing.assert_close(logps.grad, tensor([[grads[0], grads[1]], [grads[2], 0.0]]))
    assert metrics["kl"].item() == pytest.approx(sum(kl) / 3)
    assert metrics["policy_ratio/mean"].item() == 1
    assert metrics["clip_ratio/region_mean"].item() == 0


def test_grpo_loss_clip_metrics_and_importance_weights():
    # one completion, A = +1; ratios 1.5 (clipped high), 1.0, 0.5 (not clipped: A > 0)
    logps = tensor([[math.log(1.5), 0.0, math.log(0.5)]])
    old_logps = torch.zeros(1, 3, dtype=F64)
    sampler_logps = tensor([[-1.0, 0.0, 0.0]])  # π_old / π_sampler = e on the first token, 1 elsewhere
    loss, metrics = grpo_loss(
        logps,
        torch.ones(1, 3),
        tensor([1.0]),
        old_logps=old_logps,
        sampler_logps=sampler_logps,
        loss_type="grpo",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.2,
        importance_sampling="token_truncate",
        importance_sampling_cap=2.0,
        max_completion_length=3,
        gradient_accumulation_steps=1,
    )
    assert loss.item() == pytest.approx(-(1.2 * 2.0 + 1.0 + 0.5) / 3)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/low_mean"].item() == 0
    assert metrics["policy_ratio/mean"].item() == pytest.approx(1.0)
    assert metrics["sampling/importance_sampling_ratio/max"].item() == 2.0
    assert metrics["sampling/importance_sampling_ratio/min"].item() == 1.0
    assert "kl" not in metrics


@pytest.mark.parametrize(
    "missing, message",
    [
        (dict(loss_type="dapo"), "num_items_in_batch"),
        (dict(beta=0.04), "reference"),
        (dict(importance_sampling="token_mask"), "sampler"),
    ],
)
def test_grpo_loss_refuses_what_it_cannot_compute(missing, message):
    kwargs = dict(loss_type="bnpo", beta=0.0, epsilon=0.2, epsilon_high=0.2)
    kwargs |= dict(max_completion_length=2, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match=message):
        grpo_loss(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1), **(kwargs | missing))


def test_the_loss_module_does_not_import_trl():
    code = "import sys, grpo_trainer.loss; sys.exit('trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

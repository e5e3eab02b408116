"""Our GRPO math (grpo_trainer.loss) equals TRL's, with TRL's own code computing the reference.

How TRL is driven. A ``GRPOTrainer`` is made with ``object.__new__`` (no model, dataset or
``__init__``) and given the attributes its methods read, copied from a real ``GRPOConfig`` the way
``__init__`` copies them, with a one-process stand-in for the accelerator. Then, in float64:

- ``_generate_and_score_completions`` runs unmodified once the sampler (``_generate``) and the reward
  functions (``_calculate_rewards``) are replaced by stand-ins that return chosen completions,
  sampler log-probs and rewards. TRL's code thus computes the advantages (scale_rewards),
  mask_truncated_completions, num_items_in_batch, the old and reference log-probs, and the
  importance-sampling ratio against the sampler.
- ``_compute_loss`` runs unmodified on each micro-batch (cut by TRL's ``split_tensor_dict``); the
  losses are summed as gradient accumulation does and backpropagated.

The models are ``LogProbTable``s: TRL's ``_get_per_token_logps_and_entropies`` (also unmodified)
reads ``model(...).log_probs``, and these return chosen log-probs for the completion tokens, so the
policy's log-probs are a leaf tensor and both sides' gradients are taken with respect to it.
Our side gets the same rollout and computes everything with grpo_trainer.loss only.

Which TRL 1.16 option is which of ours (spec field → GRPOConfig):
  loss_type grpo | bnpo | dr_grpo | dapo   → loss_type, the same names and normalisations
  scale_rewards group | batch | none       → scale_rewards (batch: group mean, batch std, in both)
  epsilon, epsilon_high                    → epsilon, epsilon_high
  beta                                     → beta (k3 KL; beta 0 computes no reference log-probs)
  num_iterations                           → num_iterations, with steps_per_generation =
                                             gradient_accumulation_steps (TRL's default)
  mask_truncated_completions               → mask_truncated_completions
  importance_sampling token|sequence_truncate|mask → use_vllm, vllm_importance_sampling_correction,
                                             vllm_importance_sampling_mode of the same name
  importance_sampling_cap                  → vllm_importance_sampling_clip_max

What TRL 1.16 has and we do not (left at the values that switch them off):
  use_bias_correction_kl: True by default in TRL 1.16, it multiplies the KL term by ρ = π_θ/π_old,
    which changes the KL gradient even on-policy (ρ = 1 but ∇ρ ≠ 0). TRL 0.16, which Open-RS ran,
    had no such factor, and neither do we: these tests set it False.
  vllm_importance_sampling_clip_min (a lower cap), importance_sampling_level="sequence" (GSPO),
  delta (two-sided clipping), off_policy_mask_threshold, top_entropy_quantile, entropy_coef,
  multi_objective_aggregation="normalize_then_sum", the cispo / sapo / vespo / luspo losses, NaN
  ("unscorable") rewards, and tool masks: not implemented, not tested.
Semantics that differ: none on the paths above. Our metrics are per micro-batch; TRL reduces them
over ranks, and logs the importance-sampling ratio once per generation batch (equal with one
process and one micro-batch, which is how they are compared).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace

import pytest
import torch
import trl
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from grpo_trainer.loss import group_advantages, grpo_loss, mask_truncated_completions

TRL_VERSION = "1.16.0"
PAD, EOS = 0, 2
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def float64():
    """TRL builds tensors from Python lists (sampler log-probs, rewards) in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_trl_is_the_version_these_tests_were_written_against():
    assert trl.__version__ == TRL_VERSION, "TRL's internals changed: re-read its GRPO loss before bumping the pin"


# ------------------------------------------------------------------------------------ one case


@dataclass(frozen=True)
class Case:
    loss_type: str = "bnpo"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    importance_sampling: str = "none"
    importance_sampling_cap: float = 2.0
    scale_rewards: str = "group"
    num_prompts: int = 2
    num_generations: int = 4
    gradient_accumulation_steps: int = 2
    max_completion_length: int = 12
    seed: int = 0

    @property
    def num_completions(self) -> int:
        return self.num_prompts * self.num_generations


@dataclass(frozen=True)
class Rollout:
    """One generation batch as the sampler, the reward functions and the models see it."""

    completion_ids: list[list[int]]
    is_truncated: torch.Tensor  # [N] stopped at the length limit, without EOS
    rewards: torch.Tensor  # [N]
    old_logps: torch.Tensor  # [N, T] the trainer's log-probs when the batch was sampled
    logps: torch.Tensor  # [N, T] the policy's at the update; equal to old_logps when μ = 1
    ref_logps: torch.Tensor  # [N, T]
    sampler_logps: torch.Tensor  # [N, T] zero-padded; NaN where the sampler returned none

    @property
    def completion_mask(self) -> torch.Tensor:
        lengths = torch.tensor([len(ids) for ids in self.completion_ids])
        return (torch.arange(self.logps.size(1)) < lengths.unsqueeze(1)).long()


def make_rollout(case: Case) -> Rollout:
    """Random completions of 1..T tokens, about a third truncated, the first group's rewards all equal."""
    g = torch.Generator().manual_seed(case.seed)
    n, t = case.num_completions, case.max_completion_length - 3
    is_truncated = torch.rand(n, generator=g) < 0.3
    is_truncated[:2] = torch.tensor([False, True])
    lengths = torch.randint(1, t + 1, (n,), generator=g).masked_fill(is_truncated, t)
    completion_ids = []
    for length, truncated in zip(lengths.tolist(), is_truncated.tolist(), strict=True):
        body = torch.randint(3, 50, (length,), generator=g).tolist()
        completion_ids.append(body if truncated else body[:-1] + [EOS])

    rewards = torch.randn(n, generator=g)
    rewards[: case.num_generations] = 0.5  # a group with zero std

    def noise(scale: float) -> torch.Tensor:
        return scale * torch.randn(n, t, generator=g)

    old_logps = -3 * torch.rand(n, t, generator=g)
    logps = old_logps + noise(0.3) if case.num_iterations > 1 else old_logps.clone()
    mask = torch.arange(t) < lengths.unsqueeze(1)
    sampler_logps = (old_logps + noise(0.4)) * mask
    sampler_logps[3, 0] = float("nan")  # a token the sampler could not score
    return Rollout(completion_ids, is_truncated, rewards, old_logps, logps, old_logps + noise(0.3), sampler_logps)


# ------------------------------------------------------------------------------------- our side


def ours(case: Case, rollout: Rollout) -> tuple[list[torch.Tensor], torch.Tensor, list[dict]]:
    """The micro-batch losses, the gradient w.r.t. the policy's log-probs, the metrics: grpo_trainer.loss only."""
    advantages = group_advantages(rollout.rewards, case.num_generations, case.scale_rewards)
    completion_mask = rollout.completion_mask
    if case.mask_truncated_completions:
        completion_mask = mask_truncated_completions(completion_mask, rollout.is_truncated)
    num_items_in_batch = completion_mask.sum()

    logps = rollout.logps.clone().requires_grad_()
    losses, metrics = [], []
    for rows in micro_batches(case):
        loss, micro_batch_metrics = grpo_loss(
            logps[rows],
            completion_mask[rows],
            advantages[rows],
            old_logps=rollout.old_logps[rows] if case.num_iterations > 1 else None,
            ref_logps=rollout.ref_logps[rows] if case.beta > 0 else None,
            sampler_logps=rollout.sampler_logps[rows] if case.importance_sampling != "none" else None,
            loss_type=case.loss_type,
            beta=case.beta,
            epsilon=case.epsilon,
            epsilon_high=case.epsilon_high,
            importance_sampling=case.importance_sampling,
            importance_sampling_cap=case.importance_sampling_cap,
            max_completion_length=case.max_completion_length,
            gradient_accumulation_steps=case.gradient_accumulation_steps,
            num_items_in_batch=num_items_in_batch,
        )
        losses.append(loss)
        metrics.append(micro_batch_metrics)
    torch.stack(losses).sum().backward()
    return [loss.detach() for loss in losses], logps.grad, metrics


def micro_batches(case: Case) -> list[slice]:
    size = case.num_completions // case.gradient_accumulation_steps
    return [slice(i * size, (i + 1) * size) for i in range(case.gradient_accumulation_steps)]


# ------------------------------------------------------------------------------------- TRL's side


class LogProbTable(torch.nn.Module):
    """A stand-in model whose output ``log_probs`` are chosen: row i of ``completion_logps`` for the
    completion of rollout row i (recognised by its one-token prompt, i), zeros on the prompt."""

    is_gradient_checkpointing = False

    def __init__(self, completion_logps: torch.Tensor):
        super().__init__()
        self.completion_logps = completion_logps

    def forward(self, input_ids, attention_mask, labels, **kwargs):
        completion = self.completion_logps[input_ids[:, 0]]
        prompt = completion.new_zeros(input_ids.size(0), input_ids.size(1) - completion.size(1))
        log_probs = torch.cat([prompt, completion], dim=1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs))


@cache
def base_config() -> GRPOConfig:
    with warnings.catch_warnings():  # transformers deprecates an argument TRL's config sets
        warnings.simplefilter("ignore", FutureWarning)
        return GRPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False, use_bias_correction_kl=False)


def trl_config(case: Case) -> GRPOConfig:
    config = copy.copy(base_config())
    config.loss_type = case.loss_type
    config.beta = case.beta
    config.epsilon = case.epsilon
    config.epsilon_high = case.epsilon_high
    config.num_iterations = case.num_iterations
    config.mask_truncated_completions = case.mask_truncated_completions
    config.scale_rewards = case.scale_rewards
    config.num_generations = case.num_generations
    config.max_completion_length = case.max_completion_length
    config.gradient_accumulation_steps = case.gradient_accumulation_steps
    config.steps_per_generation = case.gradient_accumulation_steps
    config.per_device_train_batch_size = case.num_completions // case.gradient_accumulation_steps
    config.use_vllm = config.vllm_importance_sampling_correction = case.importance_sampling != "none"
    if case.importance_sampling != "none":
        config.vllm_importance_sampling_mode = case.importance_sampling
        config.vllm_importance_sampling_clip_max = case.importance_sampling_cap
        config.vllm_importance_sampling_clip_min = None
    return config


def trl_trainer(config: GRPOConfig, model: torch.nn.Module, ref_model: torch.nn.Module | None) -> GRPOTrainer:
    """A GRPOTrainer without __init__: what its generation-scoring and loss code reads."""
    trainer = object.__new__(GRPOTrainer)
    trainer.args = config
    # Copied from the config as GRPOTrainer.__init__ copies them.
    trainer.num_generations = config.num_generations
    trainer.max_completion_length = config.max_completion_length
    trainer.num_iterations = config.num_iterations
    trainer.beta = config.beta
    trainer.epsilon_low = config.epsilon
    trainer.epsilon_high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
    trainer.loss_type = config.loss_type
    trainer.scale_rewards = config.scale_rewards
    trainer.multi_objective_aggregation = config.multi_objective_aggregation
    trainer.mask_truncated_completions = config.mask_truncated_completions
    trainer.importance_sampling_level = config.importance_sampling_level
    trainer.off_policy_mask_threshold = config.off_policy_mask_threshold
    trainer.top_entropy_quantile = config.top_entropy_quantile
    trainer._entropy_bonus_enabled = config.entropy_coef != 0.0 or config.use_adaptive_entropy
    trainer.use_vllm = config.use_vllm
    trainer.vllm_importance_sampling_correction = config.vllm_importance_sampling_correction
    trainer.vllm_importance_sampling_mode = config.vllm_importance_sampling_mode
    trainer.vllm_importance_sampling_clip_max = config.vllm_importance_sampling_clip_max
    trainer.vllm_importance_sampling_clip_min = config.vllm_importance_sampling_clip_min
    trainer.pad_to_multiple_of = config.pad_to_multiple_of
    trainer.log_multimodal = config.log_multimodal
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps
    # A dense model, a text-only task, one reward function, one process.
    trainer.aux_loss_enabled = False
    trainer.environment_factories = None
    trainer.environments = []
    trainer.tools = None
    trainer.reward_weights = torch.ones(1)
    trainer.reward_func_names = ["reward"]
    trainer.model, trainer.ref_model = model, ref_model
    trainer._tokenizer = SimpleNamespace(pad_token_id=PAD)
    trainer.eos_token_ids = [EOS]
    trainer.accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        num_processes=1,
        is_main_process=True,  # read by TRL's profiling decorator
        gather=lambda tensor: tensor,
        reduce=lambda tensor, reduction: tensor,
        autocast=contextlib.nullcontext,
    )
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._logs = {
        key: [] for key in ("images", "prompt", "completion", "advantages")
    } | {"rewards": defaultdict(list), "extra": defaultdict(list)}
    trainer._pending_extra_logs = defaultdict(list)
    trainer._pending_metrics = defaultdict(list)
    return trainer


def generation_batch(trainer: GRPOTrainer, case: Case, rollout: Rollout) -> dict:
    """TRL's _generate_and_score_completions on the rollout: the sampler and rewards are stand-ins."""
    n = case.num_completions
    sampler_logps = [
        [None if logp != logp else logp for logp in row[: len(ids)].tolist()]  # vLLM's None for NaN
        for row, ids in zip(rollout.sampler_logps, rollout.completion_ids, strict=True)
    ]
    trainer._generate = lambda prompts: (
        [[i] for i in range(n)],  # one-token prompts: the row index, which LogProbTable reads
        rollout.completion_ids,
        None,  # no tool mask
        ["completion"] * n,
        sampler_logps,
        {},
        None,  # no images
        [],
    )
    trainer._calculate_rewards = lambda inputs, prompts, completions, completion_ids: rollout.rewards.unsqueeze(1)
    inputs = [{"prompt": f"prompt {i // case.num_generations}"} for i in range(n)]
    return trainer._generate_and_score_completions(inputs)


def theirs(case: Case, rollout: Rollout) -> tuple[list[torch.Tensor], torch.Tensor, GRPOTrainer]:
    """The micro-batch losses and the gradient w.r.t. the policy's log-probs, by TRL's own code."""
    ref_model = LogProbTable(rollout.ref_logps) if case.beta > 0 else None
    trainer = trl_trainer(trl_config(case), LogProbTable(rollout.old_logps), ref_model)
    batch = generation_batch(trainer, case, rollout)

    logps = rollout.logps.clone().requires_grad_()
    policy = LogProbTable(logps)
    losses = [
        trainer._compute_loss(policy, inputs)
        for inputs in split_tensor_dict(batch, case.gradient_accumulation_steps)  # TRL's own split
    ]
    torch.stack(losses).sum().backward()
    return [loss.detach() for loss in losses], logps.grad, trainer


def assert_same_loss_and_gradient(case: Case) -> None:
    rollout = make_rollout(case)
    our_losses, our_grad, _ = ours(case, rollout)
    trl_losses, trl_grad, _ = theirs(case, rollout)
    torch.testing.assert_close(torch.stack(our_losses), torch.stack(trl_losses), **TOLERANCE)
    torch.testing.assert_close(our_grad, trl_grad, **TOLERANCE)
    assert our_grad.abs().sum() > 0, "a case with no gradient tests nothing"


# ------------------------------------------------------------------------------------- the tests

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
IMPORTANCE_SAMPLING = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
SHAPES = [  # (prompts, generations, micro-batches)
    dict(num_prompts=2, num_generations=4, gradient_accumulation_steps=2),
    dict(num_prompts=3, num_generations=2, gradient_accumulation_steps=3),
    dict(num_prompts=4, num_generations=3, gradient_accumulation_steps=1),
]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_advantages_match_trl(scale_rewards, shape):
    case = Case(scale_rewards=scale_rewards, seed=11, **shape)
    rollout = make_rollout(case)
    trainer = trl_trainer(trl_config(case), LogProbTable(rollout.old_logps), LogProbTable(rollout.ref_logps))
    expected = generation_batch(trainer, case, rollout)["advantages"]
    advantages = group_advantages(rollout.rewards, case.num_generations, scale_rewards)
    torch.testing.assert_close(advantages, expected, **TOLERANCE)
    assert torch.all(advantages[: case.num_generations] == 0), "the zero-std group"


@pytest.mark.parametrize("mask_truncated", [False, True], ids=["keep_truncated", "mask_truncated"])
@pytest.mark.parametrize("num_iterations", [1, 3], ids=["mu1", "mu3"])
@pytest.mark.parametrize("epsilon_high", [0.2, 0.28], ids=["symmetric", "clip_higher"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_match_trl(loss_type, beta, epsilon_high, num_iterations, mask_truncated):
    for seed, shape in enumerate(SHAPES):
        case = Case(
            loss_type=loss_type,
            beta=beta,
            epsilon_high=epsilon_high,
            num_iterations=num_iterations,
            mask_truncated_completions=mask_truncated,
            seed=seed,
            **shape,
        )
        assert_same_loss_and_gradient(case)


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["mu1", "mu2"])
@pytest.mark.parametrize("importance_sampling", IMPORTANCE_SAMPLING)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_importance_sampling_matches_trl(loss_type, importance_sampling, num_iterations):
    for (seed, shape), cap in itertools.product(enumerate(SHAPES), [1.2, 2.0]):
        case = Case(
            loss_type=loss_type,
            importance_sampling=importance_sampling,
            importance_sampling_cap=cap,
            num_iterations=num_iterations,
            epsilon_high=0.28,
            mask_truncated_completions=seed % 2 == 1,
            seed=seed,
            **shape,
        )
        assert_same_loss_and_gradient(case)


@pytest.mark.parametrize("importance_sampling", ["none", *IMPORTANCE_SAMPLING])
def test_metrics_match_trl(importance_sampling):
    """One micro-batch, one process: our metrics are then TRL's."""
    case = Case(
        importance_sampling=importance_sampling,
        num_iterations=2,
        epsilon_high=0.28,
        gradient_accumulation_steps=1,
        seed=5,
    )
    rollout = make_rollout(case)
    _, _, [metrics] = ours(case, rollout)
    _, _, trainer = theirs(case, rollout)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert set(metrics) - {"policy_ratio/mean"} <= set(logged)
    for name, value in metrics.items():
        if name != "policy_ratio/mean":
            assert value.item() == pytest.approx(logged[name], rel=1e-6, abs=1e-6), name
    assert metrics["clip_ratio/region_mean"] > 0, "the case must clip something"


@pytest.mark.parametrize("num_processes", [1, 2, 4])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_with_empty_rows_matches_trl(loss_type, num_processes):
    """TRL's _compute_loss straight on one micro-batch of one rank out of several: completions with no
    active token, and dapo's normaliser counted over every rank's tokens."""
    g = torch.Generator().manual_seed(7)
    b, t = 5, 6
    completion_mask = (torch.rand(b, t, generator=g) < 0.7).long()
    completion_mask[1] = 0
    completion_mask[3] = 0
    old_logps = -2 * torch.rand(b, t, generator=g)
    ref_logps = old_logps + 0.3 * torch.randn(b, t, generator=g)
    logps = old_logps + 0.4 * torch.randn(b, t, generator=g)
    advantages = torch.randn(b, generator=g)
    num_items_in_batch = completion_mask.sum() * num_processes + 3  # the other ranks' tokens too

    case = Case(loss_type=loss_type, num_iterations=2, epsilon_high=0.28, gradient_accumulation_steps=2)
    trl_logps = logps.clone().requires_grad_()
    policy = LogProbTable(trl_logps)
    trainer = trl_trainer(trl_config(case), policy, ref_model=None)
    trainer.accelerator.num_processes = num_processes
    trl_loss = trainer._compute_loss(
        policy,
        {
            "prompt_ids": torch.arange(b).unsqueeze(1),
            "prompt_mask": torch.ones(b, 1, dtype=torch.long),
            "completion_ids": torch.full((b, t), 5),
            "completion_mask": completion_mask,
            "advantages": advantages,
            "old_per_token_logps": old_logps,
            "ref_per_token_logps": ref_logps,
            "num_items_in_batch": num_items_in_batch,
        },
    )
    trl_loss.backward()

    our_logps = logps.clone().requires_grad_()
    our_loss, _ = grpo_loss(
        our_logps,
        completion_mask,
        advantages,
        old_logps=old_logps,
        ref_logps=ref_logps,
        loss_type=loss_type,
        beta=case.beta,
        epsilon=case.epsilon,
        epsilon_high=case.epsilon_high,
        max_completion_length=case.max_completion_length,
        gradient_accumulation_steps=case.gradient_accumulation_steps,
        num_items_in_batch=num_items_in_batch,
        num_processes=num_processes,
    )
    our_loss.backward()
    torch.testing.assert_close(our_loss, trl_loss, **TOLERANCE)
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, **TOLERANCE)
    assert torch.all(our_logps.grad[[1, 3]] == 0)

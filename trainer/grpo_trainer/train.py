"""The GRPO training loop, top to bottom: data → rollout → rewards → advantages → loss → engine.

One optimizer step takes P prompts and samples G completions of each (P·G = per-device batch ×
gradient accumulation × ranks), scores them, turns rewards into group advantages, and then makes
``num_iterations`` passes over them in micro-batches through the DeepSpeed engine. Each rank samples
and trains on its own share of the prompts; only rewards cross ranks (for batch-scaled advantages
and the logged means).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from grpo_trainer.checkpoint import (
    MODEL_DIR,
    CheckpointStore,
    CheckpointWriteError,
    Manifest,
    TrainerState,
    checkpoint_prefix,
    download_checkpoint,
    ensure_room,
    estimated_size,
    restore,
    stage,
)
from grpo_trainer.data import DatasetError, build_prompts, load_problems
from grpo_trainer.disk_space import human
from grpo_trainer.engine import build_engine, init_distributed
from grpo_trainer.logprobs import token_log_probs
from grpo_trainer.loss import group_advantages, grpo_loss, mask_truncated_completions
from grpo_trainer.metrics import MetricsLog, StepTimer
from grpo_trainer.model import ModelError, eos_token_ids, load_model, load_tokenizer, pad_token_id, resolve_model_source
from grpo_trainer.preemption import Preemption
from grpo_trainer.rewards import RewardScorer
from grpo_trainer.rollout import Rollouts, Sampler, TransformersSampler
from grpo_trainer.shared_prompts import completion_hidden_states
from grpo_trainer.spec import CheckpointSpec, GRPORun, RolloutSpec
from grpo_trainer.status_report import StatusReporter
from grpo_trainer.storage import LocalStorage, Storage, StorageError, StorageFullError
from grpo_trainer.vllm_client import ServerSampler, server_url
from grpo_trainer.weight_sync import INITIAL_VERSION, WeightSync, default_transports

logger = logging.getLogger(__name__)
T = TypeVar("T")

ROOM_ADVICE = "free space there, give the run a larger volume, or keep fewer checkpoints (spec.checkpoints.keepLast)"


@dataclass
class Batch:
    """One rank's completions of a step as tensors. Prompts are left-padded and completions
    right-padded, so every completion starts at the same column: the model's output layer runs only
    on the columns that predict completion tokens, and the rows of one prompt share its forward."""

    input_ids: torch.Tensor  # [B, P + T] left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # [B, P + T]
    position_ids: torch.Tensor  # [B, P + T] each row counts from its own first token
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T]
    truncated: torch.Tensor  # [B] bool
    sampler_logps: torch.Tensor | None  # [B, T]; None when the sampler gives no log-probs


def prompts_per_step(run: GRPORun, world_size: int) -> int:
    """How many prompts one rank samples per optimizer step: whole groups, as a CEL rule on
    spec.grpo guarantees (so ``kubectl apply`` refuses a spec where they are not)."""
    grpo = run.spec.grpo
    return grpo.per_device_batch_size * grpo.gradient_accumulation_steps // grpo.num_generations


@dataclass(frozen=True)
class TrainResult:
    """How a call to train() ended: trained to max_steps, or stopped by SIGTERM after a checkpoint."""

    completed: bool
    step: int
    checkpoint_uri: str | None
    model_uri: str | None
    """The policy of that checkpoint in HF format (its model/ folder)."""


def train(
    run: GRPORun, run_dir: Path, storage: Storage, *, show_progress: bool = True, tensorboard_dir: Path | None = None
) -> TrainResult:
    """Train ``run`` from its newest complete checkpoint in ``storage`` (or spec.checkpoints.resumeFrom,
    or from scratch), checkpointing every spec.checkpoints.everySteps and at the end. ``run_dir`` is
    local: metrics.jsonl and the staging folder of checkpoints. With ``tensorboard_dir``, every step's
    numbers also go there as TensorBoard scalars."""
    spec, grpo = run.spec, run.spec.grpo
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    prompts_per_rank = prompts_per_step(run, world_size)
    preemption = Preemption(spec.checkpoints.preemption_grace_seconds)
    torch.manual_seed(grpo.seed + rank)

    # s3:// data and models live in the same store as the checkpoints, so they share its endpoint.
    endpoint_url = spec.checkpoints.endpoint_url

    # ---- checkpoints first: a store we cannot write to fails the run before any work
    store = CheckpointStore(storage)
    staging = run_dir / ".checkpoint-staging"
    if rank == 0:  # a killed attempt's leftovers would take the room the next checkpoint needs
        shutil.rmtree(staging, ignore_errors=True)
    _on_rank_0(storage.check_access)
    fetch_began = time.perf_counter()
    resumed, resume_dir = _on_rank_0(lambda: _fetch_checkpoint(store, spec.checkpoints, endpoint_url, staging / "resume"))
    fetch_seconds = time.perf_counter() - fetch_began

    # ---- data and model
    with _naming("spec.model.source"):
        location = resolve_model_source(spec.model.source, revision=spec.model.revision, endpoint_url=endpoint_url)
        tokenizer = load_tokenizer(location)
    with _naming("spec.dataset.source"):
        problems = load_problems(spec.dataset, endpoint_url=endpoint_url)
    prompts = build_prompts(
        problems, tokenizer, system_prompt=spec.dataset.system_prompt, max_prompt_length=grpo.max_prompt_length
    )
    with _naming("spec.model.source"):
        model = load_model(location, tokenizer, dtype=spec.model.dtype, device=device)
    reference = None
    if grpo.beta > 0:
        reference = load_model(location, tokenizer, dtype=spec.model.dtype, device=device).eval().requires_grad_(False)
    engine = build_engine(model, grpo)  # trains ``model`` in place: engine.module is model
    eos_ids = eos_token_ids(model, tokenizer)
    sampler = _sampler(spec.rollout, model, eos_ids, pad_token_id(tokenizer))
    scorer = RewardScorer(spec.rewards)

    first_step, history = 0, []
    if resumed is not None:
        load_began = time.perf_counter()
        assert resume_dir is not None  # found with ``resumed``
        state = restore(resume_dir, engine)
        first_step, history = state.step, state.metrics
        dist.barrier()  # every rank has loaded it: a downloaded copy's room goes to the next checkpoint
        if rank == 0:
            shutil.rmtree(staging / "resume", ignore_errors=True)
        logger.info("resumed from %s at step %d (fetch and verify %.1f s, load %.1f s)",
                    resumed, first_step, fetch_seconds, time.perf_counter() - load_began)
    # The server's weights must be the policy's before each rollout: pushed after every step, and
    # again whenever the server says it serves others (a restarted sidecar, a resumed run).
    weight_sync = _weight_sync(spec, sampler, model, resumed, first_step, device) if rank == 0 else None
    log = MetricsLog(run_dir / "metrics.jsonl", total_steps=grpo.max_steps, enabled=rank == 0,
                     show_progress=show_progress, history=history, tensorboard_dir=tensorboard_dir)
    # In a pod, progress and checkpoints also go into the GRPORun's status, for kubectl get grporuns.
    reporter = StatusReporter.from_environment(grpo.max_steps) if rank == 0 else None

    previous: Manifest | None = None  # this attempt's last checkpoint: the best estimate of the next one's size

    def save(step: int) -> str:
        nonlocal previous
        began = time.perf_counter()
        state = TrainerState(step, world_size, grpo.seed, log.records)
        needed, estimated_from = estimated_size(model, previous)
        since_last = [record["reward"] for record in log.records[-spec.checkpoints.every_steps :]]
        score = sum(since_last) / len(since_last) if since_last else None
        try:
            _on_rank_0(lambda: ensure_room(needed, staging / "save", storage))
            stage(staging / "save", engine, tokenizer, state)
            staged = time.perf_counter()
            manifest = _on_rank_0(
                lambda: store.save(
                    staging / "save", step, world_size, score,
                    keep_last=spec.checkpoints.keep_last, evaluation=spec.evaluation,
                )
            )
        except StorageError as error:
            if rank == 0:  # what the save staged is gone already; the empty folder goes too
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, StorageFullError):
                raise StorageFullError(
                    f"checkpoint of step {step} needs about {human(needed)} ({estimated_from}): {error}; {ROOM_ADVICE}"
                ) from error
            raise CheckpointWriteError(f"checkpoint of step {step}: {error}") from error
        previous = manifest
        uri = storage.uri_for(checkpoint_prefix(step))
        if reporter is not None:
            reporter.report_checkpoint(step, uri)
        megabytes = sum(entry.size for entry in manifest.files.values()) / 1e6
        logger.info("saved %s: %.0f MB in %.1f s (write %.1f s, move into the store %.1f s)", uri, megabytes,
                    time.perf_counter() - began, staged - began, time.perf_counter() - staged)
        return uri

    # ---- the loop
    saved_step, saved_uri = first_step, resumed
    step = first_step
    while step < grpo.max_steps and not preemption.requested():
        timer = StepTimer()
        step_prompts = _prompts_for_step(prompts, step, rank, world_size, prompts_per_rank, grpo.seed)
        # The label of the policy's weights: vLLM's own for the weights it loaded, else the step. With
        # a server, the label it serves them under once ensure_current has made sure it has them.
        current, pushed_again = (INITIAL_VERSION if step == 0 and resumed is None else str(step)), False
        if isinstance(sampler, ServerSampler):
            with timer("sync"):
                pushed_again, current = _on_rank_0(lambda step=step: _ensure_current(weight_sync, model, step))
        with timer("generate"):
            rollouts = sampler.generate(
                [prompt.token_ids for prompt in step_prompts],
                num_generations=grpo.num_generations,
                max_new_tokens=grpo.max_completion_length,
                temperature=grpo.temperature,
                top_p=grpo.top_p,
                seed=_sampling_seed(grpo.seed, step, rank, world_size),
            )
        if preemption.requested():  # the rollouts are cheap to redo; the weights have not changed yet
            break
        weight_version, stale = _weight_version(rollouts, current, step, device)
        with timer("score"):
            texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
            golds = [prompt.problem.answer for prompt in step_prompts for _ in range(grpo.num_generations)]
            scored = scorer.score(texts, golds, [len(ids) for ids in rollouts.completion_ids])
            rewards = torch.tensor(scored.total, dtype=torch.float32)
            all_rewards = _all_gather(rewards, device)
            advantages = group_advantages(all_rewards, grpo.num_generations, grpo.scale_rewards)
            advantages = advantages.view(world_size, -1)[rank].to(device)
        with timer("train"):
            loss_metrics = _optimize(engine, reference, rollouts, advantages, grpo, pad_token_id(tokenizer), device)
        step += 1
        synced = {}
        # After the last step no rollout follows: the final weights go to the checkpoint only.
        if isinstance(sampler, ServerSampler) and step < grpo.max_steps:
            with timer("sync"):
                synced = _on_rank_0(lambda step=step: _push(weight_sync, model, step))
        record = log.step(
            step,
            rewards=all_rewards,
            per_function={name: _all_gather(torch.tensor(v), device) for name, v in scored.per_function.items()},
            reward_failures=dict(scored.failures),
            completion_lengths=_all_gather(torch.tensor([len(c) for c in rollouts.completion_ids]), device),
            truncated=_all_gather(torch.tensor(rollouts.truncated), device),
            num_generations=grpo.num_generations,
            loss_metrics=loss_metrics,
            learning_rate=engine.get_lr()[0],
            timer=timer,
            weight_version=weight_version,
            stale_weights=stale,
            weight_sync={**synced, "rollout/weights_pushed_again": pushed_again} if weight_sync else None,
            sample=(texts[0], golds[0]),
        )
        if reporter is not None and record is not None:  # rank 0's, which logs
            reporter.report_step(record)
        if step % spec.checkpoints.every_steps == 0 or step == grpo.max_steps:
            saved_step, saved_uri = step, save(step)

    if step > 0 and saved_step != step:  # stopped by SIGTERM between checkpoints
        saved_uri = save(step)
    log.close()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if weight_sync is not None:
        weight_sync.close()
    return TrainResult(step == grpo.max_steps, step, saved_uri, saved_uri and f"{saved_uri}/{MODEL_DIR}")


def _optimize(engine, reference, rollouts: Rollouts, advantages, grpo, pad_token_id: int, device) -> dict[str, float]:
    """The training phase of one step: ``num_iterations`` passes over this rank's rollouts in
    micro-batches through the engine; returns the loss metrics averaged over micro-batches and ranks."""
    world_size = dist.get_world_size()
    batch = _padded_batch(rollouts, pad_token_id, device)
    completion_mask = batch.completion_mask
    if grpo.mask_truncated_completions:
        completion_mask = mask_truncated_completions(completion_mask, batch.truncated)
    active_tokens = _all_reduce_sum(completion_mask.sum().float())
    with torch.no_grad():
        old_logps = _completion_logps(engine, batch, grpo.temperature)[0] if grpo.num_iterations > 1 else None
        ref_logps = _completion_logps(reference, batch, grpo.temperature)[0] if reference is not None else None
    step_metrics: dict[str, list[float]] = {}
    largest_difference = torch.zeros((), device=device)
    micro = grpo.per_device_batch_size
    for iteration in range(grpo.num_iterations):
        for start in range(0, len(rollouts), micro):
            rows = slice(start, start + micro)
            logps, entropy = _completion_logps(engine, _rows(batch, rows), grpo.temperature)
            if iteration == 0 and batch.sampler_logps is not None:
                # The optimizer steps only after the last micro-batch, so these are still the
                # sampling policy's log-probs: any difference is the sampler's (TRL's metric).
                difference = (logps.detach() - batch.sampler_logps[rows]).abs()[completion_mask[rows].bool()]
                step_metrics.setdefault("sampling/sampling_logp_difference/mean", []).append(float(difference.mean()))
                largest_difference = torch.maximum(largest_difference, difference.max())
            loss, metrics = grpo_loss(
                logps,
                completion_mask[rows],
                advantages[rows],
                old_logps=None if old_logps is None else old_logps[rows],
                ref_logps=None if ref_logps is None else ref_logps[rows],
                sampler_logps=None if batch.sampler_logps is None else batch.sampler_logps[rows],
                loss_type=grpo.loss_type,
                beta=grpo.beta,
                epsilon=grpo.epsilon,
                epsilon_high=grpo.epsilon_high,
                importance_sampling=grpo.importance_sampling,
                importance_sampling_cap=grpo.importance_sampling_cap,
                max_completion_length=grpo.max_completion_length,
                # DeepSpeed divides by the accumulation steps itself in engine.backward.
                gradient_accumulation_steps=1,
                num_items_in_batch=active_tokens,
                # ...and averages over ranks, so dapo's token count is shared out over both.
                num_processes=world_size * grpo.gradient_accumulation_steps,
            )
            engine.backward(loss)
            engine.step()
            # The loss itself, as TRL logs it: the mean over micro-batches (and ranks) of each one's loss.
            metrics["loss"] = loss.detach()
            for name, value in metrics.items():
                step_metrics.setdefault(name, []).append(float(value))
            step_metrics.setdefault("entropy", []).append(_masked_mean(entropy, completion_mask[rows]))
    # Each rank's mean over its micro-batches, then the mean over ranks (each holds as many rows).
    means = torch.tensor([sum(values) / len(values) for values in step_metrics.values()], device=device)
    metrics = dict(zip(step_metrics, (_all_reduce_sum(means) / world_size).tolist(), strict=True))
    if batch.sampler_logps is not None:
        if world_size > 1:
            dist.all_reduce(largest_difference, op=dist.ReduceOp.MAX)
        metrics["sampling/sampling_logp_difference/max"] = largest_difference.item()
    return metrics


@contextmanager
def _naming(field: str) -> Iterator[None]:
    """A model or dataset that cannot be used is reported under the spec field that names it, as
    ``grpo validate`` reports a bad field."""
    try:
        yield
    except (ModelError, DatasetError) as error:
        raise type(error)(f"{field}: {error}") from error


def _sampler(rollout: RolloutSpec, policy, eos_ids: list[int], pad_token_id: int) -> Sampler:
    """The policy itself in this process, or the vLLM server (once it answers /health)."""
    if rollout.backend == "in-process":
        return TransformersSampler(policy, eos_token_ids=eos_ids, pad_token_id=pad_token_id)
    sampler = ServerSampler(server_url(), eos_token_ids=eos_ids, rollout=rollout)
    sampler.wait_until_ready()
    return sampler


def _weight_sync(spec, sampler: Sampler, policy, resumed: str | None, first_step: int, device) -> WeightSync | None:
    """Rank 0's weight sync to the server the rollouts come from; None when the policy samples itself."""
    if not isinstance(sampler, ServerSampler):
        return None
    timeout = spec.rollout.weight_sync_timeout_seconds
    # What vLLM serves with --dtype=spec.model.dtype; "auto" is the checkpoint's, which the policy was loaded in.
    dtype = next(policy.parameters()).dtype if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype)
    return WeightSync(
        sampler.url,
        dtype=dtype,
        timeout=timeout,
        transports=default_transports(timeout, on_gpu=device.type == "cuda",
                                      server_workers=spec.resources.vllm_gpus),
        label=INITIAL_VERSION if first_step == 0 and resumed is None else str(first_step),
        wait_until_ready=sampler.wait_until_ready,
    )


def _ensure_current(weight_sync: WeightSync | None, policy, step: int) -> tuple[bool, str]:
    """Rank 0's, before a step's rollouts: whether the weights had to be pushed again (the server
    restarted), and the label they are served under."""
    assert weight_sync is not None  # rank 0 of a run whose rollouts come from a server has one
    return weight_sync.ensure_current(policy, str(step)), weight_sync.label


def _push(weight_sync: WeightSync | None, policy, step: int) -> dict[str, Any]:
    """Rank 0's, after an optimizer step: the new weights into the server; the push's record."""
    assert weight_sync is not None
    return weight_sync.push(policy, str(step)).record()


def _weight_version(rollouts: Rollouts, current: str, step: int, device) -> tuple[str, bool]:
    """The label of the weights that sampled this step's rollouts, and whether they are stale on
    any rank: not ``current``, the label of the policy's weights. The policy sampling itself is
    never stale."""
    if rollouts.weight_versions is None:
        return current, False
    stale = rollouts.weight_versions != [current]
    stale = bool(_all_reduce_sum(torch.tensor(float(stale), device=device)) > 0)
    label = ",".join(rollouts.weight_versions)
    if stale and dist.get_rank() == 0:
        logger.warning("step %d: rollouts sampled by server weights %r, not the policy's (%r): off-policy", step + 1,
                       label, current)
    return label, stale


def _fetch_checkpoint(
    store: CheckpointStore, checkpoints: CheckpointSpec, endpoint_url, local_dir: Path
) -> tuple[str | None, Path | None]:
    """The URI of the checkpoint to resume from and the folder to read it from: spec.checkpoints.resumeFrom
    if set, else the run's newest complete one; (None, None) to start from scratch. It is downloaded
    into ``local_dir``, except the run's own checkpoints in a file:// store, read where they are."""
    if checkpoints.resume_from:
        download_checkpoint(checkpoints.resume_from, local_dir, endpoint_url=endpoint_url)
        return checkpoints.resume_from, local_dir
    if isinstance(store.storage, LocalStorage):
        manifest, folder = store.newest_in_place() or (None, None)
    else:
        manifest, folder = store.fetch_newest(local_dir), local_dir
    return (None, None) if manifest is None else (store.storage.uri_for(checkpoint_prefix(manifest.step)), folder)


def _on_rank_0(action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only and give every rank its result, or raise its error on every
    rank (the others would otherwise wait forever at the next collective)."""
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (action(), None)
        except Exception as error:  # re-raised below, on every rank
            outcome[0] = (None, error)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return cast(T, result)  # rank 0's, sent to every rank


# ------------------------------------------------------------------------------------ helpers


def _prompts_for_step(prompts, step, rank, world_size, prompts_per_rank, seed):
    """This rank's prompts for ``step``: epochs of a seeded permutation, cut into equal shares.
    A pure function of the step, so a resumed run sees exactly the prompts it would have seen."""
    per_step = prompts_per_rank * world_size
    start = step * per_step + rank * prompts_per_rank
    chosen = []
    for index in range(start, start + prompts_per_rank):
        epoch, position = divmod(index, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
        chosen.append(prompts[int(order[position])])
    return chosen


def _sampling_seed(seed: int, step: int, rank: int, world_size: int) -> int:
    return seed * 1_000_003 + step * world_size + rank


def _padded_batch(rollouts: Rollouts, pad_id: int, device) -> Batch:
    rows = len(rollouts)
    prompt_width = max(map(len, rollouts.prompt_ids))
    longest = max(map(len, rollouts.completion_ids))
    input_ids = torch.full((rows, prompt_width + longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, prompt_width + longest), dtype=torch.long)
    completion_mask = torch.zeros((rows, longest))
    for row, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)):
        sequence = slice(prompt_width - len(prompt), prompt_width + len(completion))
        input_ids[row, sequence] = torch.tensor(prompt + completion)
        attention_mask[row, sequence] = 1
        completion_mask[row, : len(completion)] = 1
    sampler_logps = None
    if rollouts.sampler_logprobs is not None:
        sampler_logps = torch.zeros((rows, longest))
        for row, logps in enumerate(rollouts.sampler_logprobs):
            sampler_logps[row, : len(logps)] = torch.tensor(logps)
        sampler_logps = sampler_logps.to(device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        position_ids.to(device),
        input_ids[:, prompt_width:].to(device),
        completion_mask.to(device),
        torch.tensor(rollouts.truncated, device=device),
        sampler_logps,
    )


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(
        batch.input_ids[rows],
        batch.attention_mask[rows],
        batch.position_ids[rows],
        batch.completion_ids[rows],
        batch.completion_mask[rows],
        batch.truncated[rows],
        None if batch.sampler_logps is None else batch.sampler_logps[rows],
    )


def _completion_logps(model, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(o_t | q, o_<t) of each completion token at the sampling temperature, and the entropy of
    π at that position, both [B, T] (0 past a completion's end). The model runs without its output
    layer (no logits at all), each distinct prompt once (grpo_trainer.shared_prompts); the final
    hidden states that predict completion tokens then go through it in chunks of tokens, forward
    and backward (grpo_trainer.logprobs), so memory never holds [B, T, vocabulary] logits."""
    mask = batch.completion_mask.bool()
    hidden = completion_hidden_states(
        model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.completion_ids.shape[1]
    )
    causal_lm = getattr(model, "module", model)  # the model itself under the DeepSpeed engine
    logps, entropy = token_log_probs(
        hidden[mask], causal_lm.get_output_embeddings(), batch.completion_ids[mask], temperature
    )
    return _unflatten(logps, mask), _unflatten(entropy, mask)


def _unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] values of the True places of ``mask`` [B, T] back to [B, T], 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def _all_gather(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``values`` (same length on each), concatenated in rank order, on the CPU.
    They travel through ``device``: NCCL moves only GPU tensors."""
    if dist.get_world_size() == 1:
        return values
    values = values.to(device)
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts).cpu()


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``value``, a tensor already on this rank's device."""
    if dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value

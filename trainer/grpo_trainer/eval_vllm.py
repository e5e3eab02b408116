"""The vLLM backend of ``grpo eval``: vLLM's offline engine, one independent engine per GPU.

The only module that imports vllm (the pinned version of pyproject's ``vllm`` extra; its offline
API: ``LLM(model=..., max_model_len=..., seed=...)``, ``LLM.generate(list of TokensPrompt, list of
SamplingParams)``, ``RequestOutput.outputs[i].token_ids`` and ``.finish_reason``). vLLM refuses
``LLM(data_parallel_size>1)`` in one process, so data parallelism is done as lighteval did it: the
prompts are dealt out round-robin (which spreads long and short ones evenly) to one process per
GPU, each with ``CUDA_VISIBLE_DEVICES`` set to its GPU, and the outputs put back in order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass

from grpo_trainer.evaluation import EvalSettings, Progress, Sample

GPU_MEMORY_UTILIZATION = 0.8  # Open-RS's evaluation setting


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None  # hub ids only
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION


class VLLMBackend:
    def __init__(self, config: EngineConfig, gpus: int = 1) -> None:
        self.config = config
        self.gpus = gpus

    def generate(
        self, prompts: Sequence[Sequence[int]], caps: Sequence[int], settings: EvalSettings, advance: Progress
    ) -> list[list[Sample]]:
        work = [(index, list(prompt), cap) for index, (prompt, cap) in enumerate(zip(prompts, caps, strict=True))]
        if self.gpus == 1:
            results = _generate_shard(self.config, settings, work, gpu=None)
        else:
            shards = [work[gpu :: self.gpus] for gpu in range(self.gpus)]
            context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
            with context.Pool(self.gpus) as pool:
                parts = pool.starmap(_generate_shard, [(self.config, settings, shard, gpu) for gpu, shard in enumerate(shards)])
            results = [item for part in parts for item in part]
        ordered: list[list[Sample]] = [[] for _ in prompts]
        for index, samples in results:
            ordered[index] = samples
        advance(sum(map(len, ordered)))
        return ordered


def _generate_shard(
    config: EngineConfig, settings: EvalSettings, work: list[tuple[int, list[int], int]], gpu: int | None
) -> list[tuple[int, list[Sample]]]:
    """One engine's share: (prompt index, its samples). Prompts with no room to generate get empty,
    truncated samples (vLLM rejects max_tokens 0)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from vllm import LLM, SamplingParams  # pyright: ignore[reportMissingImports]  (in the vllm image only)

    runnable = [(index, prompt, cap) for index, prompt, cap in work if cap > 0]
    empty = [Sample([], truncated=True)] * settings.samples_per_problem
    results = [(index, list(empty)) for index, _, cap in work if cap == 0]
    if not runnable:
        return results
    llm = LLM(
        model=config.model,
        revision=config.revision,
        dtype=config.dtype,
        seed=settings.seed,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
    )
    params = [
        SamplingParams(
            n=settings.samples_per_problem,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=cap,
            seed=settings.seed + index,  # per prompt: the same samples whatever the sharding
        )
        for index, _, cap in runnable
    ]
    outputs = llm.generate([{"prompt_token_ids": prompt} for _, prompt, _ in runnable], params, use_tqdm=True)
    for (index, _, _), output in zip(runnable, outputs, strict=True):
        samples = [Sample(list(c.token_ids), truncated=c.finish_reason == "length") for c in output.outputs]
        results.append((index, samples))
    return results

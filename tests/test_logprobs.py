"""Chunked log-probs and entropies: the unchunked computation's values and gradients, in float64,
and a peak memory that stays under a bound the unchunked computation exceeds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from grpo_trainer.logprobs import _checkpointed_log_probs, token_log_probs

REPO = Path(__file__).resolve().parent.parent


def unchunked(hidden, lm_head, tokens, temperature):
    log_probs = torch.log_softmax(lm_head(hidden).float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens[:, None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def _inputs(bias: bool, tokens: int = 23, hidden_size: int = 16, vocabulary: int = 97):
    generator = torch.Generator().manual_seed(1)
    lm_head = nn.Linear(hidden_size, vocabulary, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(lm_head.weight.shape, generator=generator, dtype=torch.float64))
        if bias:
            lm_head.bias.copy_(torch.randn(vocabulary, generator=generator, dtype=torch.float64))
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True)
    return hidden, lm_head, torch.randint(vocabulary, (tokens,), generator=generator)


def _gradients(function, hidden, lm_head, tokens, upstream):
    logps, entropy = function(hidden, lm_head, tokens, 0.7)
    parameters = [hidden, *lm_head.parameters()]
    return logps, entropy, torch.autograd.grad((logps * upstream).sum(), parameters)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["fused", "checkpointed"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 23, 64])
def test_chunked_values_and_gradients_equal_the_unchunked_ones(bias, path, chunk_tokens):
    hidden, lm_head, tokens = _inputs(bias)
    upstream = torch.randn(len(tokens), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if path == "fused":
        def chunked(*args):
            return token_log_probs(*args, chunk_tokens=chunk_tokens)
    else:
        def chunked(*args):
            return _checkpointed_log_probs(*args, chunk_tokens)
    expected_logps, expected_entropy, expected_grads = _gradients(unchunked, hidden, lm_head, tokens, upstream)
    logps, entropy, grads = _gradients(chunked, hidden, lm_head, tokens, upstream)
    assert logps.dtype == entropy.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(logps, expected_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-5)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_no_tokens_give_empty_results():
    hidden, lm_head, tokens = _inputs(bias=False, tokens=0)
    logps, entropy = token_log_probs(hidden, lm_head, tokens, 1.0)
    assert logps.shape == entropy.shape == (0,)
    logps.sum().backward()
    assert hidden.grad.shape == hidden.shape


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import grpo_trainer.logprobs
    from grpo_trainer.rollout import Rollouts
    from grpo_trainer.train import _completion_logps, _padded_batch

    def kilobytes(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    def peak_mib(function):
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        before = kilobytes("VmRSS")
        function()
        return (kilobytes("VmHWM") - before) / 1024

    rows, prompt, width, vocabulary = 4, 16, 512, 32000
    grpo_trainer.logprobs.CHUNK_ELEMENTS = 2**22  # 16 MiB of logits per chunk: 131 tokens
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocabulary, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    prompts = torch.randint(vocabulary, (rows, prompt)).tolist()
    completions = torch.randint(vocabulary, (rows, width)).tolist()
    batch = _padded_batch(Rollouts(prompts, completions, None, [False] * rows), 0, torch.device("cpu"))

    def ours():
        logps, entropy = _completion_logps(model, batch, 0.7)
        logps.sum().backward()

    def unchunked():  # the path before chunking: [rows, T, V] logits, then a float32 log-softmax per row
        logits = model(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "position_ids")},
                       logits_to_keep=width + 1).logits[:, :-1]
        total = 0
        for row in range(rows):
            log_probs = torch.log_softmax(logits[row].float() / 0.7, dim=-1)
            total = total + log_probs.gather(-1, batch.completion_ids[row, :, None]).sum()
            (log_probs.exp() * log_probs).sum(-1).detach()
        total.backward()

    ours(); unchunked()  # warm-up
    print(json.dumps({"ours": peak_mib(ours), "unchunked": peak_mib(unchunked),
                      "logits": rows * width * vocabulary * 4 / 2**20}))
    """
)


def test_the_log_prob_path_never_holds_the_logits_of_the_micro_batch():
    """Peak resident memory of _completion_logps plus its backward at 4 × 512 tokens of a 32,000-token
    vocabulary, whose float32 logits are 250 MiB, in chunks of 16 MiB: under half of that, where the
    unchunked path (measured in the same process) takes several times it. glibc's heap would keep freed chunks
    and hide the growth, so every allocation above 64 KiB is its own mapping."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs)")
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    bound = peaks["logits"] / 2
    assert peaks["unchunked"] > bound, peaks  # the bound is one the old path fails
    assert peaks["ours"] < bound, peaks


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_completion_log_probs_give_the_unchunked_gradients_of_every_weight(gradient_checkpointing):
    """Through the whole model in float64 (tied output layer, left-padded prompts, right-padded
    completions): the gradient of Σ logps equals that of each row's own unpadded forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_trainer.rollout import Rollouts
    from grpo_trainer.train import _completion_logps, _padded_batch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).double().train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in (3, 6, 2)]
    completions = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in (5, 2, 7)]
    batch = _padded_batch(Rollouts(prompts, completions, None, [False] * 3), 0, torch.device("cpu"))
    logps, _ = _completion_logps(model, batch, 0.7)
    ours = torch.autograd.grad(logps.sum(), list(model.parameters()))
    expected = 0
    for prompt, completion in zip(prompts, completions, strict=True):
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        log_probs = torch.log_softmax(logits / 0.7, dim=-1)
        expected = expected + log_probs.gather(-1, torch.tensor(completion)[:, None]).sum()
    for got, want in zip(ours, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)

"""Log-probabilities and entropies of sampled tokens without ever holding their logits whole.

The output layer of a causal LM maps each position's final hidden state h_t [H] to logits
z_t = W h_t (+ b) over the vocabulary V. For GRPO only two numbers per sampled token o_t matter:

    z_t      = (W h_t + b) / τ                          logits at the sampling temperature τ
    lse_t    = log Σ_v exp(z_tv)
    logp_t   = z_t[o_t] − lse_t                         log π(o_t | q, o_<t)
    H_t      = lse_t − Σ_v p_tv z_tv,  p_t = exp(z_t − lse_t)    entropy of π at t (no gradient)

and the gradient of the loss L through logp_t, with g_t = ∂L/∂logp_t:

    ∂L/∂z_t  = g_t · (onehot(o_t) − p_t) / τ
    ∂L/∂h_t  = (∂L/∂z_t) W          ∂L/∂W = Σ_t (∂L/∂z_t)ᵀ h_t          ∂L/∂b = Σ_t ∂L/∂z_t

The logits of N tokens are [N, V] floats (Open-RS: 6 × 3,584 × 151,936 in float32 is 13 GB), so
:func:`token_log_probs` works through the tokens in chunks of at most ``chunk_tokens``: the forward
keeps only lse_t per token, and the backward recomputes each chunk's logits from h and W. At any
moment one chunk's [chunk, V] logits exist, in the forward and in the backward. The numerics are
the unchunked path's: logits in the weights' dtype, then softmax terms in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**25
"""Logits per chunk (128 MiB in float32): 220 tokens of a 151,936-token vocabulary, 682 of 49,152.
Fewer tokens per chunk make the output layer's matmuls too small to run at full speed."""


def chunk_size(vocabulary: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocabulary)


def token_log_probs(
    hidden: Tensor, lm_head: nn.Module, tokens: Tensor, temperature: float, *, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """logp_t and H_t of ``tokens`` [N] given the final hidden states ``hidden`` [N, H] that predict
    them, both float32 [N]; only logp_t carries a gradient (to ``hidden`` and the output layer).

    ``lm_head`` is the model's output layer. A plain ``nn.Linear`` goes through the fused chunked
    function below; anything else (its weight sharded by ZeRO-3, a layer of another kind) is called
    chunk by chunk under activation checkpointing, which holds as little but recomputes more.
    """
    chunk_tokens = chunk_tokens or chunk_size(_vocabulary(lm_head))
    weight = getattr(lm_head, "weight", None)
    if type(lm_head) is nn.Linear and not hasattr(weight, "ds_id"):
        return _ChunkedLogProbs.apply(hidden, weight, lm_head.bias, tokens, temperature, chunk_tokens)
    return _checkpointed_log_probs(hidden, lm_head, tokens, temperature, chunk_tokens)


class _ChunkedLogProbs(torch.autograd.Function):
    """logp_t and H_t of every token, chunk by chunk; saves h, W and lse_t, recomputes z in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_tokens):
        logps = hidden.new_empty(len(tokens), dtype=torch.float32)
        entropy, logsumexp = torch.empty_like(logps), torch.empty_like(logps)
        for rows in _chunks(len(tokens), chunk_tokens):
            logits = _logits(hidden[rows], weight, bias, temperature)
            logsumexp[rows] = lse = logits.logsumexp(dim=-1)
            log_probs = logits.sub_(lse[:, None])
            logps[rows] = log_probs.gather(-1, tokens[rows, None]).squeeze(-1)
            entropy[rows] = -torch.exp(log_probs).mul_(log_probs).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, tokens, logsumexp)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, tokens, logsumexp = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        # Each chunk's product in the weights' dtype, as the unchunked matmul; their sum in float32.
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        for rows in _chunks(len(tokens), ctx.chunk_tokens):
            logits = _logits(hidden[rows], weight, bias, ctx.temperature)
            g = grad_logps[rows, None].float()
            grad_logits = logits.sub_(logsumexp[rows, None]).exp_().mul_(-g)  # −g·p, in place
            grad_logits.scatter_add_(-1, tokens[rows, None], g).div_(ctx.temperature)  # + g·onehot, / τ
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None and grad_weight.dtype == grad_logits.dtype:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])  # in place: no second [V, H] tensor
            elif grad_weight is not None:
                grad_weight += grad_logits.t() @ hidden[rows]
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _logits(hidden, weight, bias, temperature) -> Tensor:
    """z = (W h + b) / τ in float32, computed in the weights' dtype as the model's own layer would."""
    logits = F.linear(hidden, weight, bias)
    logits = logits if logits.dtype == torch.float32 else logits.float()  # a new tensor either way
    return logits.div_(temperature)


def _checkpointed_log_probs(hidden, lm_head, tokens, temperature, chunk_tokens):
    """The same through ``lm_head`` itself, one checkpointed chunk at a time: its hooks (ZeRO-3's
    gathering of a sharded weight) run in the forward and again in the backward's recomputation."""

    def chunk(hidden_rows, token_rows):
        log_probs = torch.log_softmax(lm_head(hidden_rows).float() / temperature, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return log_probs.gather(-1, token_rows[:, None]).squeeze(-1), entropy.detach()

    parts = [
        checkpoint(chunk, hidden[rows], tokens[rows], use_reentrant=False)
        if torch.is_grad_enabled()
        else chunk(hidden[rows], tokens[rows])
        for rows in _chunks(len(tokens), chunk_tokens)
    ]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([logps for logps, _ in parts]), torch.cat([entropy for _, entropy in parts])


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _vocabulary(lm_head: nn.Module) -> int:
    weight = lm_head.weight
    assert isinstance(weight, Tensor)  # an output layer holds its [vocabulary, hidden] weight
    return weight.shape[0]

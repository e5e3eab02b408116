"""The training forward: the final hidden states that predict completion tokens, with each distinct
prompt of a batch run through the model once instead of once per completion.

Each row of a batch is a left-padded prompt then a right-padded completion, so every completion
starts at the same column P and the states that predict its tokens are those of columns P − 1 to
P + T − 2: the prompt's last token, then the completion's. The forward splits there:

1. the prompt columns before P − 1 run once per distinct prompt (rows whose columns there hold the
   same tokens and padding), and a :class:`PromptStates` cache keeps each layer's keys and values;
2. every row's columns from P − 1 on run with its prompt's keys and values in front of its own,
   through a :class:`StatesAfterPrompts` cache; the attention mask and position ids are the
   batch's own columns, so pad keys stay masked and positions continue from each prompt's length.

The log-probs and their gradient are those of one forward per row: a row's keys and values of the
prompt are its prompt's, and the gradient reaches the weights through them (their selection per
row sums the rows' gradients back onto the prompt's states).

Gradient checkpointing recomputes a layer's forward in the backward, calling its cache's update a
second time; transformers' caches append, so it drops them under checkpointing. These two are exact
under recomputation: the first stores (not appends) the same states again, the second only reads.
So their layers keep the cache (transformers' ``_can_checkpoint_with_cache``, meant for layers that
only read one). The layers must be checkpointed non-reentrantly (grpo_trainer.engine): the prompt's
states reach them through the cache, not as arguments, and a reentrant checkpoint would drop their
gradient.

Each weight then serves two passes (and a tied input embedding the output layer too), and autograd
holds a weight's gradient from one use until its last use's arrives: from the completions' pass,
which the backward reaches first, until the prompts' pass, whose backward comes last. That is a
second copy of the weights' gradients held to the end of the backward, where the CPU example's step
peaks (its whole run peaked 0.30 to 0.35 GB higher with it: benchmarks/README.md). So under a
DeepSpeed engine at stage 0, whose backward leaves plain gradients in the parameters' .grad, each
pass runs on aliases of the weights, leaves of their own on the same storage, and each alias's
gradient is added into its parameter's as it arrives, one layer's at a time. Not under ZeRO, whose
hooks take each gradient as autograd accumulates it, nor for a bare model, whose gradients may be
asked of torch.autograd.grad.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch.func import functional_call
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.modeling_layers import GradientCheckpointingLayer


def completion_hidden_states(model, input_ids, attention_mask, position_ids, width: int) -> torch.Tensor:
    """[B, T, H]: the decoder's final hidden state (after its final norm) that predicts each of the
    T completion tokens of a batch [B, P + T], column t for token t. ``model`` is a causal LM or the
    DeepSpeed engine around one; it runs without its output layer."""
    causal_lm = getattr(model, "module", model)  # the model itself under the DeepSpeed engine
    split = input_ids.shape[1] - width - 1  # the column of the prompts' last token
    no_logits = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    if split < 1 or not shares_prompts(causal_lm):  # one forward of every row's whole sequence
        with _final_hidden_states(causal_lm) as hidden:
            _on_aliased_weights(model)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, logits_to_keep=no_logits)
        return hidden[0][:, -width - 1 : -1]

    # Rows with the same prompt columns, pad or token, share one prompt forward (whatever their group).
    prompt_columns = input_ids[:, :split].masked_fill(attention_mask[:, :split] == 0, -1)
    distinct, prompt_of_row = torch.unique(prompt_columns, dim=0, return_inverse=True)
    # A row of each distinct prompt: any of them, as they hold the same columns.
    row_of_prompt = torch.empty(len(distinct), dtype=torch.long, device=input_ids.device)
    row_of_prompt.scatter_(0, prompt_of_row, torch.arange(len(input_ids), device=input_ids.device))

    prompts = PromptStates()
    with _keeping_caches_under_checkpointing(causal_lm):
        _on_aliased_weights(model)(
            input_ids=input_ids[row_of_prompt, :split],
            attention_mask=attention_mask[row_of_prompt, :split],
            position_ids=position_ids[row_of_prompt, :split],
            cache=prompts,
            use_cache=False,  # the cache is ours: use_cache only asks the model to make one
            logits_to_keep=no_logits,
        )
        with _final_hidden_states(causal_lm) as hidden:
            _on_aliased_weights(model)(
                input_ids=input_ids[:, split:-1],
                attention_mask=attention_mask[:, :-1],  # the prompt's columns, then the row's own
                position_ids=position_ids[:, split:-1],
                cache=StatesAfterPrompts(prompts, prompt_of_row),
                use_cache=False,
                logits_to_keep=no_logits,
            )
    return hidden[0]


def _on_aliased_weights(model):
    """A DeepSpeed engine at stage 0 as a callable that runs on aliases of its trainable weights, each
    alias's gradient added into its parameter's when autograd has accumulated it (see the module's
    docstring); anything else, or without gradients, as it is."""
    zero_stage = getattr(model, "zero_optimization_stage", None)  # a DeepSpeed engine's
    if zero_stage is None or zero_stage() != 0 or not torch.is_grad_enabled():
        return model
    aliases = {}
    for name, parameter in model.named_parameters():
        aliases[name] = alias = parameter.detach().requires_grad_(parameter.requires_grad)
        if parameter.requires_grad:
            alias.register_post_accumulate_grad_hook(_adding_into(parameter))
    return lambda **kwargs: functional_call(model, aliases, args=(), kwargs=kwargs)


def _adding_into(parameter: torch.Tensor):
    def add(alias: torch.Tensor) -> None:
        gradient, alias.grad = alias.grad, None
        assert gradient is not None  # the hook runs once autograd has accumulated it
        if parameter.grad is None:
            parameter.grad = gradient
        else:
            parameter.grad.add_(gradient)

    return add


def shares_prompts(causal_lm) -> bool:
    """Whether every layer of ``causal_lm`` attends to all earlier tokens through a cache of plain
    keys and values (no sliding window, no linear attention, no layer reusing another's cache):
    the layers the shared-prompt caches stand in for."""
    layer_types, _ = get_layer_types_and_kwargs(causal_lm.config.get_text_config(decoder=True))
    return set(layer_types) == {"full_attention"}


class PromptStates(Cache):
    """Each layer's keys and values of the distinct prompts [U, heads, S, head size], as their forward
    computes them."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_StoredStates)

    @property
    def stored_layers(self) -> list[_StoredStates]:
        """Its layers, each a _StoredStates: the class it replicates for every layer its forward runs."""
        return cast("list[_StoredStates]", self.layers)


class _StoredStates(DynamicLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        # Stores rather than appends: a checkpointed layer's recomputation stores the same states again.
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class StatesAfterPrompts(Cache):
    """Each row's prompt keys and values in front of the row's own: row b attends to prompt
    ``prompt_of_row[b]`` of ``prompts``. Nothing is stored, so a recomputation reads the same states."""

    def __init__(self, prompts: PromptStates, prompt_of_row: torch.Tensor):
        layers: list[Any] = [_StatesAfterPrompt(layer, prompt_of_row) for layer in prompts.stored_layers]
        super().__init__(layers=layers)


class _StatesAfterPrompt(DynamicLayer):
    def __init__(self, prompt: _StoredStates, prompt_of_row: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = prompt.keys, prompt.values, True
        self.prompt_of_row = prompt_of_row

    def update(self, key_states, value_states, *args, **kwargs):
        prompt_keys, prompt_values = self.keys, self.values
        assert prompt_keys is not None and prompt_values is not None  # the prompt's, set at construction
        # One copy of the prompt's states per row: the attention takes each row's keys as one tensor.
        keys = torch.cat([prompt_keys.index_select(0, self.prompt_of_row), key_states], dim=-2)
        values = torch.cat([prompt_values.index_select(0, self.prompt_of_row), value_states], dim=-2)
        return keys, values


@contextmanager
def _keeping_caches_under_checkpointing(causal_lm) -> Iterator[None]:
    """Checkpointed decoder layers keep the cache they are given (see the module's docstring)."""
    layers = [module for module in causal_lm.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class's own again


@contextmanager
def _final_hidden_states(causal_lm) -> Iterator[list[torch.Tensor]]:
    """A list that receives the decoder's last hidden state [B, S, H] (after its final norm) when
    ``causal_lm`` runs: the input of its output layer."""
    hidden: list[torch.Tensor] = []
    hook = causal_lm.get_decoder().register_forward_hook(lambda module, args, output: hidden.append(output[0]))
    try:
        yield hidden
    finally:
        hook.remove()

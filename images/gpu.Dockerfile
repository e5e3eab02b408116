# syntax=docker/dockerfile:1
# The GPU images: target `trainer` (the training container: torchrun over grpo_trainer, DeepSpeed)
# and target `vllm` (the generation sidecar, `python -m grpo_trainer.vllm_server`, and the
# evaluation Jobs, `grpo eval`), each from its own Python environment. They cannot share one:
# vLLM 0.34.0 pins torch==2.14.0 and transformers<5.23, the trainer needs transformers>=5.25. The
# trainer needs no vLLM: it talks to the sidecar over HTTP and sends weights over NCCL itself
# (grpo_trainer.nccl loads the libnccl.so.2 of torch's nvidia-nccl-cu* dependency).
# CUDA comes with PyTorch's wheels and the driver from the node, so the base is plain Python.
# Built from the repository root by scripts/build-images.sh.
FROM python:3.12.11-slim-bookworm AS sources
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY trainer /src/trainer

FROM python:3.12.11-slim-bookworm AS build-trainer
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, at vLLM's version: DeepSpeed's source build needs it (no build isolation). No CUDA
# ops are compiled: the trainer steps torch's AdamW, and DeepSpeed only shards its state.
RUN pip install --no-cache-dir torch==2.14.0 setuptools==80.9.0 wheel==0.45.1 \
 && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
COPY --from=sources /src /src
RUN pip install --no-cache-dir "/src[trainer]"

FROM python:3.12.11-slim-bookworm AS build-vllm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=sources /src /src
# vLLM and what grpo eval and the sidecar need beside it; torch and transformers at vLLM's pins.
RUN pip install --no-cache-dir vllm==0.34.0 "/src[eval]"

FROM python:3.12.11-slim-bookworm AS runtime
# The user the run's pods run as (manifests.USER_ID); HOME is an emptyDir there.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/grpo grpo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/grpo
USER 1000:1000
WORKDIR /home/grpo

FROM runtime AS trainer
COPY --from=build-trainer /opt/venv /opt/venv
# The pod runs `torchrun ... -m grpo_trainer.cli train /etc/grpo/run.yaml`; this is the same by hand.
ENTRYPOINT ["grpo"]
CMD ["train", "/etc/grpo/run.yaml"]

FROM runtime AS vllm
COPY --from=build-vllm /opt/venv /opt/venv
# The sidecar's entry point; evaluation Jobs run `python -m grpo_trainer.cli eval ...` (grpo eval).
ENTRYPOINT ["python", "-m", "grpo_trainer.vllm_server"]

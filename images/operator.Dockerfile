# syntax=docker/dockerfile:1
# The operator: `grpo operator`, with the [operator] extra only (kopf, the Kubernetes client,
# prometheus-client): no torch. Built from the repository root by scripts/build-images.sh.
FROM python:3.12.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY trainer /src/trainer
RUN /opt/venv/bin/pip install --no-cache-dir "/src[operator]"

# The same base as the build stage: the venv's python is the base image's.
FROM python:3.12.11-slim-bookworm
# The user the chart's Deployment runs as (runAsUser 1000).
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/grpo grpo
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/grpo
ENTRYPOINT ["grpo", "operator"]
CMD ["--all-namespaces"]

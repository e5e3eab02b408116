"""The operator's Prometheus metrics, served by ``grpo operator --metrics-port`` on /metrics.

Counters count what this operator process did since it started; ``grpo_operator_runs`` is the
phase of each run as its reconcile loop last decided it, so it covers the runs this process watches.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import get_args

import prometheus_client
from prometheus_client.core import GaugeMetricFamily

from grpo_trainer.spec import Phase

RECONCILE_PASSES = prometheus_client.Counter(
    "grpo_operator_reconcile_passes", "Reconcile passes over a run, failed ones included."
)
RECONCILE_ERRORS = prometheus_client.Counter(
    "grpo_operator_reconcile_errors", "Reconcile passes that failed on an API error (each is retried)."
)
POD_RECREATIONS = prometheus_client.Counter(
    "grpo_operator_pod_recreations", "Pods created for a run after its first attempt: a failure retried, or a resume."
)


class RunPhases:
    """A collector: how many runs are in each phase, from each run's last reconcile pass."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def record(self, namespace: str, name: str, phase: str | None) -> None:
        if phase is not None:
            self.phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        self.phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("grpo_operator_runs", "GRPORuns by phase.", labels=["phase"])
        counts = collections.Counter(self.phases.values())
        for phase in get_args(Phase):  # every phase, 0 too: a dashboard's series never vanish
            family.add_metric([phase], counts[phase])
        yield family


RUNS = RunPhases()
prometheus_client.REGISTRY.register(RUNS)


def serve(port: int) -> None:
    """Serve /metrics on every interface at ``port``, from a thread of its own."""
    prometheus_client.start_http_server(port)

"""One reconcile pass of a run: read the run, its evaluation Jobs and its pods, decide, act.

The pass makes its API calls through :class:`~grpo_operator.cluster.Cluster`, synchronously, in the
thread it is given (a worker of the run's loop, or the new-run lane's); :func:`grpo_operator.state.decide`
does the deciding. It returns the Kubernetes events to post rather than posting them: kopf posts
events only from its own tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

from grpo_operator import manifests, metrics
from grpo_operator.cluster import Cluster
from grpo_operator.manifests import EVALUATION_LABEL
from grpo_operator.state import (
    ABSENT,
    Event,
    decide,
    observe_evaluations,
    observe_pod,
    owned,
    validate_body,
    watches_evaluations,
)
from grpo_trainer.spec import GRPORun, GRPORunStatus
from grpo_trainer.validation import FieldError

OPERATOR_STATUS_FIELDS = frozenset({
    "phase", "conditions", "observed_generation", "attempt", "restarts", "start_time", "completion_time", "message",
    "evaluations", "scores", "best_checkpoint", "validated_spec",
})
"""The status fields the operator writes. The trainer writes the others (progress, latestCheckpoint);
patching only these leaves its reports alone, whatever their age in the operator's read. The
operator is the one writer of the scores: evaluation Jobs only leave them in their pods'
termination messages."""


@dataclass
class Validation:
    """validate_body of the run's current generation, kept: its CEL rules take tens of
    milliseconds, and the spec changes only with the generation."""

    generation: int | None = None
    result: GRPORun | list[FieldError] | None = None

    def of(self, body: Mapping[str, Any]) -> GRPORun | list[FieldError]:
        generation = body["metadata"]["generation"]
        if self.result is None or generation != self.generation:
            self.generation, self.result = generation, validate_body(body)
        return self.result


@dataclass(frozen=True)
class Pass:
    requeue_at: datetime | None
    """When to come back even if nothing changes."""
    read: Mapping[str, str]
    """The resourceVersion of each pod and Job the pass listed, by uid."""
    events: tuple[Event, ...] = ()
    """The Kubernetes events for the run, to post now: the status they tell of is patched."""


def reconcile(
    cluster: Cluster,
    namespace: str,
    name: str,
    validation: Validation,
    default_images: Mapping[str, str] = manifests.DEFAULT_IMAGES,
    watched: Mapping[str, Any] | None = None,
) -> Pass:
    """One pass: read the run (or take ``watched``, the run as watched, when the caller knows it is
    recent enough: see handlers.reconcile_loop), then its evaluation Jobs if it has any to watch,
    then its pods (in that order, as decide requires), decide, act. A run that names no images gets
    ``default_images``."""
    metrics.RECONCILE_PASSES.inc()
    body = watched if watched is not None else cluster.read_run(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Pass(None, {})  # kopf stops this loop
    run = validation.of(body)
    stored = body.get("status") or {}
    status = GRPORunStatus.model_validate(stored)
    spec = run.spec if isinstance(run, GRPORun) else run
    listed_jobs = cluster.list_jobs(body) if watches_evaluations(spec, status) else []
    listed_pods = cluster.list_pods(body)
    uid = body["metadata"]["uid"]
    jobs = owned(listed_jobs, {uid})
    pods = owned(listed_pods, {uid, *(job["metadata"]["uid"] for job in jobs)})
    read = {obj["metadata"]["uid"]: obj["metadata"]["resourceVersion"] for obj in (*listed_jobs, *listed_pods)}
    trainers, evaluators = [], []
    for pod in pods:
        (evaluators if EVALUATION_LABEL in (pod["metadata"].get("labels") or {}) else trainers).append(pod)
    newest = max(map(observe_pod, trainers), key=attrgetter("attempt"), default=ABSENT)
    evaluations = observe_evaluations(jobs, evaluators)
    now = datetime.now(UTC)
    decision = decide(spec, status, newest, generation=body["metadata"]["generation"], now=now, evaluations=evaluations)
    metrics.RUNS.record(namespace, name, decision.status.phase)

    if decision.create_pod is not None and isinstance(run, GRPORun):
        # What the pod mounts and runs as first: the pod names its ConfigMap and ServiceAccount.
        for build in (manifests.config_map, manifests.service_account, manifests.role, manifests.role_binding):
            cluster.apply(build(run))
        pod = manifests.pod(run, attempt=decision.create_pod, default_images=default_images)
        if cluster.create(pod) and decision.create_pod > 1:  # False: it exists already, adopted next pass
            metrics.POD_RECREATIONS.inc()
    if decision.create_jobs and isinstance(run, GRPORun):
        cluster.apply(manifests.evaluation_service_account(run))
        for checkpoint in decision.create_jobs:
            job = manifests.evaluation_job(run, checkpoint, default_images=default_images)
            cluster.create(job)  # exists already: observed next pass
    if decision.delete_pod is not None:
        cluster.delete_pod(namespace, decision.delete_pod)
    change = status_patch(stored, decision.status)
    if change:
        cluster.patch_status(namespace, name, change)
    if decision.delete_run:
        cluster.delete_run(namespace, name)
    return Pass(decision.requeue_at, read, decision.events)


def status_patch(stored: Mapping[str, Any], decided: GRPORunStatus) -> dict[str, Any]:
    """The merge patch that takes the operator's fields of the status as stored to the decided ones
    (null removes a field); empty if they are the same."""
    new = decided.model_dump(mode="json", by_alias=True, include=set(OPERATOR_STATUS_FIELDS))
    return {key: value for key, value in new.items() if stored.get(key) != value}

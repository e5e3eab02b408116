"""What a GRPORun should become: a pure function of its spec, its stored status, its pod and its
evaluation Jobs.

The kopf handlers read the run, its evaluation Jobs and its pods, call :func:`observe_pod`,
:func:`observe_evaluations` and :func:`decide`, and carry the :class:`Decision` out: create or
delete the pod, create evaluation Jobs, patch the status, emit the events, come back at
``requeue_at``. Nothing here does I/O or reads the clock (``now`` is passed in), so every
transition is a row in a test table. ``decide`` is level-based, like a controller-runtime
reconciler: it looks only at what is stored and observed now, never at the event that woke it, so a
repeated or missed event, or an operator restart, changes nothing.

The attempt protocol: ``status.attempt`` numbers the current attempt, and condition Created says
whether its pod was made. A pod is created only while no pod of the run is live, under the
deterministic ``pod_name(run, attempt)``, so a repeated create fails with AlreadyExists instead of
starting a second trainer on the same checkpoints. The handler creates the pod, then patches the
status; if it dies in between, the next call sees a pod whose attempt is higher than the status says
and adopts it. Pods of ended attempts are kept for their logs, as a Job keeps its failed pods; the
run owns them, so they go with it.

Phases: Pending → Running → Succeeded, or Running → Evaluating → Succeeded when the run has
benchmarks to evaluate its checkpoints on. Failed and Succeeded are final; Suspended is left when
spec.suspend is set back to false.

Evaluation: one batch/v1 Job per checkpoint, named ``job_name(run, step)`` so that a repeated
create is AlreadyExists, as for pods. ``spec.evaluation.checkpoints: final`` evaluates the
checkpoint the completed trainer names in its termination message; ``every`` also evaluates each
``status.latestCheckpoint`` the trainer reports while it trains (a checkpoint overtaken by the
next before any pass saw it, hours apart at the default everySteps, goes unevaluated; the operator
wakes on each report). A completed run waits in
Evaluating until each of its Jobs has finished (neither spec.suspend nor activeDeadlineSeconds
applies there: each Job has its own deadline), then Succeeded. A Job that fails for good (its
backoffLimit, its deadline, bad input) is condition EvaluationFailed with the Job's reason and
never fails a trained run. The operator is the one writer of ``status.evaluations``,
``status.scores`` and ``status.bestCheckpoint``: each pass unions the stored scores with those in
the termination messages of every finished Job's pod, so Jobs finishing together, or a status read
before an earlier pass's write, lose nothing. ``scores.best_step`` with ``spec.evaluation.selectBy``
picks the best checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from operator import attrgetter
from typing import Any, Literal

from pydantic import ValidationError

from grpo_operator.manifests import ATTEMPT_LABEL, CHECKPOINT_ANNOTATION, EVALUATION_LABEL
from grpo_trainer.scores import best_step
from grpo_trainer.spec import (
    BENCHMARKS,
    BenchmarkScore,
    CheckpointRef,
    Condition,
    GRPORun,
    GRPORunSpec,
    GRPORunStatus,
    Phase,
    Scores,
)
from grpo_trainer.termination import EXIT_INVALID, EXIT_STORAGE_FULL, STORAGE_FULL, Outcome, TerminationMessage
from grpo_trainer.validation import FieldError, ManifestError, cel_digest, validate_manifest

FINISHED: tuple[Phase, ...] = ("Succeeded", "Failed")
"""Phases in which nothing starts any more: no pod, no evaluation Job."""

BACKOFF_BASE_SECONDS = 10
BACKOFF_CAP_SECONDS = 300


def backoff_delay(restarts: int) -> timedelta:
    """The wait before the attempt after the ``restarts``-th failure: 10 s, 20 s, 40 s … capped at
    5 minutes, as a Job backs off before recreating a failed pod."""
    doublings = min(max(restarts - 1, 0), 16)  # 2**16 × 10 s is far past the cap; no huge numbers
    return timedelta(seconds=min(BACKOFF_BASE_SECONDS * 2**doublings, BACKOFF_CAP_SECONDS))


# ------------------------------------------------------------------------------------- the pod


class PodState(StrEnum):
    ABSENT = "Absent"
    PENDING = "Pending"  # not started yet: unschedulable, pulling images, the vLLM server loading
    RUNNING = "Running"  # the trainer container runs
    COMPLETED = "Completed"  # trained to maxSteps
    PREEMPTED = "Preempted"  # stopped on SIGTERM after a checkpoint
    FAILED_PERMANENT = "FailedPermanent"  # bad input: no retry fixes it
    FAILED_RETRYABLE = "FailedRetryable"  # a crash, OOM, eviction, lost node, disruption


@dataclass(frozen=True)
class PodObservation:
    state: PodState
    name: str = ""
    attempt: int = 0
    live: bool = False
    """The pod is not finished: it may hold GPUs, and a trainer in it may still write checkpoints."""
    trainer_running: bool = False
    """The trainer has not exited (or may not have: a lost node): stopping it takes a delete."""
    deleting: bool = False
    reason: str = ""  # CamelCase, for conditions and events
    message: str = ""
    termination: TerminationMessage | None = None
    vllm_ready: bool | None = None


ABSENT = PodObservation(PodState.ABSENT)

# metav1.Condition's reason, as spec.Condition and the API server require it.
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_MESSAGE_DETAIL_CHARS = 500


def _reason(text: Any, default: str) -> str:
    """``text`` when it can be a condition reason (Kubernetes' own are); else ``default``. Pod
    reasons such as OutOfnvidia.com/gpu and a trainer's free-form reason cannot."""
    return text if isinstance(text, str) and len(text) <= 1024 and _REASON.match(text) else default


def owned(objects: Iterable[Mapping[str, Any]], owners: Collection[str]) -> list[Mapping[str, Any]]:
    """The objects that one of ``owners`` (uids) owns. A run's labels alone are not enough: a
    deleted run of the same name may have left pods and Jobs for the garbage collector to remove."""
    return [obj for obj in objects if any(ref.get("uid") in owners for ref in obj["metadata"].get("ownerReferences") or [])]


def observe_pod(pod: Mapping[str, Any] | None) -> PodObservation:
    """Classify a pod of the run, as the API server returns it (None: there is none)."""
    if not pod:
        return ABSENT
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = metadata.get("name", "")
    phase = status.get("phase") or "Pending"
    live = phase not in ("Succeeded", "Failed")
    trainer = next(iter(status.get("containerStatuses") or []), {})  # the pod's one regular container
    terminated = _state(trainer, "terminated")

    def seen(state: PodState, reason: str, message: str, termination=None, vllm_ready=None) -> PodObservation:
        return PodObservation(
            state,
            name=name,
            attempt=_attempt(metadata),
            live=live,
            trainer_running=live and terminated is None,
            deleting=metadata.get("deletionTimestamp") is not None,
            reason=reason,
            message=message,
            termination=termination,
            vllm_ready=vllm_ready,
        )

    disruption = _condition(status, "DisruptionTarget")
    if status.get("reason") == "Evicted":  # the kubelet's, under node pressure
        return seen(PodState.FAILED_RETRYABLE, "Evicted", f"pod {name}: {status.get('message') or 'evicted'}")
    if disruption is not None and disruption.get("status") == "True":  # preemption, drain, taint, GC
        reason = _reason(disruption.get("reason"), "Disrupted")
        return seen(PodState.FAILED_RETRYABLE, reason, f"pod {name}: {disruption.get('message') or reason}")
    if phase == "Unknown":
        return seen(PodState.FAILED_RETRYABLE, "NodeLost", f"pod {name}: its node stopped reporting (phase Unknown)")
    if terminated is not None:
        return seen(*_ended(name, terminated))
    if not live:  # failed before the trainer ran, e.g. rejected at admission by the kubelet
        reason = _reason(status.get("reason"), "PodFailed")
        return seen(PodState.FAILED_RETRYABLE, reason, f"pod {name}: {status.get('message') or reason}")
    if _state(trainer, "running") is not None:
        sidecars = status.get("initContainerStatuses") or []
        vllm_ready = all(c.get("ready") for c in sidecars) if sidecars else None
        message = f"pod {name}: the trainer is running" + ("; the vLLM server is not ready" if vllm_ready is False else "")
        return seen(PodState.RUNNING, "Training", message, vllm_ready=vllm_ready)
    return seen(PodState.PENDING, *_pending(name, status))


def _ended(name: str, terminated: Mapping[str, Any]) -> tuple[PodState, str, str, TerminationMessage | None]:
    """How the trainer ended, from its exit code and its termination message (or log tail)."""
    code = terminated.get("exitCode")
    text = terminated.get("message") or ""
    said = TerminationMessage.parse(text)
    step = f" at step {said.step}" if said and said.step is not None else ""
    # The trainer writes completed/preempted only once its checkpoint is complete, so the message
    # decides whatever the exit code: torchrun exits 1 after passing SIGTERM on, even when every
    # rank stopped cleanly.
    if said and said.outcome is Outcome.PREEMPTED:
        where = f" to {said.checkpoint_uri}" if said.checkpoint_uri else ""
        return PodState.PREEMPTED, "Preempted", f"pod {name}: the trainer stopped on SIGTERM and checkpointed{step}{where}", said
    if said and said.outcome is Outcome.COMPLETED:
        return PodState.COMPLETED, "TrainingCompleted", f"pod {name}: training completed{step}", said
    if code == 0:  # trying again is safe (it resumes, or completes at once), declaring success is not
        message = f"pod {name}: the trainer exited 0 but left no termination message saying how it ended"
        return PodState.FAILED_RETRYABLE, "UnknownOutcome", message, said
    detail = said.message if said else _last_line(text)
    if code == EXIT_INVALID or (said and said.outcome is Outcome.INVALID):
        reason = _reason(said.reason if said else None, "InvalidInput")
        return PodState.FAILED_PERMANENT, reason, f"pod {name}: {detail or 'the trainer rejected its input'}", said
    # A new pod would mount the same full volume and fail at the same save (termination.py).
    if code == EXIT_STORAGE_FULL or (said and said.outcome is Outcome.FAILED and said.reason == STORAGE_FULL):
        return PodState.FAILED_PERMANENT, STORAGE_FULL, f"pod {name}: {detail or 'a checkpoint did not fit'}", said
    # The trainer's own reason (WeightSyncFailed) where it gave one, else the kubelet's: OOMKilled, Error, ...
    said_reason = said.reason if said and said.outcome is Outcome.FAILED else None
    reason = _reason(said_reason or terminated.get("reason"), "Error")
    message = f"pod {name}: the trainer exited with code {code} ({reason})" + (f": {detail}" if detail else "")
    return PodState.FAILED_RETRYABLE, reason, message, said


def _pending(name: str, status: Mapping[str, Any]) -> tuple[str, str]:
    """Why a pod has not started its trainer: the scheduler's word, or a stuck container's."""
    scheduled = _condition(status, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        reason = _reason(scheduled.get("reason"), "Unschedulable")
        return reason, f"pod {name}: {scheduled.get('message') or 'not scheduled yet'}"
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = _state(container, "waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            reason = _reason(waiting["reason"], "ContainerWaiting")  # ImagePullBackOff, CreateContainerConfigError, …
            return reason, f"pod {name}: container {container.get('name')}: {waiting.get('message') or reason}"
    return "Starting", f"pod {name}: starting (the vLLM server loads the model before the trainer starts)"


def _attempt(metadata: Mapping[str, Any]) -> int:
    value = (metadata.get("labels") or {}).get(ATTEMPT_LABEL, "")
    return int(value) if value.isdigit() else 0


def _state(container: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return (container.get("state") or {}).get(name)


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _last_line(log_tail: str) -> str:
    """The last line of a log tail (FallbackToLogsOnError), usually the exception."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    return lines[-1][-_MESSAGE_DETAIL_CHARS:] if lines else ""


# --------------------------------------------------------------------------- evaluation Jobs


class EvaluationState(StrEnum):
    RUNNING = "Running"  # not finished: pending, evaluating, or retrying a failed pod
    SUCCEEDED = "Succeeded"  # its pod's termination message carries the scores
    FAILED = "Failed"  # for good: out of retries or time, bad input, or ended without scores


@dataclass(frozen=True)
class EvaluationObservation:
    step: int
    """The step of the checkpoint the Job evaluates."""
    name: str
    state: EvaluationState
    checkpoint_uri: str = ""
    scores: tuple[BenchmarkScore, ...] = ()
    reason: str = ""  # CamelCase, for conditions and events: the Job's own (DeadlineExceeded, ...)
    message: str = ""


def observe_evaluations(
    jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> tuple[EvaluationObservation, ...]:
    """Classify the run's evaluation Jobs, as the API server returns them, with the pods each
    owns (the termination messages are on the pods). Jobs without a step label are not ours."""
    pods_of: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
            if owner.get("kind") == "Job":
                pods_of.setdefault(owner.get("uid"), []).append(pod)
    seen = []
    for job in jobs:
        metadata = job.get("metadata") or {}
        step = (metadata.get("labels") or {}).get(EVALUATION_LABEL, "")
        if step.isdigit():
            owned = sorted(pods_of.get(metadata.get("uid", ""), []), key=_created)
            seen.append(_evaluation(job, int(step), owned))
    return tuple(sorted(seen, key=attrgetter("step")))


def _evaluation(job: Mapping[str, Any], step: int, pods: Sequence[Mapping[str, Any]]) -> EvaluationObservation:
    metadata = job.get("metadata") or {}
    name = metadata.get("name", "")
    uri = (metadata.get("annotations") or {}).get(CHECKPOINT_ANNOTATION, "")

    def seen(state: EvaluationState, reason: str = "", message: str = "", scores=()) -> EvaluationObservation:
        return EvaluationObservation(step, name, state, uri, tuple(scores), reason, message)

    problem = ""  # what was wrong with the last scores a pod reported
    detail = ""  # how the last failed pod ended
    for pod in pods:
        container = next(iter((pod.get("status") or {}).get("containerStatuses") or []), {})
        terminated = _state(container, "terminated")
        if terminated is None:
            continue
        text = terminated.get("message") or ""
        said = TerminationMessage.parse(text)
        if said and said.outcome is Outcome.EVALUATED:
            try:
                scores = _scores(said, step)
            except ValueError as error:
                problem = f"pod {pod['metadata'].get('name')}: {error}"
            else:
                return seen(EvaluationState.SUCCEEDED, "Evaluated", f"job {name}: evaluated step {step}", scores)
        elif terminated.get("exitCode") != 0:
            words = said.message if said and said.message else _last_line(text)
            code = f"exited with code {terminated.get('exitCode')} ({_reason(terminated.get('reason'), 'Error')})"
            detail = f"pod {pod['metadata'].get('name')} {code}" + (f": {words}" if words else "")
    status = job.get("status") or {}
    failed = _condition(status, "Failed")
    if failed is not None and failed.get("status") == "True":
        reason = _reason(failed.get("reason"), "JobFailed")  # BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy
        said = f"job {name}: {failed.get('message') or reason}"
        return seen(EvaluationState.FAILED, reason, "; ".join(filter(None, [said, problem, detail])))
    complete = _condition(status, "Complete")
    if complete is not None and complete.get("status") == "True":
        why = problem or "grpo eval exited 0 without a termination message carrying scores"
        return seen(EvaluationState.FAILED, "InvalidScores" if problem else "NoScores", f"job {name}: {why}")
    return seen(EvaluationState.RUNNING, "Evaluating", f"job {name}: evaluating step {step}")


def _scores(said: TerminationMessage, step: int) -> list[BenchmarkScore]:
    """The scores of an evaluated termination message, each of them of checkpoint ``step``."""
    try:
        scores = [BenchmarkScore.model_validate(row) for row in said.scores]
    except ValidationError as error:
        raise ValueError(f"scores that are not BenchmarkScores ({error.error_count()} problems)") from None
    if not scores:
        raise ValueError("an evaluated termination message without scores")
    wrong = sorted({score.checkpoint_step for score in scores} - {step})
    if wrong:
        raise ValueError(f"scores of checkpoint step {wrong[0]}, not of step {step}")
    return scores


def _created(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return metadata.get("creationTimestamp") or "", metadata.get("name") or ""


def watches_evaluations(spec: GRPORunSpec | Sequence[FieldError], status: GRPORunStatus) -> bool:
    """Whether decide needs the run's evaluation Jobs observed: only while some may exist and
    matter, so a run that evaluates nothing, or not yet, costs no API call for them."""
    if not isinstance(spec, GRPORunSpec) or not spec.evaluation.enabled:
        return False
    if spec.evaluation.checkpoints == "every":
        return status.phase != "Succeeded"
    return status.phase == "Evaluating"


# ------------------------------------------------------------------------------------- the run


def validate_body(body: Mapping[str, Any]) -> GRPORun | list[FieldError]:
    """The run in a GRPORun object from the API server, or every problem of its spec (each naming
    its field). The status is ours, not the user's: it is left out, but for status.validatedSpec,
    the digest of the spec the operator last found valid: if the spec still has it (the same spec,
    the same CEL rules), the CEL rules are not evaluated again. The API server evaluated them too
    when it took the spec, but perhaps with an older CRD's rules, so that alone proves nothing."""
    manifest = {key: _plain(value) for key, value in body.items() if key != "status"}
    validated = (body.get("status") or {}).get("validatedSpec")
    try:
        return validate_manifest(manifest, source="GRPORun", passed_cel=validated if isinstance(validated, str) else None)
    except ManifestError as error:
        return error.errors


def _plain(value: Any) -> Any:
    """kopf's read-only mapping views as the dicts and lists pydantic's strict mode takes."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: GRPORunStatus
    create_pod: int | None = None
    """The attempt whose pod to create (manifests.pod(run, attempt=...)), after which the status is patched."""
    delete_pod: str | None = None
    """The name of a pod whose trainer must stop: it gets SIGTERM, checkpoints and exits."""
    create_jobs: tuple[CheckpointRef, ...] = ()
    """The checkpoints whose evaluation Jobs to create (manifests.evaluation_job), before the status is patched."""
    delete_run: bool = False
    """The run finished ttlSecondsAfterFinished ago."""
    requeue_at: datetime | None = None
    """Decide again at this time even if nothing changes: a backoff, the deadline, the TTL."""
    events: tuple[Event, ...] = ()
    """One per phase transition or failed attempt, and per evaluated checkpoint or failed
    evaluation, for the run's event list."""


ConditionStatus = bool | Literal["Unknown"]


@dataclass
class _Draft:
    """The status being decided, and what to do, built up by the steps of :func:`decide`."""

    old: GRPORunStatus
    generation: int
    now: datetime
    phase: Phase | None = None
    attempt: int = 0
    restarts: int = 0
    start_time: datetime | None = None
    completion_time: datetime | None = None
    message: str | None = None
    conditions: dict[str, Condition] = field(default_factory=dict)
    headline: Event | None = None
    create_pod: int | None = None
    delete_pod: str | None = None
    delete_run: bool = False
    requeue_at: datetime | None = None
    evaluations: list[BenchmarkScore] = field(default_factory=list)
    scores: Scores | None = None
    best_checkpoint: CheckpointRef | None = None
    create_jobs: list[CheckpointRef] = field(default_factory=list)
    validated_spec: str | None = None
    notes: list[Event] = field(default_factory=list)
    """Events beside the headline: evaluated checkpoints, failed evaluations."""

    @classmethod
    def of(cls, status: GRPORunStatus, *, generation: int, now: datetime) -> _Draft:
        return cls(
            old=status,
            generation=generation,
            now=now,
            phase=status.phase,
            attempt=status.attempt,
            restarts=status.restarts,
            start_time=status.start_time,
            completion_time=status.completion_time,
            message=status.message,
            conditions={condition.type: condition for condition in status.conditions},
            evaluations=list(status.evaluations),
            scores=status.scores,
            best_checkpoint=status.best_checkpoint,
        )

    def condition(self, kind: str) -> Condition | None:
        return self.conditions.get(kind)

    def is_true(self, kind: str) -> bool:
        condition = self.conditions.get(kind)
        return condition is not None and condition.status == "True"

    def set(self, kind: str, status: ConditionStatus, reason: str, message: str) -> None:
        """Set a condition; its lastTransitionTime moves only when its status flips from the stored one."""
        value: Literal["True", "False", "Unknown"] = status if isinstance(status, str) else "True" if status else "False"
        before = next((c for c in self.old.conditions if c.type == kind), None)
        self.conditions[kind] = Condition(
            type=kind,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=self.now if before is None or before.status != value else before.last_transition_time,
            observed_generation=self.generation,
        )

    def enter(self, phase: Phase | None, reason: str, message: str, *, warning: bool = False) -> None:
        """Say where the run is and why; an event goes out if the phase changed or an attempt failed."""
        self.phase, self.message = phase, message
        self.headline = Event("Warning" if warning else "Normal", reason, message)

    def requeue(self, at: datetime) -> None:
        self.requeue_at = at if self.requeue_at is None else min(self.requeue_at, at)

    def stop(self, pod: PodObservation) -> None:
        if pod.trainer_running and not pod.deleting:
            self.delete_pod = pod.name

    def fail(self, reason: str, message: str) -> None:
        self.set("Running", False, reason, message)
        self.set("Failed", True, reason, message)
        self.completion_time = self.now
        self.enter("Failed", reason, message, warning=True)

    def succeed(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.set("Succeeded", True, reason, message)
        self.completion_time = self.now
        self.enter("Succeeded", reason, message, warning=warning)

    def decision(self) -> Decision:
        status = self.old.model_copy(
            update={
                "phase": self.phase,
                "conditions": list(self.conditions.values()),
                "observed_generation": self.generation,
                "attempt": self.attempt,
                "restarts": self.restarts,
                "start_time": self.start_time,
                "completion_time": self.completion_time,
                "message": self.message,
                "evaluations": self.evaluations,
                "scores": self.scores,
                "best_checkpoint": self.best_checkpoint,
                "validated_spec": self.validated_spec,
            }
        )
        transition = self.phase != self.old.phase or self.restarts != self.old.restarts
        return Decision(
            status=status,
            create_pod=self.create_pod,
            delete_pod=self.delete_pod,
            create_jobs=tuple(self.create_jobs),
            delete_run=self.delete_run,
            requeue_at=self.requeue_at,
            events=((self.headline,) if transition and self.headline else ()) + tuple(self.notes),
        )


def decide(
    spec: GRPORunSpec | Sequence[FieldError],
    status: GRPORunStatus,
    pod: PodObservation,
    *,
    generation: int,
    now: datetime,
    evaluations: Sequence[EvaluationObservation] = (),
) -> Decision:
    """What to do about a run, given its spec (or the problems validate_body found in it), its status
    as stored, its pod with the highest attempt (ABSENT if none) and, where watches_evaluations
    says so, its evaluation Jobs. Jobs and pods must be listed after the status was read, from the
    API server rather than a stale cache: a pod missing from the list counts as deleted. ``now`` is
    timezone-aware, like the status's timestamps."""
    draft = _Draft.of(status, generation=generation, now=now)
    draft.validated_spec = cel_digest(spec) if isinstance(spec, GRPORunSpec) else None
    if isinstance(spec, GRPORunSpec) and spec.evaluation.enabled:
        _fold(spec, draft, evaluations)
    if status.phase in FINISHED:
        draft.stop(pod)  # nothing trains after the end
    elif not isinstance(spec, GRPORunSpec):
        draft.fail("InvalidSpec", "the spec is invalid: " + "; ".join(map(str, spec)))
        draft.stop(pod)
    else:
        _queue_evaluations(spec, draft, pod, evaluations)
        if status.phase == "Evaluating":
            draft.stop(pod)
            _evaluate(spec, draft, evaluations)
        else:
            _reconcile(spec, draft, pod, evaluations)
        if draft.phase in FINISHED:
            draft.create_jobs.clear()  # a Job queued in the pass that failed the run: nothing starts after the end
    if isinstance(spec, GRPORunSpec):
        _expire(spec, draft)
    return draft.decision()


def _reconcile(spec: GRPORunSpec, d: _Draft, observed: PodObservation, evaluations: Sequence[EvaluationObservation]) -> None:
    d.attempt = max(d.attempt, 1)
    if observed.live and observed.attempt < d.attempt:  # a stray pod of an earlier attempt
        d.stop(observed)  # never two trainers on one run's checkpoints; start nothing till it is gone
        return
    adopted = observed.attempt > d.attempt  # created by a handler that died before it patched the status
    if adopted:
        d.attempt = observed.attempt
    pod = observed if observed.state is not PodState.ABSENT and observed.attempt == d.attempt else None
    if pod is not None and (adopted or not d.is_true("Created")):
        d.set("Created", True, "PodCreated", f"pod {pod.name} of attempt {d.attempt} exists")
        _started(d)
    if pod is None and d.is_true("Created"):  # deleted: by a user, the node controller, an eviction
        message = f"the pod of attempt {d.attempt} was deleted"
        pod = PodObservation(PodState.FAILED_RETRYABLE, attempt=d.attempt, reason="PodDeleted", message=message)

    if pod is not None and pod.state is PodState.COMPLETED:
        _complete(spec, d, pod, evaluations)
        return
    if pod is not None and pod.state is PodState.FAILED_PERMANENT:
        d.fail(pod.reason, pod.message)
        return
    deadline = _deadline(spec, d)
    if deadline is not None and d.now >= deadline:
        limit = spec.active_deadline_seconds
        d.fail("DeadlineExceeded", f"the run has been active for more than spec.activeDeadlineSeconds ({limit} s)")
        if pod is not None:
            d.stop(pod)
        return
    if deadline is not None:
        d.requeue(deadline)

    if pod is None:
        _start_attempt(spec, d)
    elif pod.live:
        _watch(spec, d, pod)
    else:
        _close(spec, d, pod)


def _deadline(spec: GRPORunSpec, d: _Draft) -> datetime | None:
    """When spec.activeDeadlineSeconds runs out: counted from status.startTime across attempts and
    stopped while suspended (a resumed run starts afresh), as a Job's is."""
    if spec.active_deadline_seconds is None or d.start_time is None or d.old.phase == "Suspended":
        return None
    return d.start_time + timedelta(seconds=spec.active_deadline_seconds)


def _start_attempt(spec: GRPORunSpec, d: _Draft, *, why: tuple[str, str] | None = None) -> None:
    """The current attempt has no pod yet: create it, unless suspended or backing off."""
    if spec.suspend:
        message = "spec.suspend is true; the run resumes from its latest checkpoint when it is set to false"
        d.set("Created", False, "Suspended", message)
        d.set("Running", False, "Suspended", message)
        d.set("Suspended", True, "Suspended", message)
        d.enter("Suspended", "Suspended", message)
        return
    created = d.condition("Created")
    if created is not None and created.reason == "Backoff":
        at = created.last_transition_time + backoff_delay(d.restarts)
        if d.now < at:
            d.requeue(at)
            return
    resumed = d.old.phase == "Suspended"
    d.create_pod = d.attempt
    d.set("Created", True, "PodCreated", f"created the pod of attempt {d.attempt}")
    d.set("Running", False, "PodCreated", "waiting for the pod to be scheduled and to start")
    _started(d)
    reason, message = why or (
        ("Resumed", f"spec.suspend is false: created the pod of attempt {d.attempt}")
        if resumed
        else ("AttemptCreated", f"created the pod of attempt {d.attempt}")
    )
    d.enter("Pending", reason, message)


def _started(d: _Draft) -> None:
    """A pod of the run exists from now on: the clock of the deadline starts, or restarts on resume."""
    if d.start_time is None or d.old.phase == "Suspended":
        d.start_time = d.now
    suspended = d.condition("Suspended")
    if suspended is not None and suspended.reason in ("Suspended", "Suspending"):
        d.set("Suspended", False, "Resumed", "spec.suspend is false")


def _watch(spec: GRPORunSpec, d: _Draft, pod: PodObservation) -> None:
    """The current attempt's pod is live: report it, and stop it if the run is to be suspended."""
    if spec.suspend:
        d.stop(pod)
        d.set("Suspended", False, "Suspending", f"{pod.message}; stopping it: the trainer checkpoints and exits")
    if pod.state is PodState.RUNNING:
        d.set("Running", True, pod.reason, pod.message)
        d.enter("Running", "Started", pod.message)
    elif pod.state is PodState.PENDING:
        d.set("Running", False, pod.reason, pod.message)
        d.enter("Pending", pod.reason, pod.message)
    else:  # the trainer has ended or is being stopped, but the pod has not finished yet
        message = f"{pod.message}; the next attempt waits for the pod to finish"
        d.set("Running", "Unknown" if pod.reason == "NodeLost" else False, pod.reason, message)
        d.enter(d.phase, pod.reason, message)


def _close(spec: GRPORunSpec, d: _Draft, pod: PodObservation) -> None:
    """The current attempt ended without finishing the run: suspend, retry, or give up."""
    ended = d.attempt
    suspending = d.condition("Suspended")
    stopped_by_us = spec.suspend or (suspending is not None and suspending.reason == "Suspending")
    if pod.state is PodState.PREEMPTED or stopped_by_us:  # not a failure
        d.attempt += 1
        _start_attempt(spec, d, why=("Resumed" if stopped_by_us else pod.reason, f"attempt {ended} ended: {pod.message}"))
        return
    d.restarts += 1
    failure = f"attempt {ended} failed: {pod.message}"
    if d.restarts > spec.max_restarts:
        d.fail(
            "BackoffLimitExceeded",
            f"{failure}; that is {d.restarts} failures, more than spec.maxRestarts ({spec.max_restarts})",
        )
        return
    d.attempt += 1
    at = d.now + backoff_delay(d.restarts)
    d.set("Created", False, "Backoff", f"attempt {d.attempt} starts at {at.isoformat()}")
    d.set("Running", False, pod.reason, pod.message)
    d.enter("Pending", pod.reason, f"{failure}; restart {d.restarts} of {spec.max_restarts} at {at.isoformat()}", warning=True)
    d.requeue(at)


def _complete(spec: GRPORunSpec, d: _Draft, pod: PodObservation, evaluations: Sequence[EvaluationObservation]) -> None:
    d.set("Running", False, pod.reason, pod.message)
    if not spec.evaluation.enabled:
        d.succeed(pod.reason, pod.message)
        return
    if _final_checkpoint(d, pod) is None and not (d.create_jobs or evaluations or d.evaluations):
        message = f"{pod.message}, but the trainer named no checkpoint to evaluate"
        d.set("EvaluationFailed", True, "NoCheckpoint", message)
        d.succeed(pod.reason, message, warning=True)
        return
    _evaluate(spec, d, evaluations, trained=pod)


def _evaluate(
    spec: GRPORunSpec, d: _Draft, evaluations: Sequence[EvaluationObservation], *, trained: PodObservation | None = None
) -> None:
    """The run is trained: wait in Evaluating for its evaluation Jobs, then succeed."""
    headline = f"{trained.message}; " if trained is not None else ""
    reason = trained.reason if trained is not None else "Evaluating"
    if not spec.evaluation.enabled:  # switched off meanwhile
        d.succeed(reason, f"{headline}evaluation is off (spec.evaluation)")
        return
    steps = sorted({job.step for job in _unfinished(evaluations)} | {checkpoint.step for checkpoint in d.create_jobs})
    if steps:
        where = ", ".join(f"step {step}" for step in steps)
        d.enter("Evaluating", reason, f"{headline}evaluating {where} on {', '.join(spec.evaluation.benchmarks)}")
        return
    failed = d.condition("EvaluationFailed")
    best = d.best_checkpoint
    summary = (
        f"best checkpoint: step {best.step} ({_scores_text(d, best.step)})"
        if best
        else "no checkpoint has every score selectBy needs"
    )
    if failed is not None and failed.status == "True":
        message = f"{headline}trained and evaluated; {summary}; evaluations failed (condition EvaluationFailed)"
        d.succeed("Evaluated", message, warning=True)
    else:
        d.succeed("Evaluated", f"{headline}trained and evaluated; {summary}")


_FAILURES_SHOWN = 5


def _unfinished(evaluations: Sequence[EvaluationObservation]) -> list[EvaluationObservation]:
    return [job for job in evaluations if job.state is EvaluationState.RUNNING]


def _final_checkpoint(d: _Draft, pod: PodObservation) -> CheckpointRef | None:
    """The checkpoint a completed trainer ended with: as its termination message says, else the
    latest it reported into the status."""
    said = pod.termination
    if said is not None and said.step is not None:
        return CheckpointRef(step=said.step, uri=said.checkpoint_uri or "")
    return d.old.latest_checkpoint


def _queue_evaluations(
    spec: GRPORunSpec, d: _Draft, pod: PodObservation, evaluations: Sequence[EvaluationObservation]
) -> None:
    """The checkpoints to evaluate that have neither a Job nor scores yet: with ``every``, the
    latest the trainer reported; with either, the one a completed trainer ended with."""
    if not spec.evaluation.enabled:
        return
    wanted = []
    if spec.evaluation.checkpoints == "every" and d.old.latest_checkpoint is not None:
        wanted.append(d.old.latest_checkpoint)
    if pod.state is PodState.COMPLETED and (final := _final_checkpoint(d, pod)) is not None:
        wanted.append(final)
    done = {job.step for job in evaluations} | {score.checkpoint_step for score in d.evaluations}
    for checkpoint in wanted:
        if checkpoint.step not in done:
            done.add(checkpoint.step)
            d.create_jobs.append(checkpoint.model_copy(update={"time": None}))


def _fold(spec: GRPORunSpec, d: _Draft, evaluations: Sequence[EvaluationObservation]) -> None:
    """Scores: those stored, and those of every Job that has finished (a later score of the same
    checkpoint and benchmark wins); the best checkpoint by selectBy; failed evaluations."""
    table = {(score.checkpoint_step, score.benchmark): score for score in d.old.evaluations}
    for job in evaluations:
        table.update({(score.checkpoint_step, score.benchmark): score for score in job.scores})
    d.evaluations = sorted(table.values(), key=lambda score: (score.checkpoint_step, BENCHMARKS.index(score.benchmark)))
    for step in sorted({key[0] for key in table} - {score.checkpoint_step for score in d.old.evaluations}):
        d.notes.append(Event("Normal", "Evaluated", f"checkpoint step {step}: {_scores_text(d, step)}"))

    best = best_step(d.evaluations, spec.evaluation.select_by, spec.evaluation.benchmarks)
    if best is None:
        d.scores = d.best_checkpoint = None
    else:
        d.scores = Scores(**{score.benchmark: score.score for score in d.evaluations if score.checkpoint_step == best})
        d.best_checkpoint = CheckpointRef(step=best, uri=_uri_of(d, best, evaluations))

    failed = [job for job in evaluations if job.state is EvaluationState.FAILED]
    if failed:
        shown = failed[-_FAILURES_SHOWN:]  # a condition's message is bounded; each names a few KB at most
        message = "; ".join(f"step {job.step}: {job.reason}: {job.message}" for job in shown)
        if len(failed) > len(shown):
            message = f"{len(failed)} evaluations failed, the last {len(shown)}: {message}"
        before = d.condition("EvaluationFailed")
        if before is None or before.message != message:  # a failure not reported yet
            d.notes.append(Event("Warning", failed[-1].reason, failed[-1].message))
        d.set("EvaluationFailed", True, failed[-1].reason, message)


def _scores_text(d: _Draft, step: int) -> str:
    return ", ".join(f"{score.benchmark} {score.score:.3f}" for score in d.evaluations if score.checkpoint_step == step)


def _uri_of(d: _Draft, step: int, evaluations: Sequence[EvaluationObservation]) -> str:
    """The URI of checkpoint ``step``: as its Job or the status names it."""
    known = [job.checkpoint_uri for job in evaluations if job.step == step and job.checkpoint_uri]
    known += [ref.uri for ref in (d.old.best_checkpoint, d.old.latest_checkpoint) if ref is not None and ref.step == step]
    return known[0] if known else ""


def _expire(spec: GRPORunSpec, d: _Draft) -> None:
    """ttlSecondsAfterFinished: delete a succeeded or failed run that long after it ended."""
    if d.phase not in ("Succeeded", "Failed") or spec.ttl_seconds_after_finished is None or d.completion_time is None:
        return
    at = d.completion_time + timedelta(seconds=spec.ttl_seconds_after_finished)
    if d.now >= at:
        d.delete_run = True
    else:
        d.requeue(at)

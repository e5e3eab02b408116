"""The operator's state logic without a cluster: how a pod is read, what each observation makes of
a run, and the termination message the trainer leaves behind.

Pods are written as the kubelet reports them; a run's stored status is built by replaying decide
over a history of observations, as the operator would have stored it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_operator.manifests import ATTEMPT_LABEL, CHECKPOINT_ANNOTATION, EVALUATION_LABEL, RUN_LABEL, job_name, pod_name
from grpo_operator.state import (
    ABSENT,
    Decision,
    EvaluationObservation,
    EvaluationState,
    PodState,
    backoff_delay,
    decide,
    observe_evaluations,
    observe_pod,
    owned,
    validate_body,
    watches_evaluations,
)
from grpo_trainer import validation
from grpo_trainer.spec import BENCHMARKS, BenchmarkScore, CheckpointRef, EvaluationSpec, GRPORun, GRPORunSpec, GRPORunStatus
from grpo_trainer.termination import EXIT_INVALID, EXIT_STORAGE_FULL, EXIT_WEIGHT_SYNC, MAX_BYTES, Outcome, TerminationMessage
from grpo_trainer.validation import FieldError, cel_digest, load_manifest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "exp2-open-rs.yaml"
RUN = load_manifest(EXAMPLE)
NAME = RUN.metadata.name
SPEC = RUN.spec  # evaluates on benchmarks after training: ends in Evaluating
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def make_spec(**changes) -> GRPORunSpec:
    return SPEC.model_copy(update=changes)


NO_EVALUATION = make_spec(evaluation=EvaluationSpec(checkpoints="none"))
SUSPENDED = make_spec(suspend=True)

# ------------------------------------------------------------------------ pods as the kubelet says


def pod(attempt: int = 1, phase: str = "Pending", *, trainer=None, sidecar=None, conditions=(), deleting=False, **status):
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(NAME, attempt), "labels": {RUN_LABEL: NAME, ATTEMPT_LABEL: str(attempt)}},
        "status": {"phase": phase, "conditions": list(conditions), **status},
    }
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2025-05-01T12:00:00Z"
    if trainer is not None:
        body["status"]["containerStatuses"] = [{"name": "trainer", "state": trainer, "ready": "running" in trainer}]
    if sidecar is not None:
        body["status"]["initContainerStatuses"] = [{"name": "vllm", **sidecar}]
    return body


def running():
    return {"running": {"startedAt": "2025-05-01T12:01:00Z"}}


def terminated(code: int, reason: str = "", message: str = ""):
    reason = reason or ("Completed" if code == 0 else "Error")
    return {"terminated": {"exitCode": code, "reason": reason, "message": message}}


def waiting(reason: str, message: str = ""):
    return {"waiting": {"reason": reason, "message": message}}


def said(outcome: str, **fields) -> str:
    return TerminationMessage(Outcome(outcome), **fields).to_json()


SIDECAR_READY = {"ready": True, "started": True, "state": running()}
SCHEDULER_SAYS = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
LOG_TAIL = "step 40 reward 0.31\nTraceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access"


def unschedulable(attempt=1):
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHEDULER_SAYS}
    return pod(attempt, conditions=[scheduled])


def image_pull_backoff(attempt=1):
    sidecar = {"ready": False, "state": waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/vllm:0.1.0"')}
    return pod(attempt, trainer=waiting("PodInitializing"), sidecar=sidecar)


def training(attempt=1, **kwargs):
    return pod(attempt, "Running", trainer=running(), sidecar=SIDECAR_READY, **kwargs)


def completed(attempt=1):
    return pod(attempt, "Succeeded", trainer=terminated(0, message=said("completed", step=500)))


def preempted(attempt=1):
    message = said("preempted", step=120, checkpoint_uri="s3://grpo-checkpoints/open-rs/open-rs-exp2/checkpoints/step-120")
    return pod(attempt, "Succeeded", trainer=terminated(0, message=message))


def invalid_input(attempt=1):
    message = said("invalid", reason="DatasetError", message="knoveleng/open-rs: column 'problem' not found")
    return pod(attempt, "Failed", trainer=terminated(EXIT_INVALID, message=message))


def oom(attempt=1):
    return pod(attempt, "Failed", trainer=terminated(137, "OOMKilled"))


def crashed(attempt=1):
    return pod(attempt, "Failed", trainer=terminated(1, message=LOG_TAIL))


def evicted(attempt=1):
    return pod(attempt, "Failed", reason="Evicted", message="The node was low on resource: memory.")


def node_lost(attempt=1):
    return pod(attempt, "Unknown", trainer=running(), sidecar=SIDECAR_READY)


def disrupted(attempt=1):
    condition = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "DeletionByTaintManager",
        "message": "Taint manager: deleting due to NoExecute taint",
    }
    return training(attempt, conditions=[condition], deleting=True)


# ----------------------------------------------------------------------------------- observe_pod


def _row(id, body, state, reason, live, trainer_running, says):
    return pytest.param(body, state, reason, live, trainer_running, says, id=id)


PENDING, COMPLETED = PodState.PENDING, PodState.COMPLETED
PERMANENT, RETRYABLE = PodState.FAILED_PERMANENT, PodState.FAILED_RETRYABLE


@pytest.mark.parametrize(
    ("body", "state", "reason", "live", "trainer_running", "says"),
    [
        _row("unschedulable", unschedulable(), PENDING, "Unschedulable", True, True, SCHEDULER_SAYS),
        _row("image pull", image_pull_backoff(), PENDING, "ImagePullBackOff", True, True, "container vllm: Back-off pulling"),
        _row("vLLM loading", pod(trainer=waiting("PodInitializing"), sidecar={"ready": False, "state": running()}),
             PENDING, "Starting", True, True, "loads the model"),
        _row("training", training(), PodState.RUNNING, "Training", True, True, "the trainer is running"),
        _row("completed", completed(), COMPLETED, "TrainingCompleted", False, False, "at step 500"),
        # The trainer is done; its sidecar is still stopping, so the pod is not finished yet.
        _row("completed, sidecar stopping",
             pod(phase="Running", trainer=terminated(0, message=said("completed", step=500)), sidecar=SIDECAR_READY),
             COMPLETED, "TrainingCompleted", True, False, "at step 500"),
        _row("preempted", preempted(), PodState.PREEMPTED, "Preempted", False, False, "step-120"),
        # torchrun exits 1 after passing SIGTERM on; the trainer's message, written after its checkpoint, decides.
        _row("preempted, torchrun exit 1",
             pod(phase="Failed", trainer=terminated(1, message=said("preempted", step=7, checkpoint_uri="s3://b/r/step-7"))),
             PodState.PREEMPTED, "Preempted", False, False, "step-7"),
        # Exit 0 alone cannot tell a completed trainer from a preempted one.
        _row("exit 0, no message", pod(phase="Succeeded", trainer=terminated(0, message="done\n")),
             RETRYABLE, "UnknownOutcome", False, False, "no termination message"),
        _row("invalid input", invalid_input(), PERMANENT, "DatasetError", False, False, "column 'problem' not found"),
        _row("exit 2, log tail", pod(phase="Failed", trainer=terminated(EXIT_INVALID, message="x\nspec.dataset: not found\n")),
             PERMANENT, "InvalidInput", False, False, "spec.dataset: not found"),
        _row("exit 2, bad reason", pod(phase="Failed", trainer=terminated(EXIT_INVALID, message=said("invalid", reason="no!"))),
             PERMANENT, "InvalidInput", False, False, "rejected its input"),
        _row("OOM", oom(), RETRYABLE, "OOMKilled", False, False, "code 137 (OOMKilled)"),
        _row("crash", crashed(), RETRYABLE, "Error", False, False, "RuntimeError: CUDA error"),
        _row("evicted", evicted(), RETRYABLE, "Evicted", False, False, "low on resource: memory"),
        _row("node lost", node_lost(), RETRYABLE, "NodeLost", True, True, "stopped reporting"),
        _row("disrupted", disrupted(), RETRYABLE, "DeletionByTaintManager", True, True, "NoExecute taint"),
        # Rejected by the kubelet at admission: no container ran, and its reason is no condition reason.
        _row("rejected at admission", pod(phase="Failed", reason="OutOfnvidia.com/gpu", message="Node didn't have enough GPUs"),
             RETRYABLE, "PodFailed", False, False, "enough GPUs"),
    ],
)
def test_observe_pod_classifies_what_the_kubelet_reports(body, state, reason, live, trainer_running, says):
    seen = observe_pod(body)
    assert (seen.state, seen.reason, seen.live, seen.trainer_running) == (state, reason, live, trainer_running)
    assert says in seen.message
    assert seen.name == pod_name(NAME, 1) and seen.attempt == 1
    assert seen.name in seen.message


def test_observe_pod_reads_attempt_deletion_sidecar_readiness_and_the_termination_message():
    assert observe_pod(None) is ABSENT and observe_pod({}) is ABSENT
    seen = observe_pod(training(7, deleting=True))
    assert (seen.attempt, seen.deleting, seen.vllm_ready) == (7, True, True)
    not_ready = observe_pod(pod(2, "Running", trainer=running(), sidecar={"ready": False, "state": running()}))
    assert not_ready.vllm_ready is False and "vLLM server is not ready" in not_ready.message
    assert observe_pod(preempted()).termination.step == 120
    unlabelled = training()
    del unlabelled["metadata"]["labels"][ATTEMPT_LABEL]
    assert observe_pod(unlabelled).attempt == 0


def test_owned_keeps_what_one_of_the_owners_owns():
    def labelled(name: str, *owners: str) -> dict:
        return {"metadata": {"name": name, "ownerReferences": [{"uid": uid} for uid in owners]}}

    listed = [labelled("ours", "run"), labelled("a job's", "job"), labelled("a deleted run's", "old-run"), labelled("orphan")]
    assert [obj["metadata"]["name"] for obj in owned(listed, {"run", "job"})] == ["ours", "a job's"]


# ---------------------------------------------------------------------------------------- decide


def replay(spec, history) -> GRPORunStatus:
    """The status the operator would have stored after seeing ``history``: (pod, seconds after T0[, spec])."""
    status = GRPORunStatus()
    for observed, at, *changed in history:
        now = T0 + timedelta(seconds=at)
        status = decide(changed[0] if changed else spec, status, observe_pod(observed), generation=1, now=now).status
    return status


CREATED = [(None, 0)]
RUNNING = [*CREATED, (training(), 60)]
OOM_AT_3600 = [*RUNNING, (oom(), 3600)]
SECOND_ATTEMPT_RUNNING = [*OOM_AT_3600, (oom(), 3610), (training(2), 3700)]
SUSPENDING = [*RUNNING, (training(), 100, SUSPENDED), (training(deleting=True), 101, SUSPENDED)]
SUSPENDED_HISTORY = [*SUSPENDING, (None, 150, SUSPENDED)]


@dataclass
class Case:
    id: str
    history: list
    pod: dict | None
    at: float
    phase: str
    spec: GRPORunSpec | list = field(default_factory=lambda: SPEC)
    create: int | None = None
    delete: str | None = None
    attempt: int = 1
    restarts: int = 0
    events: tuple[str, ...] = ()
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)  # type: (status, reason)
    requeue: float | None = None  # seconds after T0


CASES = [
    Case("new run: create attempt 1", [], None, 0, "Pending", create=1, events=("AttemptCreated",),
         conditions={"Created": ("True", "PodCreated"), "Running": ("False", "PodCreated")}),
    Case("created suspended: no pod", [], None, 0, "Suspended", spec=SUSPENDED, events=("Suspended",),
         conditions={"Created": ("False", "Suspended"), "Suspended": ("True", "Suspended")}),
    Case("unschedulable: the scheduler's reason", CREATED, unschedulable(), 30, "Pending",
         conditions={"Running": ("False", "Unschedulable")}),
    Case("sidecar image cannot be pulled", CREATED, image_pull_backoff(), 30, "Pending",
         conditions={"Running": ("False", "ImagePullBackOff")}),
    Case("trainer starts", CREATED, training(), 60, "Running", events=("Started",),
         conditions={"Running": ("True", "Training")}),
    Case("completed, benchmarks to run: Evaluating", RUNNING, completed(), 7200, "Evaluating", events=("TrainingCompleted",),
         conditions={"Running": ("False", "TrainingCompleted")}),
    Case("completed, no evaluation: Succeeded", RUNNING, completed(), 7200, "Succeeded", spec=NO_EVALUATION,
         events=("TrainingCompleted",), conditions={"Succeeded": ("True", "TrainingCompleted")}),
    Case("completed while the sidecar stops", RUNNING,
         pod(phase="Running", trainer=terminated(0, message=said("completed")), sidecar=SIDECAR_READY), 7200,
         "Succeeded", spec=NO_EVALUATION, events=("TrainingCompleted",)),
    Case("bad input fails at once, with the trainer's reason", RUNNING, invalid_input(), 300, "Failed", events=("DatasetError",),
         conditions={"Failed": ("True", "DatasetError"), "Running": ("False", "DatasetError")}),
    Case("OOM: count it, back off 10 s", RUNNING, oom(), 3600, "Pending", attempt=2, restarts=1, events=("OOMKilled",),
         conditions={"Created": ("False", "Backoff"), "Running": ("False", "OOMKilled")}, requeue=3610),
    Case("backoff: still waiting", OOM_AT_3600, oom(), 3605, "Pending", attempt=2, restarts=1, requeue=3610),
    Case("backoff over: attempt 2", OOM_AT_3600, oom(), 3610, "Pending", create=2, attempt=2, restarts=1,
         conditions={"Created": ("True", "PodCreated")}),
    Case("second failure: back off 20 s", SECOND_ATTEMPT_RUNNING, crashed(2), 4000, "Pending", attempt=3, restarts=2,
         events=("Error",), requeue=4020),
    Case("failures beyond maxRestarts: Failed", SECOND_ATTEMPT_RUNNING, crashed(2), 4000, "Failed",
         spec=make_spec(max_restarts=1), attempt=2, restarts=2, events=("BackoffLimitExceeded",),
         conditions={"Failed": ("True", "BackoffLimitExceeded")}),
    Case("maxRestarts 0: the first failure is final", RUNNING, oom(), 3600, "Failed", spec=make_spec(max_restarts=0),
         restarts=1, events=("BackoffLimitExceeded",)),
    Case("preempted: next attempt at once, not a failure", RUNNING, preempted(), 3600, "Pending", create=2, attempt=2,
         events=("Preempted",)),
    Case("evicted: a failure", RUNNING, evicted(), 3600, "Pending", attempt=2, restarts=1, events=("Evicted",), requeue=3610),
    Case("pod deleted: a failure", RUNNING, None, 3600, "Pending", attempt=2, restarts=1, events=("PodDeleted",), requeue=3610),
    Case("node lost: wait for Kubernetes to give the pod up", RUNNING, node_lost(), 3600, "Running",
         conditions={"Running": ("Unknown", "NodeLost")}),
    Case("disruption: wait for the pod to finish", RUNNING, disrupted(), 3600, "Running",
         conditions={"Running": ("False", "DeletionByTaintManager")}),
    Case("a pod gone after a disruption: a failure", [*RUNNING, (disrupted(), 3600)], None, 3700, "Pending", attempt=2,
         restarts=1, events=("PodDeleted",), requeue=3710),
    Case("suspend: stop the pod", RUNNING, training(), 100, "Running", spec=SUSPENDED, delete=pod_name(NAME, 1),
         conditions={"Suspended": ("False", "Suspending"), "Running": ("True", "Training")}),
    Case("suspend: the pod is stopping already", SUSPENDING, training(deleting=True), 120, "Running", spec=SUSPENDED),
    Case("suspend: pod gone, Suspended, not a failure", SUSPENDING, None, 150, "Suspended", spec=SUSPENDED, attempt=2,
         events=("Suspended",), conditions={"Suspended": ("True", "Suspended"), "Created": ("False", "Suspended")}),
    Case("suspend: trainer checkpointed and exited", SUSPENDING, preempted(), 150, "Suspended", spec=SUSPENDED, attempt=2,
         events=("Suspended",)),
    Case("suspend: killed past its grace period, not a failure", SUSPENDING, pod(phase="Failed", trainer=terminated(137)), 300,
         "Suspended", spec=SUSPENDED, attempt=2, events=("Suspended",)),
    Case("resume: the next attempt", SUSPENDED_HISTORY, None, 5000, "Pending", create=2, attempt=2, events=("Resumed",),
         conditions={"Suspended": ("False", "Resumed"), "Created": ("True", "PodCreated")}),
    Case("unsuspended while stopping: not a failure", SUSPENDING, None, 150, "Pending", create=2, attempt=2, events=("Resumed",),
         conditions={"Suspended": ("False", "Resumed")}),
    Case("deadline passed: stop the pod, Failed", RUNNING, training(), 3600, "Failed",
         spec=make_spec(active_deadline_seconds=3600), delete=pod_name(NAME, 1), events=("DeadlineExceeded",),
         conditions={"Failed": ("True", "DeadlineExceeded")}),
    Case("deadline ahead: come back then", RUNNING, training(), 100, "Running", spec=make_spec(active_deadline_seconds=3600),
         requeue=3600),
    Case("deadline stopped while suspended", SUSPENDED_HISTORY, None, 9999, "Suspended",
         spec=make_spec(suspend=True, active_deadline_seconds=3600), attempt=2),
    Case("invalid spec: Failed, pod stopped", RUNNING, training(), 100, "Failed",
         spec=[FieldError("spec.grpo.epsilonHigh", "must be at least epsilon")], delete=pod_name(NAME, 1),
         events=("InvalidSpec",), conditions={"Failed": ("True", "InvalidSpec")}),
    Case("the handler died after creating pod 1: adopt it", [], unschedulable(), 5, "Pending", events=("Unschedulable",),
         conditions={"Created": ("True", "PodCreated"), "Running": ("False", "Unschedulable")}),
    Case("the handler died after creating pod 2: adopt it", RUNNING, training(2), 3600, "Running", attempt=2,
         conditions={"Created": ("True", "PodCreated"), "Running": ("True", "Training")}),
    Case("a live pod of an earlier attempt: stop it, start nothing", OOM_AT_3600, training(1), 3700, "Pending",
         delete=pod_name(NAME, 1), attempt=2, restarts=1),
    Case("finished: a trainer still running is stopped", [*RUNNING, (invalid_input(), 300)], training(), 400, "Failed",
         delete=pod_name(NAME, 1)),
    Case("finished: nothing more", [*RUNNING, (completed(), 7200)], completed(), 7300, "Evaluating"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_decide(case: Case):
    status = replay(case.spec if isinstance(case.spec, GRPORunSpec) else SPEC, case.history)
    decision = decide(case.spec, status, observe_pod(case.pod), generation=1, now=T0 + timedelta(seconds=case.at))
    new = decision.status
    assert new.phase == case.phase, new.message
    assert (decision.create_pod, decision.delete_pod) == (case.create, case.delete)
    assert (new.attempt, new.restarts) == (case.attempt, case.restarts)
    assert tuple(event.reason for event in decision.events) == case.events
    for kind, expected in case.conditions.items():
        condition = next(c for c in new.conditions if c.type == kind)
        assert (condition.status, condition.reason) == expected, condition.message
    assert decision.requeue_at == (None if case.requeue is None else T0 + timedelta(seconds=case.requeue))
    assert not decision.delete_run
    assert new.observed_generation == 1


def test_failures_and_their_messages_reach_status_and_events():
    decision = decide(SPEC, replay(SPEC, RUNNING), observe_pod(crashed()), generation=1, now=T0 + timedelta(hours=1))
    (event,) = decision.events
    assert event.type == "Warning"
    assert "RuntimeError: CUDA error" in event.message and "restart 1 of 10" in event.message
    assert decision.status.message == event.message

    status = replay(SPEC, RUNNING)
    failed = decide(SPEC, status, observe_pod(invalid_input()), generation=1, now=T0 + timedelta(hours=1)).status
    condition = next(c for c in failed.conditions if c.type == "Failed")
    assert "column 'problem' not found" in condition.message and failed.completion_time == T0 + timedelta(hours=1)

    errors = [FieldError("spec.grpo.epsilonHigh", "must be at least epsilon")]
    invalid = decide(errors, GRPORunStatus(), ABSENT, generation=1, now=T0)
    assert "spec.grpo.epsilonHigh: must be at least epsilon" in invalid.status.message
    assert invalid.create_pod is None and invalid.events[0].type == "Warning"


def test_a_failed_weight_sync_is_retried_with_the_trainers_reason():
    """Exit 3 with outcome failed: the sidecar did not take the weights; a new pod (a fresh sidecar)
    resumes from the latest checkpoint, and the status says why."""
    message = said("failed", reason="WeightSyncFailed",
                   message="run.yaml: vLLM server at http://127.0.0.1:8000: weights 7 not synced: shm: POST /pause: HTTP 500")
    failed = pod(1, "Failed", trainer=terminated(EXIT_WEIGHT_SYNC, message=message))
    observed = observe_pod(failed)
    assert observed.state is PodState.FAILED_RETRYABLE and observed.reason == "WeightSyncFailed"
    decision = decide(SPEC, replay(SPEC, RUNNING), observed, generation=1, now=T0 + timedelta(hours=1))
    assert decision.status.phase != "Failed" and decision.status.restarts == 1
    assert "exited with code 3 (WeightSyncFailed): run.yaml: vLLM server at http://127.0.0.1:8000" in decision.status.message


@pytest.mark.parametrize("exit_code", [EXIT_STORAGE_FULL, 1])  # 1: what torchrun exits with when a rank exits 4
def test_a_full_disk_fails_the_run_at_once_saying_which_filesystem(exit_code):
    """A new pod would mount the same full volume and fail at the same save: no restart, and the
    trainer's one line (the filesystem, the bytes needed and free, what to do) is the condition."""
    line = ("run.yaml: checkpoint of step 50 needs about 2.7 GB (the size of checkpoint step 40): "
            "file:///data/runs/exp is on the filesystem at /data (1.2 GB free); free space there, give the run "
            "a larger volume, or keep fewer checkpoints (spec.checkpoints.keepLast)")
    failed = pod(1, "Failed", trainer=terminated(exit_code, message=said("failed", reason="StorageFull", message=line)))
    observed = observe_pod(failed)
    assert observed.state is PodState.FAILED_PERMANENT and observed.reason == "StorageFull"
    decision = decide(SPEC, replay(SPEC, RUNNING), observed, generation=1, now=T0 + timedelta(hours=1))
    assert decision.status.phase == "Failed" and decision.status.restarts == 0 and decision.create_pod is None
    condition = next(c for c in decision.status.conditions if c.type == "Failed")
    assert condition.reason == "StorageFull" and condition.message == f"pod {failed['metadata']['name']}: {line}"


def test_decide_is_a_pure_function():
    status = replay(SPEC, RUNNING)
    stored = status.model_dump()
    first = decide(SPEC, status, observe_pod(oom()), generation=3, now=T0 + timedelta(hours=1))
    second = decide(SPEC, status, observe_pod(oom()), generation=3, now=T0 + timedelta(hours=1))
    assert first == second
    assert status.model_dump() == stored


def test_last_transition_time_moves_only_when_a_condition_flips():
    status = replay(SPEC, [*CREATED, (unschedulable(), 30)])
    running_condition = next(c for c in status.conditions if c.type == "Running")
    assert running_condition.last_transition_time == T0  # False since the pod was created
    later = decide(SPEC, status, observe_pod(image_pull_backoff()), generation=2, now=T0 + timedelta(seconds=90)).status
    still_false = next(c for c in later.conditions if c.type == "Running")
    assert (still_false.reason, still_false.last_transition_time, still_false.observed_generation) == ("ImagePullBackOff", T0, 2)
    started = decide(SPEC, later, observe_pod(training()), generation=2, now=T0 + timedelta(seconds=120)).status
    assert next(c for c in started.conditions if c.type == "Running").last_transition_time == T0 + timedelta(seconds=120)
    created = next(c for c in started.conditions if c.type == "Created")
    assert created.last_transition_time == T0


def test_start_time_spans_restarts_and_restarts_on_resume():
    restarted = replay(SPEC, SECOND_ATTEMPT_RUNNING)
    assert restarted.start_time == T0
    resumed = decide(SPEC, replay(SPEC, SUSPENDED_HISTORY), ABSENT, generation=2, now=T0 + timedelta(seconds=5000)).status
    assert resumed.start_time == T0 + timedelta(seconds=5000)  # like a Job: the deadline's clock starts afresh
    deadline = make_spec(active_deadline_seconds=3600)
    running_again = decide(deadline, resumed, observe_pod(training(2)), generation=2, now=T0 + timedelta(seconds=8000))
    assert running_again.status.phase == "Running"
    assert running_again.requeue_at == T0 + timedelta(seconds=5000 + 3600)


def test_ttl_deletes_a_finished_run_when_it_runs_out():
    spec = make_spec(evaluation=EvaluationSpec(checkpoints="none"), ttl_seconds_after_finished=600)
    done = decide(spec, replay(spec, RUNNING), observe_pod(completed()), generation=1, now=T0 + timedelta(hours=2))
    assert done.status.phase == "Succeeded" and not done.delete_run
    assert done.requeue_at == T0 + timedelta(hours=2, seconds=600)
    before = decide(spec, done.status, observe_pod(completed()), generation=1, now=T0 + timedelta(hours=2, seconds=599))
    assert not before.delete_run and before.requeue_at == done.requeue_at
    expired = decide(spec, done.status, observe_pod(completed()), generation=1, now=T0 + timedelta(hours=2, seconds=600))
    assert expired.delete_run and expired.events == ()
    ttl_only = make_spec(ttl_seconds_after_finished=0)
    evaluating = decide(ttl_only, replay(SPEC, RUNNING), observe_pod(completed()), generation=1, now=T0)
    assert evaluating.status.phase == "Evaluating" and not evaluating.delete_run  # not finished yet


def test_backoff_doubles_from_10_seconds_up_to_5_minutes():
    assert [backoff_delay(n).total_seconds() for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(10**9) == timedelta(minutes=5)


# ------------------------------------------------------------------------------ evaluation Jobs

CHECKPOINTS = "s3://grpo-checkpoints/open-rs/open-rs-exp2/checkpoints"
EVERY = make_spec(evaluation=EvaluationSpec(checkpoints="every", benchmarks=["aime24", "math500"]))
BY_AIME = make_spec(evaluation=EvaluationSpec(benchmarks=["aime24", "math500"], select_by="aime24"))
TWO = make_spec(evaluation=EvaluationSpec(benchmarks=["aime24", "math500"]))


def job(step: int, *conditions: tuple[str, str, str]):
    """An evaluation Job as the API server returns it, with (type, reason, message) conditions."""
    return {
        "metadata": {"name": job_name(NAME, step), "uid": f"job-uid-{step}",
                     "labels": {RUN_LABEL: NAME, EVALUATION_LABEL: str(step)},
                     "annotations": {CHECKPOINT_ANNOTATION: f"{CHECKPOINTS}/step-{step:08d}"}},
        "status": {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}
                                  for kind, reason, message in conditions]},
    }


def eval_pod(step: int, index: int = 0, *, phase="Running", state=None):
    """A pod of the evaluation Job of ``step``, as the Job controller made it and the kubelet reports it."""
    return {
        "metadata": {"name": f"{job_name(NAME, step)}-{index}", "creationTimestamp": f"2025-05-01T13:0{index}:00Z",
                     "labels": {RUN_LABEL: NAME, EVALUATION_LABEL: str(step)},
                     "ownerReferences": [{"kind": "Job", "name": job_name(NAME, step), "uid": f"job-uid-{step}"}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "eval", "state": state or running()}]},
    }


def rows(step: int, **values: float) -> list[dict]:
    return [BenchmarkScore(benchmark=b, checkpoint_step=step, score=v, ci_low=max(v - 0.1, 0), ci_high=min(v + 0.1, 1), n=30,
                           samples_per_problem=4).model_dump(mode="json", by_alias=True, exclude_none=True)
            for b, v in values.items()]


def evaluated(step: int, index: int = 0, **values: float):
    message = said("evaluated", step=step, checkpoint_uri=f"{CHECKPOINTS}/step-{step:08d}", scores=tuple(rows(step, **values)))
    return eval_pod(step, index, phase="Succeeded", state=terminated(0, message=message))


FAILED_INVALID = said("invalid", reason="CheckpointError", message="no complete checkpoint there")


@pytest.mark.parametrize(
    ("jobs", "pods", "state", "reason", "says"),
    [
        pytest.param([job(50)], [], "Running", "Evaluating", "evaluating step 50", id="created"),
        pytest.param([job(50)], [eval_pod(50)], "Running", "Evaluating", "evaluating step 50", id="pod running"),
        pytest.param([job(50)], [eval_pod(50, phase="Failed", state=terminated(1, message=LOG_TAIL)), eval_pod(50, 1)],
                     "Running", "Evaluating", "", id="retrying a crashed pod"),
        pytest.param([job(50)], [evaluated(50, aime24=0.3)], "Succeeded", "Evaluated", "evaluated step 50",
                     id="scores before the Job controller says Complete"),
        pytest.param([job(50, ("Complete", "CompletionsReached", ""))], [evaluated(50, aime24=0.3)],
                     "Succeeded", "Evaluated", "", id="complete"),
        pytest.param([job(50, ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"))],
                     [eval_pod(50, i, phase="Failed", state=terminated(137 if i else 1, "OOMKilled" if i else "", LOG_TAIL))
                      for i in range(3)],
                     "Failed", "BackoffLimitExceeded",
                     "backoff limit; pod open-rs-exp2-eval-50-2 exited with code 137 (OOMKilled)", id="out of retries"),
        pytest.param([job(50, ("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"))], [eval_pod(50)],
                     "Failed", "DeadlineExceeded", "longer than specified deadline", id="deadline"),
        pytest.param([job(50, ("Failed", "PodFailurePolicy", "Container eval for pod x failed with exit code 2"))],
                     [eval_pod(50, phase="Failed", state=terminated(EXIT_INVALID, message=FAILED_INVALID))],
                     "Failed", "PodFailurePolicy",
                     "exit code 2; pod open-rs-exp2-eval-50-0 exited with code 2 (Error): no complete",
                     id="bad input fails at once"),
        pytest.param([job(50, ("Complete", "CompletionsReached", ""))], [eval_pod(50, phase="Succeeded", state=terminated(0))],
                     "Failed", "NoScores", "without a termination message", id="exit 0 without scores"),
        pytest.param([job(50, ("Complete", "CompletionsReached", ""))],
                     [evaluated(40, aime24=0.3) | {"metadata": eval_pod(50)["metadata"]}],
                     "Failed", "InvalidScores", "scores of checkpoint step 40, not of step 50",
                     id="scores of another checkpoint"),
    ],
)
def test_observe_evaluations_classifies_jobs_by_their_conditions_and_their_pods(jobs, pods, state, reason, says):
    stranger = evaluated(99, aime24=1.0) | {"metadata": {**eval_pod(99)["metadata"], "ownerReferences": []}}
    unlabelled = {**job(7), "metadata": {**job(7)["metadata"], "labels": {RUN_LABEL: NAME}}}
    (seen,) = observe_evaluations([*jobs, unlabelled], [*pods, stranger])
    assert (seen.step, seen.name, seen.state, seen.reason) == (50, job_name(NAME, 50), EvaluationState(state), reason)
    assert seen.checkpoint_uri == f"{CHECKPOINTS}/step-00000050"
    assert says in seen.message
    assert bool(seen.scores) == (state == "Succeeded")


def test_watches_evaluations_only_while_jobs_may_exist_and_matter():
    assert not watches_evaluations(NO_EVALUATION, GRPORunStatus(phase="Evaluating"))
    assert not watches_evaluations(make_spec(evaluation=EvaluationSpec(benchmarks=[])), GRPORunStatus(phase="Evaluating"))
    assert not watches_evaluations([FieldError("spec.x", "bad")], GRPORunStatus(phase="Evaluating"))
    watched = [watches_evaluations(SPEC, GRPORunStatus(phase=p)) for p in ("Running", "Evaluating", "Succeeded")]
    assert watched == [False, True, False]
    assert [watches_evaluations(EVERY, GRPORunStatus(phase=p)) for p in ("Running", "Failed", "Succeeded")] == [True, True, False]


def evaluating(spec=TWO):
    """The stored status of a run that completed at step 500 and waits for its evaluation."""
    status = replay(spec, RUNNING)
    return decide(spec, status, observe_pod(completed()), generation=1, now=T0 + timedelta(hours=2)).status


def decide_at(spec, status, pod_body=None, jobs=(), pods=(), hours=3):
    return decide(spec, status, observe_pod(pod_body), generation=1, now=T0 + timedelta(hours=hours),
                  evaluations=observe_evaluations(jobs, pods))


def test_a_completed_run_evaluates_its_final_checkpoint_then_succeeds_with_its_scores():
    status = replay(TWO, RUNNING)
    done = decide_at(TWO, status, completed(), hours=2)
    assert done.status.phase == "Evaluating" and done.create_jobs == (CheckpointRef(step=500, uri=""),)
    assert [event.reason for event in done.events] == ["TrainingCompleted"]
    assert "evaluating step 500 on aime24, math500" in done.status.message and done.status.completion_time is None

    again = decide_at(TWO, done.status, completed(), jobs=[job(500)], pods=[eval_pod(500)])
    assert (again.status.phase, again.create_jobs, again.events) == ("Evaluating", (), ())

    finished = decide_at(TWO, done.status, completed(), jobs=[job(500)], pods=[evaluated(500, aime24=0.3, math500=0.8)])
    new = finished.status
    assert new.phase == "Succeeded" and new.completion_time == T0 + timedelta(hours=3)
    assert [(s.benchmark, s.checkpoint_step, s.score, s.n, s.samples_per_problem) for s in new.evaluations] == [
        ("aime24", 500, 0.3, 30, 4), ("math500", 500, 0.8, 30, 4)]
    assert new.evaluations[0].ci_low == pytest.approx(0.2) and new.evaluations[0].ci_high == pytest.approx(0.4)
    assert new.best_checkpoint == CheckpointRef(step=500, uri=f"{CHECKPOINTS}/step-00000500")
    assert (new.scores.aime24, new.scores.math500, new.scores.amc23) == (0.3, 0.8, None)
    succeeded = next(c for c in new.conditions if c.type == "Succeeded")
    assert (succeeded.status, succeeded.reason) == ("True", "Evaluated")
    assert "best checkpoint: step 500 (aime24 0.300, math500 0.800)" in succeeded.message
    assert [(e.type, e.reason) for e in finished.events] == [("Normal", "Evaluated"), ("Normal", "Evaluated")]
    assert not any(c.type == "EvaluationFailed" for c in new.conditions)

    # Later passes: the Job and its pod as before, or gone; the scores stay.
    for jobs, pods in (([job(500)], [evaluated(500, aime24=0.3, math500=0.8)]), ([], [])):
        later = decide_at(TWO, new, completed(), jobs=jobs, pods=pods, hours=4)
        assert later.status == new and later.events == () and later.create_jobs == ()


@pytest.mark.parametrize(
    ("ended", "reason"),
    [
        (job(500, ("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")), "DeadlineExceeded"),
        (job(500, ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")), "BackoffLimitExceeded"),
        (job(500, ("Failed", "PodFailurePolicy", "exit code 2")), "PodFailurePolicy"),
    ],
)
def test_a_failed_evaluation_is_a_condition_and_the_trained_run_still_succeeds(ended, reason):
    decision = decide_at(TWO, evaluating(), completed(), jobs=[ended])
    new = decision.status
    assert new.phase == "Succeeded" and new.evaluations == [] and new.best_checkpoint is None and new.scores is None
    failed = next(c for c in new.conditions if c.type == "EvaluationFailed")
    assert (failed.status, failed.reason) == ("True", reason) and "step 500" in failed.message
    assert next(c for c in new.conditions if c.type == "Succeeded").status == "True"
    assert not any(c.type == "Failed" for c in new.conditions)
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "Evaluated"), ("Warning", reason)]
    assert decide_at(TWO, new, completed(), jobs=[ended], hours=4).events == (), "reported once"


def test_many_failed_evaluations_fit_a_condition():
    jobs = [job(step, ("Failed", "DeadlineExceeded", "x" * 900)) for step in range(100, 10_100, 100)]
    long_tail = said("invalid", reason="CheckpointError", message="y" * 5000)
    pods = [eval_pod(step, phase="Failed", state=terminated(EXIT_INVALID, message=long_tail)) for step in range(100, 10_100, 100)]
    new = decide_at(EVERY, replay(EVERY, RUNNING), training(), jobs=jobs, pods=pods).status
    failed = next(c for c in new.conditions if c.type == "EvaluationFailed")
    assert failed.message.startswith("100 evaluations failed, the last 5: step 9600:") and len(failed.message) < 32768


def test_a_deleted_evaluation_job_is_created_again():
    decision = decide_at(TWO, evaluating(), completed(), jobs=[])
    assert decision.status.phase == "Evaluating" and [c.step for c in decision.create_jobs] == [500]


def test_every_checkpoint_gets_one_job_while_training_goes_on():
    status = replay(EVERY, RUNNING)
    at_100 = status.model_copy(update={"latest_checkpoint": CheckpointRef(step=100, uri=f"{CHECKPOINTS}/step-00000100")})
    first = decide_at(EVERY, at_100, training())
    assert first.status.phase == "Running" and first.create_jobs == (at_100.latest_checkpoint.model_copy(),)
    assert decide_at(EVERY, first.status, training(), jobs=[job(100)]).create_jobs == ()

    # Scores arrive while the trainer goes on; a score stored earlier that the read missed is not lost.
    scored = decide_at(EVERY, first.status, training(), jobs=[job(100)], pods=[evaluated(100, aime24=0.2, math500=0.6)])
    assert scored.status.phase == "Running" and scored.status.best_checkpoint.step == 100
    assert [(e.reason, e.message) for e in scored.events] == [("Evaluated", "checkpoint step 100: aime24 0.200, math500 0.600")]

    at_200 = scored.status.model_copy(update={"latest_checkpoint": CheckpointRef(step=200, uri=f"{CHECKPOINTS}/step-00000200")})
    second = decide_at(EVERY, at_200, training(), jobs=[job(100)])
    assert [c.step for c in second.create_jobs] == [200] and second.status.evaluations == scored.status.evaluations

    # The trainer completes at 300 while 200 is still evaluated: both are waited for.
    jobs = [job(100), job(200)]
    pods = [evaluated(100, aime24=0.2, math500=0.6), eval_pod(200)]
    done = decide_at(EVERY, second.status, completed(), jobs=jobs, pods=pods)
    assert done.status.phase == "Evaluating" and [c.step for c in done.create_jobs] == [500]
    assert "evaluating step 200, step 500" in done.status.message
    jobs.append(job(500))
    pods = [
        evaluated(100, aime24=0.2, math500=0.6),
        evaluated(200, aime24=0.5, math500=0.7),
        evaluated(500, aime24=0.4, math500=0.7),
    ]
    finished = decide_at(EVERY, done.status, completed(), jobs=jobs, pods=pods)
    assert finished.status.phase == "Succeeded" and finished.status.best_checkpoint.step == 200
    assert sorted({s.checkpoint_step for s in finished.status.evaluations}) == [100, 200, 500]


def test_a_checkpoint_evaluated_already_is_not_evaluated_again():
    status = replay(EVERY, RUNNING).model_copy(update={"latest_checkpoint": CheckpointRef(step=500, uri="")})
    jobs, pods = [job(500)], [evaluated(500, aime24=0.2, math500=0.6)]
    scored = decide_at(EVERY, status, training(), jobs=jobs, pods=pods)
    done = decide_at(EVERY, scored.status, completed(), jobs=jobs, pods=pods)
    assert (done.status.phase, done.create_jobs) == ("Succeeded", ())  # the final checkpoint is the one evaluated
    assert decide_at(EVERY, scored.status, completed()).create_jobs == (), "nor once its Job is gone"


def test_a_failed_run_starts_no_evaluation_but_keeps_the_scores_of_those_that_end():
    status = replay(EVERY, RUNNING).model_copy(update={"latest_checkpoint": CheckpointRef(step=100, uri="")})
    failed = decide_at(EVERY, status, invalid_input(), jobs=[job(50)], pods=[eval_pod(50)])
    assert failed.status.phase == "Failed" and failed.create_jobs == ()
    later = decide_at(EVERY, failed.status, invalid_input(), jobs=[job(50)], pods=[evaluated(50, aime24=0.1, math500=0.2)])
    assert later.status.phase == "Failed" and [s.checkpoint_step for s in later.status.evaluations] == [50, 50]


def test_the_best_checkpoint_follows_select_by():
    jobs = [job(100), job(200)]
    pods = [evaluated(100, aime24=0.2, math500=0.9), evaluated(200, aime24=0.4, math500=0.6)]
    by_mean = decide_at(TWO, evaluating(TWO), completed(), jobs=jobs, pods=pods).status
    assert (by_mean.best_checkpoint.step, by_mean.scores.aime24) == (100, 0.2)  # mean 0.55 beats 0.5
    by_aime = decide_at(BY_AIME, by_mean, completed(), jobs=jobs, pods=pods).status
    assert (by_aime.best_checkpoint.step, by_aime.scores.aime24, by_aime.scores.math500) == (200, 0.4, 0.6)
    assert by_aime.best_checkpoint.uri == f"{CHECKPOINTS}/step-00000200"


def test_a_completed_trainer_that_names_no_checkpoint_succeeds_saying_so():
    nameless = pod(1, "Succeeded", trainer=terminated(0, message=said("completed")))
    decision = decide_at(TWO, replay(TWO, RUNNING), nameless)
    assert decision.status.phase == "Succeeded" and decision.create_jobs == ()
    failed = next(c for c in decision.status.conditions if c.type == "EvaluationFailed")
    assert failed.reason == "NoCheckpoint"


def test_evaluation_switched_off_while_evaluating_succeeds_at_once():
    decision = decide_at(NO_EVALUATION, evaluating(), completed(), jobs=[job(500)], pods=[eval_pod(500)])
    assert decision.status.phase == "Succeeded" and decision.create_jobs == ()


# --------------------------------------------------------------------------------- validate_body


def _api_body(**spec_changes) -> dict:
    body = RUN.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["metadata"] |= {"uid": "3f1c", "generation": 4, "resourceVersion": "981", "managedFields": [{"manager": "kubectl"}]}
    body["spec"]["grpo"] |= spec_changes
    body["status"] = {"phase": "Running", "anything": "the operator's own"}
    return body


def _read_only(value):
    """What kopf hands a handler: read-only mapping views."""
    if isinstance(value, dict):
        return MappingProxyType({key: _read_only(item) for key, item in value.items()})
    if isinstance(value, list):
        return [_read_only(item) for item in value]
    return value


def test_validate_body_takes_kopf_bodies_and_names_every_bad_field():
    run = validate_body(_read_only(_api_body()))
    assert isinstance(run, GRPORun) and run.spec == SPEC and run.metadata.model_extra["uid"] == "3f1c"
    errors = validate_body(_api_body(epsilonHigh=0.1, numGenerationz=4))
    assert [error.path for error in errors] == ["spec.grpo.numGenerationz"]  # structural problems come first
    assert "did you mean 'numGenerations'" in errors[0].message
    errors = validate_body(_api_body(epsilonHigh=0.1, preset="custom"))
    assert [str(error) for error in errors] == ["spec.grpo.epsilonHigh: must be at least epsilon"]
    decision = decide(errors, GRPORunStatus(), ABSENT, generation=4, now=T0)
    assert decision.status.phase == "Failed" and "spec.grpo.epsilonHigh" in decision.status.message


@pytest.fixture
def cel_evaluations(monkeypatch) -> list[str]:
    """One "spec" for each spec whose CEL rules are evaluated from now on, with this process's
    memory of specs that passed them emptied."""
    monkeypatch.setattr(validation, "_PASSED_CEL", type(validation._PASSED_CEL)())
    evaluated, evaluate = [], validation.cel_errors

    def counted(model, path):
        if path == "spec":  # not the models inside it, which it evaluates through this name too
            evaluated.append(path)
        return evaluate(model, path)

    monkeypatch.setattr(validation, "cel_errors", counted)
    return evaluated


def _validated(body: dict, spec: GRPORunSpec) -> dict:
    """``body`` with a status that says ``spec`` passed the CEL rules, as the operator writes it."""
    return {**body, "status": {**body["status"], "validatedSpec": cel_digest(spec)}}


def test_a_spec_whose_digest_the_status_holds_skips_only_the_cel_rules(cel_evaluations):
    run = validate_body(_read_only(_validated(_api_body(), SPEC)))
    assert isinstance(run, GRPORun) and run.spec == SPEC and cel_evaluations == []
    errors = validate_body(_validated(_api_body(numGenerationz=4), SPEC))  # the schema is checked all the same
    assert [error.path for error in errors] == ["spec.grpo.numGenerationz"]


def test_a_changed_spec_is_evaluated_again_whatever_digest_the_status_holds(cel_evaluations):
    # The status still has the digest of the previous generation's spec, or a forged one: either
    # is another spec's, and the spec that breaks a rule is refused with its field named.
    errors = validate_body(_validated(_api_body(epsilonHigh=0.1, preset="custom"), SPEC))
    assert [str(error) for error in errors] == ["spec.grpo.epsilonHigh: must be at least epsilon"]
    assert cel_evaluations == ["spec"]


def test_a_digest_taken_under_other_cel_rules_is_not_trusted(cel_evaluations, monkeypatch):
    """A spec that passed an earlier operator's rules (or was admitted by an older CRD's) is
    evaluated against the current ones."""
    bad = validate_body(_api_body(epsilonHigh=0.1, preset="custom"))
    assert bad and cel_evaluations == ["spec"]
    spec = GRPORunSpec.model_validate(_api_body(epsilonHigh=0.1, preset="custom")["spec"])
    with monkeypatch.context() as earlier:
        earlier.setattr(validation, "_rules_text", lambda: "the rules of an earlier operator, without epsilonHigh's")
        digest_then = cel_digest(spec)
    body = _api_body(epsilonHigh=0.1, preset="custom")
    body["status"]["validatedSpec"] = digest_then
    assert [str(error) for error in validate_body(body)] == ["spec.grpo.epsilonHigh: must be at least epsilon"]
    assert cel_evaluations == ["spec", "spec"]


def test_this_process_remembers_passing_specs_by_digest_and_no_other(cel_evaluations):
    assert isinstance(validate_body(_api_body()), GRPORun)
    assert isinstance(validate_body(_api_body()), GRPORun)  # the same spec: remembered
    assert cel_evaluations == ["spec"]
    assert validate_body(_api_body(epsilonHigh=0.1, preset="custom"))  # another spec: evaluated, refused
    assert validate_body(_api_body(epsilonHigh=0.1, preset="custom"))  # a refusal is not remembered
    assert cel_evaluations == ["spec"] * 3
    assert cel_digest(SPEC) != cel_digest(SPEC.model_copy(update={"suspend": not SPEC.suspend}))


def test_decide_records_the_digest_of_a_valid_spec_and_drops_it_for_an_invalid_one():
    valid = decide(SPEC, GRPORunStatus(), ABSENT, generation=4, now=T0)
    assert valid.status.validated_spec == cel_digest(SPEC)
    errors = [FieldError("spec.grpo.epsilonHigh", "must be at least epsilon")]
    invalid = decide(errors, valid.status, ABSENT, generation=5, now=T0)
    assert invalid.status.validated_spec is None and invalid.status.phase == "Failed"


# ------------------------------------------------------------------- the property: random worlds


KUBELET = {
    "start": lambda attempt: training(attempt),
    "complete": completed,
    "preempt": preempted,
    "crash": crashed,
    "oom": oom,
    "invalid": invalid_input,
    "evict": evicted,
    "lose node": node_lost,
}
JOBS_END = {"evaluated": "Succeeded", "evaluation failed": "Failed"}
WORLD_EVENTS = st.sampled_from([*KUBELET, *JOBS_END, "vanish", "finish deletion", "suspend", "resume", "nothing"])
# What happens, how many seconds pass, and whether the handler that reconciles next dies before it
# patches the status (one time in five).
HANDLER_DIES = st.integers(0, 4).map(lambda roll: roll == 0)
STEPS = st.lists(st.tuples(WORLD_EVENTS, st.integers(0, 300), HANDLER_DIES), min_size=1, max_size=50)


def _live(body: dict) -> bool:
    return body["status"]["phase"] in ("Pending", "Running", "Unknown")


def _roundtrip(status: GRPORunStatus) -> GRPORunStatus:
    """Through JSON and back, as the API server stores it."""
    return GRPORunStatus.model_validate(json.loads(status.model_dump_json(by_alias=True, exclude_none=True)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, max_restarts=st.integers(0, 3), evaluate=st.sampled_from(["none", "final", "every"]))
def test_random_worlds_never_run_two_pods_nor_lose_count(steps, max_restarts, evaluate):
    """Whatever the kubelet, the evaluation Jobs, the user and the operator's own crashes do, in
    whatever order, with a reconcile after each: at most one live pod, no attempt recorded and
    created again, a live pod is never counted as failed, restarts and attempt never go back, one
    condition per type, a finished run stays finished, a trained one is never Failed and succeeds
    only once its evaluations are done, no score is lost, and the status survives the API server's
    round trip."""
    spec = make_spec(
        max_restarts=max_restarts, active_deadline_seconds=20_000, ttl_seconds_after_finished=100,
        evaluation=EvaluationSpec(checkpoints=evaluate),
    )
    pods: dict[int, dict] = {}
    jobs: dict[int, str] = {}  # checkpoint step → the Job's phase
    recorded: set[int] = set()  # attempts whose pod the stored status says was created
    status, now, generation = GRPORunStatus(), T0, 1
    for event, seconds, handler_dies in steps:
        now += timedelta(seconds=seconds)
        newest = max((attempt for attempt, body in pods.items() if body["status"]["phase"] != "gone"), default=None)
        if event in KUBELET and newest is not None and _live(pods[newest]):
            if event != "start" or pods[newest]["status"]["phase"] == "Pending":
                pods[newest] = KUBELET[event](newest)
        elif event == "vanish" and newest is not None:
            pods[newest]["status"] = {"phase": "gone"}  # the object is deleted; its attempt is not reused
        elif event == "finish deletion":  # the pods being deleted finish stopping and go
            for body in pods.values():
                if body["metadata"].get("deletionTimestamp") and _live(body):
                    body["status"] = {"phase": "gone"}
        elif event in ("suspend", "resume"):
            spec, generation = spec.model_copy(update={"suspend": event == "suspend"}), generation + 1
        elif event in JOBS_END and "Running" in jobs.values():
            jobs[min(step for step, phase in jobs.items() if phase == "Running")] = JOBS_END[event]
        if event == "start" and newest is not None and evaluate == "every":  # it trained a while and saved
            saved = (status.latest_checkpoint.step if status.latest_checkpoint else 0) + 100
            status = status.model_copy(update={"latest_checkpoint": CheckpointRef(step=saved, uri="")})

        newest = max((attempt for attempt, body in pods.items() if body["status"]["phase"] != "gone"), default=None)
        visible = pods[newest] if newest is not None else None  # what the handler lists: the newest pod there is
        evaluations = _evaluation_jobs(jobs) if watches_evaluations(spec, status) else ()
        decision = decide(spec, status, observe_pod(visible), generation=generation, now=now, evaluations=evaluations)
        assert decision == decide(spec, status, observe_pod(visible), generation=generation, now=now, evaluations=evaluations)
        _check(status, decision.status, visible, max_restarts, jobs)
        _apply(decision, pods, recorded, jobs)
        assert sum(_live(body) for body in pods.values()) <= 1
        if decision.delete_run:
            return
        if not handler_dies:
            status = _roundtrip(decision.status)
            if any(c.type == "Created" and c.status == "True" for c in status.conditions):
                recorded.add(status.attempt)


def _evaluation_jobs(jobs: dict[int, str]) -> tuple[EvaluationObservation, ...]:
    def scores(step):
        return tuple(BenchmarkScore(benchmark=b, checkpoint_step=step, score=0.5, n=30) for b in BENCHMARKS)

    return tuple(
        EvaluationObservation(step, f"job-{step}", EvaluationState(phase), scores=scores(step) if phase == "Succeeded" else (),
                              reason="" if phase == "Running" else "Evaluated" if phase == "Succeeded" else "DeadlineExceeded")
        for step, phase in sorted(jobs.items())
    )


def _apply(decision: Decision, pods: dict[int, dict], recorded: set[int], jobs: dict[int, str]) -> None:
    for checkpoint in decision.create_jobs:
        jobs.setdefault(checkpoint.step, "Running")  # a repeated create: AlreadyExists
    if decision.create_pod is not None:
        assert not any(_live(body) for body in pods.values()), "created a pod beside a live one"
        assert pods.get(decision.create_pod, {"status": {"phase": "gone"}})["status"]["phase"] == "gone", "name taken"
        # A pod created by a handler that died before recording it, and deleted before the next
        # look, left no trace: its attempt may come again, with no pod beside it.
        assert decision.create_pod not in recorded, f"attempt {decision.create_pod} created twice"
        pods[decision.create_pod] = pod(decision.create_pod)
    if decision.delete_pod is not None:
        (body,) = [body for body in pods.values() if body["metadata"].get("name") == decision.delete_pod]
        body["metadata"]["deletionTimestamp"] = "2025-05-01T12:00:00Z"


def _check(before: GRPORunStatus, after: GRPORunStatus, visible: dict | None, max_restarts: int, jobs: dict[int, str]) -> None:
    assert after.restarts >= before.restarts and after.attempt >= before.attempt
    assert after.restarts <= max_restarts + 1
    if after.restarts > before.restarts:
        assert visible is None or not _live(visible), "a live pod counted as a failure"
    kinds = [condition.type for condition in after.conditions]
    assert len(kinds) == len(set(kinds))
    if before.phase in ("Succeeded", "Failed"):
        assert after.phase == before.phase
    elif before.phase == "Evaluating":
        assert after.phase in ("Evaluating", "Succeeded"), "a trained run never fails"
    elif after.phase in ("Evaluating", "Succeeded"):
        assert observe_pod(visible).state is PodState.COMPLETED
    if after.phase == "Succeeded" and before.phase != "Succeeded":
        assert "Running" not in jobs.values(), "succeeded before its evaluations ended"
    kept = {(score.checkpoint_step, score.benchmark) for score in after.evaluations}
    assert {(score.checkpoint_step, score.benchmark) for score in before.evaluations} <= kept, "a score was lost"


# --------------------------------------------------------------------------- termination message


MESSAGES = st.builds(
    TerminationMessage,
    outcome=st.sampled_from(Outcome),
    step=st.none() | st.integers(0, 10**9),
    reason=st.none() | st.from_regex(r"[A-Z][A-Za-z]{0,30}", fullmatch=True),
    message=st.text(max_size=200),
    checkpoint_uri=st.none() | st.text(min_size=1, max_size=100),
)


@given(MESSAGES)
def test_termination_message_round_trips(message):
    assert TerminationMessage.parse(message.to_json()) == message


@given(
    st.builds(
        TerminationMessage,
        outcome=st.sampled_from(Outcome),
        reason=st.none() | st.text(min_size=1, max_size=3000),
        message=st.text(max_size=6000),
        checkpoint_uri=st.none() | st.text(min_size=1, max_size=3000),
    )
)
def test_termination_message_fits_what_the_kubelet_keeps(message):
    text = message.to_json()
    assert len(text.encode()) <= MAX_BYTES
    parsed = TerminationMessage.parse(text)
    assert parsed.outcome == message.outcome
    if len(message._encode()) <= MAX_BYTES:
        assert parsed == message
    else:  # cut from the end, marked, message first
        assert message.message.startswith(parsed.message.removesuffix("…"))


def test_an_oversized_message_keeps_its_outcome_step_and_uri():
    uri = "s3://grpo-checkpoints/open-rs/open-rs-exp2/checkpoints/step-120"
    big = TerminationMessage(Outcome.PREEMPTED, step=120, message="é\n\x00" * 5000, checkpoint_uri=uri)
    parsed = TerminationMessage.parse(big.to_json())
    assert len(big.to_json()) <= MAX_BYTES < len(big._encode())
    assert (parsed.step, parsed.checkpoint_uri) == (120, uri) and parsed.message.endswith("…")


@given(st.text() | st.binary().map(lambda b: b.decode("latin-1")))
def test_parse_takes_any_text(text):
    assert TerminationMessage.parse(text) is None or isinstance(TerminationMessage.parse(text), TerminationMessage)


@pytest.mark.parametrize(
    "text",
    ["", LOG_TAIL, "null", "[1, 2]", '{"outcome": "exploded"}', '{"step": 3}', "[" * 100_000, '{"outcome": "completed"',
     yaml.safe_dump({"outcome": "completed"})],
)
def test_parse_returns_none_for_what_is_not_a_termination_message(text):
    assert TerminationMessage.parse(text) is None


def test_parse_drops_fields_of_the_wrong_type():
    parsed = TerminationMessage.parse('{"outcome": "preempted", "step": true, "reason": 3, "message": ["x"], "extra": 1}')
    assert parsed == TerminationMessage(Outcome.PREEMPTED)
    assert TerminationMessage.parse('{"outcome": "completed", "step": -1}').step is None


def test_write_never_raises(tmp_path, caplog):
    message = TerminationMessage(Outcome.INVALID, reason="DatasetError", message="data.jsonl: line 3: not JSON")
    message.write(str(tmp_path / "termination-log"))
    assert TerminationMessage.parse((tmp_path / "termination-log").read_text()) == message
    message.write(str(tmp_path / "missing" / "termination-log"))
    message.write(str(tmp_path))  # a directory
    assert "termination message not written" in caplog.text

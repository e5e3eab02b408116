"""The kopf handlers of the GRPORun operator: ``grpo operator``, or ``kopf run -m grpo_operator.handlers``
(without the new-run watch of :mod:`grpo_operator.new_runs`: that command does not tell the
handlers which namespaces kopf watches).

Each run gets one reconcile loop, a kopf daemon, like a controller-runtime worker for its key: a
pass (:func:`grpo_operator.reconciliation.reconcile`) reads the run, its evaluation Jobs and its
pods from the API server, asks :func:`grpo_operator.state.decide` what to do, and does it; the loop
posts the pass's events and sleeps until a pod or Job of the run
is in a version its last pass did not read, the run's spec or (evaluating every checkpoint) its
latest checkpoint changes, or the time comes that the decision asked to come back at (a backoff,
the deadline, the TTL). Level-based: each pass looks only at what is
stored now, so an event missed, repeated, or lost with an operator restart changes nothing. One loop
per run means one reconcile at a time per run, as the attempt protocol in state.py needs; a new
run's first pass may come from the new-run watch, which the loop waits for.

Everything kopf itself stores lives under ``grpo.dev``: its finalizer (kopf stops a run's loop
before the run goes) and, were there change handlers, their progress and diff base, in annotations
rather than kopf's default ``status.kopf``, which the CRD's status schema has no place for. The
handlers return nothing, so kopf writes no results into the status either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import urllib3

from grpo_operator import manifests, metrics
from grpo_operator.cluster import ApiException, Cluster, describe
from grpo_operator.manifests import APP_LABEL, RUN_LABEL
from grpo_operator.new_runs import FirstPasses, NewRunWatch
from grpo_operator.reconciliation import Validation, reconcile
from grpo_operator.state import Event
from grpo_trainer.spec import API_GROUP, API_VERSION, PLURAL

RUNS = (API_GROUP, API_VERSION, PLURAL)
PODS = ("", "v1", "pods")
JOBS = ("batch", "v1", "jobs")
POD_LABELS: dict[str, Any] = {**APP_LABEL, RUN_LABEL: kopf.PRESENT}
"""The labels of every pod and Job of a run."""

RESYNC = timedelta(minutes=5)
"""The longest a run's loop sleeps: a safety net for a change whose watch event went missing."""

API_ERRORS = (ApiException, urllib3.exceptions.HTTPError)

PASS_WORKERS = min(32, (os.cpu_count() or 1) + 4)
"""How many passes run at once: as many as asyncio's default executor has threads, so a pass that
has its turn never waits for a thread."""


class Passes:
    """Runs the reconcile passes of every run's loop in worker threads, at most ``workers`` at once,
    urgent ones first: a pass for a generation of a run that the operator has not reconciled yet
    (a new run, a changed spec) goes before every waiting routine pass (a run the operator only
    checks again: after its restart, a thousand at once; on a resync; on its pod's progress). Each
    lane is first come, first served."""

    def __init__(self, workers: int):
        self._free = workers
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._routine: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def turn(self, urgent: bool) -> AsyncIterator[None]:
        """A worker for the block: run the pass in a thread (asyncio.to_thread) within it."""
        if self._free and not (self._urgent or self._routine):
            self._free -= 1
        else:
            turn = asyncio.get_running_loop().create_future()
            (self._urgent if urgent else self._routine).append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # given the turn as it was cancelled: pass it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for lane in (self._urgent, self._routine):
            while lane:
                turn = lane.popleft()
                if not turn.done():  # a cancelled waiter's turn is done already
                    turn.set_result(None)
                    return
        self._free += 1


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator."""
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # A run's loop exits within a few event-loop cycles of being stopped, more than kopf waits by
    # default; a deleted run would then keep its finalizer for cancellation_backoff more.
    settings.background.instant_exit_timeout = 0.1
    # Watch only the runs' pods and Jobs, filtered by the API server rather than in here.
    for resource in (PODS, JOBS):
        settings.watching.label_selectors[resource] = ",".join(
            key if value is kopf.PRESENT else f"{key}={value}" for key, value in POD_LABELS.items()
        )


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    memo.wakeups = {}  # (namespace, run name) → the Wakeup its loop sleeps on
    memo.checkpoints = {}  # (namespace, run name) → the step of the latest checkpoint a wake-up was for
    backoffs = settings.networking.error_backoffs
    memo.retry_delays = (list(backoffs) if isinstance(backoffs, Iterable) else [backoffs]) or [1.0]
    memo.default_images = manifests.default_images(os.environ)
    memo.passes = Passes(PASS_WORKERS)
    if "cluster" not in memo:  # tests and benchmarks bring one connected to their API server
        memo.cluster = Cluster.connect()
    memo.first_passes = FirstPasses()
    memo.new_runs = NewRunWatch(memo.cluster, memo.first_passes, memo.default_images)
    if "namespaces" in memo:  # what kopf watches (None: every namespace); not known to `kopf run -m`
        memo.new_runs.start(memo.namespaces)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.new_runs.stop()
    memo.cluster.close()


# Stopped (the run deleted, the operator exiting), a loop finishes its pass first; after a second, it is
# cancelled (the pass's thread finishes on its own). A deleted run keeps kopf's finalizer till then.
@kopf.daemon(*RUNS, id="reconcile", cancellation_backoff=1.0, cancellation_timeout=5.0)
async def reconcile_loop(
    namespace: str | None,
    name: str,
    body: kopf.Body,
    retry: int,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A run's reconcile loop, from its creation (or the operator's start) until kopf stops it.
    ``body`` is the run as last watched: kopf updates a daemon's in place."""
    assert namespace is not None  # GRPORuns are namespaced
    key, uid = (namespace, name), body.metadata.uid
    wakeup = memo.wakeups[key] = Wakeup()
    validation = Validation()
    failures = 0
    # The first pass takes the run as kopf last watched it instead of reading it (after a restart,
    # a thousand reads fewer). Safe only while this process has written nothing to the run, so
    # that kopf's copy is no older than any write the pass must see: not in a loop kopf restarted
    # after a failure (retry > 0), not after the new-run watch passed the run, and not after that
    # pass. A change since wakes the next pass.
    takes_watched_body = retry == 0
    early_pass = memo.first_passes.loop_starts(uid)
    try:
        if early_pass is not None:  # the new-run watch passed the run first: one pass at a time
            takes_watched_body = False
            with contextlib.suppress(Exception):  # failed: the watch logged it; this loop passes anyway
                early = await asyncio.shield(asyncio.wrap_future(early_pass))
                validation = early.validation
                _post(body, early.events)
        while not stopped:
            wakeup.pass_begins()
            try:
                async with memo.passes.turn(_new_generation(body.metadata, body.status)):
                    # kopf replaces the body's source whole, on this thread: a consistent snapshot.
                    watched = dict(body) if takes_watched_body else None
                    takes_watched_body = False
                    done = await asyncio.to_thread(
                        reconcile, memo.cluster, namespace, name, validation, memo.default_images, watched
                    )
            except API_ERRORS as error:  # retried as kopf retries its own API calls
                metrics.RECONCILE_ERRORS.inc()
                delay = memo.retry_delays[min(failures, len(memo.retry_delays) - 1)]
                failures += 1
                logger.warning(f"reconcile failed, again in {delay} s: {describe(error)}")
                wakeup.pass_ended(read=None)
                requeue_at = datetime.now(UTC) + timedelta(seconds=delay)
            else:
                failures = 0
                _post(body, done.events)
                wakeup.pass_ended(read=done.read)
                requeue_at = done.requeue_at
            await _sleep(requeue_at, wakeup, stopped)
    finally:
        memo.first_passes.loop_ends(uid)
        if memo.wakeups.get(key) is wakeup:  # a new run of the same name may have its own loop by now
            del memo.wakeups[key]
            memo.checkpoints.pop(key, None)
            metrics.RUNS.forget(namespace, name)


def _post(run: kopf.Body, events: Iterable[Event]) -> None:
    """Post a pass's events for the run (after its status was patched: a pass killed in between
    loses one, posts none twice)."""
    for event in events:
        kopf.event(run, type=event.type, reason=event.reason, message=event.message)


def _new_generation(meta: Mapping[str, Any], status: Mapping[str, Any], **_: Any) -> bool:
    return meta.get("generation") != status.get("observedGeneration")


@kopf.on.event(*RUNS, when=_new_generation)
async def wake_on_spec_change(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A changed spec (spec.suspend, say): the run's loop reconciles now. Status updates, the
    operator's and the trainer's, change no generation and wake nothing."""
    _wake(memo, namespace, name)


def _evaluates_every_checkpoint(spec: Mapping[str, Any], **_: Any) -> bool:
    return (spec.get("evaluation") or {}).get("checkpoints") == "every"


@kopf.on.event(*RUNS, when=_evaluates_every_checkpoint)
async def wake_on_new_checkpoint(
    namespace: str | None, name: str, status: Mapping[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    """The trainer reported a new checkpoint, which evaluation.checkpoints every evaluates: the
    run's loop reconciles now. Other status updates wake nothing."""
    step = (status.get("latestCheckpoint") or {}).get("step")
    if step is not None and memo.checkpoints.get((namespace, name)) != step:
        memo.checkpoints[(namespace, name)] = step
        _wake(memo, namespace, name)


def _unread(namespace: str | None, labels: Mapping[str, str], meta: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> bool:
    """Whether the run's loop has started and its last pass did not read this version of its pod or
    Job: otherwise the event changes nothing, and kopf need not call (nor log) the handler."""
    wakeup = memo.wakeups.get((namespace, labels[RUN_LABEL]))
    return wakeup is not None and wakeup.unread(meta["uid"], meta["resourceVersion"])


@kopf.on.event(*PODS, labels=POD_LABELS, when=_unread)
async def wake_on_pod_change(
    namespace: str | None, labels: Mapping[str, str], meta: Mapping[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    """A pod of a run (a trainer or an evaluation) was created, changed or deleted, or kopf lists
    it: its run's loop reconciles now, unless its last pass read this version of the pod."""
    _wake(memo, namespace, labels[RUN_LABEL], meta)


@kopf.on.event(*JOBS, labels=POD_LABELS, when=_unread)
async def wake_on_job_change(
    namespace: str | None, labels: Mapping[str, str], meta: Mapping[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    """An evaluation Job of a run changed (it finished, say), or kopf lists it: its run's loop
    reconciles now, unless its last pass read this version of the Job."""
    _wake(memo, namespace, labels[RUN_LABEL], meta)


def _wake(memo: kopf.Memo, namespace: str | None, name: str, meta: Mapping[str, Any] | None = None) -> None:
    """Wake the run's loop; for a pod or Job (its ``meta``), only if its last pass did not read that version."""
    wakeup = memo.wakeups.get((namespace, name))
    if wakeup is None:  # the loop has not started yet, and will read the change when it does
        return
    if meta is None:
        wakeup.set()
    else:
        wakeup.watched(meta["uid"], meta["resourceVersion"])


class Wakeup:
    """What a run's loop sleeps on between passes. A pod or Job wakes it only in a version that
    its last pass did not read: after a restart, kopf's first listing sends an event for every pod
    and Job, which would otherwise pass each run again right after its first pass. A version
    watched while a pass is under way is judged against what that pass read, once it is done."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._read: Mapping[str, str] = {}  # uid → resourceVersion of each pod and Job the last pass listed
        self._watched_in_pass: dict[str, str] | None = None  # uid → latest version watched; None: no pass under way

    def set(self) -> None:
        """Wake the loop, whatever its last pass read."""
        self._event.set()

    def unread(self, uid: str, version: str) -> bool:
        """Whether the last pass did not read this version of the pod or Job."""
        return self._read.get(uid) != version

    def watched(self, uid: str, version: str) -> None:
        """A watch event (or kopf's listing) says a pod or Job of the run is in this version now."""
        if not self.unread(uid, version):
            return
        if self._watched_in_pass is None:
            self._event.set()
        else:
            self._watched_in_pass[uid] = version

    def pass_begins(self) -> None:
        """Before the pass reads anything: a change from now on wakes the next pass, unless this one read it."""
        self._event.clear()
        self._watched_in_pass = {}

    def pass_ended(self, read: Mapping[str, str] | None) -> None:
        """``read``: the version of each pod and Job the pass listed, by uid; None if it failed
        (the last pass's reading stands; the loop retries anyway)."""
        watched, self._watched_in_pass = self._watched_in_pass or {}, None
        if read is not None:
            self._read = read
        if any(self._read.get(uid) != version for uid, version in watched.items()):
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


async def _sleep(until: datetime | None, wakeup: Wakeup, stopped: kopf.DaemonStopped) -> None:
    """Until the time comes (at most RESYNC from now), the run's loop is woken, or kopf stops it."""
    now = datetime.now(UTC)
    seconds = (min(until, now + RESYNC) if until is not None else now + RESYNC) - now
    waiters = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(seconds.total_seconds(), 0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()

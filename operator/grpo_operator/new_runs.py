"""The new-run watch: a new GRPORun's first pass at once, whatever kopf is busy with.

kopf serves the objects it watches first come, first served, on one event loop: after a restart it
works through its listing of every run and pod (2 to 3 ms of loop time each) before it handles a run
applied meanwhile, so with a thousand runs resident a new run waited 3 to 13 s for its pod
(benchmarks/README.md). This watch follows the runs from the operator's start on, in a thread of its
own, and gives a new run (one the operator never reconciled: no ``observedGeneration``) its first
pass as soon as it is applied, unless kopf has started the run's loop already.

kopf stays the way every run is reconciled; the watch only goes first. The run's loop, once kopf
starts it, waits for that early pass to finish (one pass at a time per run, as state.py's attempt
protocol needs), posts that pass's events, and goes on with a pass of its own that reads the run and
its pods as the early pass left them. An event the watch misses (a watch that expired, an API error) only
leaves that run to kopf, as before.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from grpo_operator import metrics
from grpo_operator.cluster import ApiException, Cluster, describe
from grpo_operator.reconciliation import Validation, reconcile
from grpo_operator.state import Event

WATCH_SECONDS = 60
"""How long one watch request lasts before it is renewed (and the thread sees whether to stop)."""

RETRY_SECONDS = 1.0
"""The wait before watching again after an API error."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarlyPass:
    """What the watch's pass leaves the run's loop: the validation it made, to keep, and the events
    to post (kopf posts events only from its own tasks)."""

    validation: Validation
    events: tuple[Event, ...]


class FirstPasses:
    """Which of the new-run watch and the run's loop passes a new run first; never both at once.
    Thread-safe: the watch claims runs in its threads, loops start and end on kopf's event loop.
    Keyed by the run's uid, so that a run deleted and applied again under its name is a new run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loops: set[str] = set()
        self._early: dict[str, concurrent.futures.Future[EarlyPass]] = {}

    def claim(self, uid: str) -> concurrent.futures.Future[EarlyPass] | None:
        """The watch may pass the run: a future to resolve when its pass is done; None if the run's
        loop has started, or the watch claimed the run already."""
        with self._lock:
            if uid in self._loops or uid in self._early:
                return None
            claimed = self._early[uid] = concurrent.futures.Future()
            return claimed

    def loop_starts(self, uid: str) -> concurrent.futures.Future[EarlyPass] | None:
        """The run's loop starts: the early pass to wait for, if the watch claimed the run."""
        with self._lock:
            self._loops.add(uid)
            return self._early.pop(uid, None)

    def loop_ends(self, uid: str) -> None:
        with self._lock:
            self._loops.discard(uid)

    def forget(self, uid: str) -> None:
        """The run is gone: its loop, if it ever starts, has nothing to wait for."""
        with self._lock:
            self._early.pop(uid, None)


class NewRunWatch:
    """One thread per watched namespace (or one for every namespace) that passes new runs first."""

    def __init__(self, cluster: Cluster, first_passes: FirstPasses, default_images: Mapping[str, str]):
        self._cluster = cluster
        self._first_passes = first_passes
        self._default_images = default_images
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, namespaces: Iterable[str] | None) -> None:
        """Watch these namespaces (None: every namespace). A glob such as ``team-*`` is not watched:
        its new runs wait for kopf, which lists the namespaces that match."""
        for namespace in [None] if namespaces is None else namespaces:
            if namespace is not None and any(char in namespace for char in "*?[!"):
                logger.info(f"new runs in {namespace!r} wait for kopf: the new-run watch follows named namespaces only")
                continue
            thread = threading.Thread(target=self._watch, args=(namespace,), name=f"new-runs:{namespace or '*'}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching; a pass under way finishes. The threads end with their watch requests."""
        self._stop.set()

    def _watch(self, namespace: str | None) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._cluster.runs_version(namespace)
                for kind, run in self._cluster.watch_runs(namespace, version, WATCH_SECONDS):
                    if self._stop.is_set():
                        return
                    version = run["metadata"]["resourceVersion"]
                    if kind == "ADDED" and "observedGeneration" not in (run.get("status") or {}):
                        self._pass(run)
                    elif kind == "DELETED":
                        self._first_passes.forget(run["metadata"]["uid"])
            except Exception as error:  # kopf still reconciles every run: what is missed meanwhile waits for it
                if isinstance(error, ApiException) and error.status == 410:  # the version expired
                    version = None
                    continue
                logger.warning(f"the new-run watch starts again in {RETRY_SECONDS} s: {describe(error)}")
                time.sleep(RETRY_SECONDS)

    def _pass(self, run: Mapping[str, Any]) -> None:
        """The run's first pass, on the run as watched: nothing this process wrote can be newer."""
        metadata = run["metadata"]
        claimed = self._first_passes.claim(metadata["uid"])
        if claimed is None:
            return
        validation = Validation()
        try:
            done = reconcile(self._cluster, metadata["namespace"], metadata["name"], validation, self._default_images, run)
        except Exception as error:  # the run's loop passes it again anyway
            metrics.RECONCILE_ERRORS.inc()
            logger.warning(f"the early pass of {metadata['namespace']}/{metadata['name']} failed: {describe(error)}")
            claimed.set_exception(error)
        else:
            claimed.set_result(EarlyPass(validation, done.events))

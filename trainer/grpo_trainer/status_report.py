"""The trainer's part of its GRPORun's status: where training stands, and its latest checkpoint.

In the run's pod, rank 0 merge-patches ``/status`` of its own GRPORun with ``status.progress`` after
each step and ``status.latestCheckpoint`` after each save, so ``kubectl get grporuns`` shows the step,
reward and ETA without anyone reading logs. It writes as field manager ``grpo-trainer`` and only those
two fields: phase, conditions, attempt and restarts are the operator's.

Reporting is best effort. A patch that fails (API server down, 403, 409, a timeout) is a warning and
is sent again with the next one; a request waits a few seconds at most, so a sick API server can
neither stop nor stall training. Progress goes out at most once per ``min_interval`` seconds, and
always for the last step and with each checkpoint, so long runs do not hammer the API server.

Only ``latestCheckpoint`` is written, not the ``checkpoints`` list: a merge patch replaces lists
whole, so appending would take a read-modify-write per checkpoint (with a conflict retry), and the
checkpoint store prunes to ``keepLast`` and the best one, so a list kept here would name checkpoints
that are gone. The store's manifests say which checkpoints exist.

The API server is reached with plain urllib and the pod's service-account files, as the Kubernetes
clients' in-cluster configuration reads them: one PATCH does not justify the ``kubernetes`` client
and its dependencies in the trainer image.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import HTTPSHandler, ProxyHandler, Request, build_opener

from pydantic import ValidationError

from grpo_trainer.spec import API_GROUP, API_VERSION, PLURAL, CheckpointRef, GRPORunStatus, Progress

logger = logging.getLogger(__name__)

FIELD_MANAGER = "grpo-trainer"
"""Who owns the fields the trainer writes, in managedFields; the operator writes as another manager."""
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL_SECONDS = 10.0
TIMEOUT_SECONDS = 5.0


def progress_of(
    record: Mapping[str, Any], *, total_steps: int, mean_step_seconds: float | None, now: datetime
) -> Progress:
    """``status.progress`` for a step record (:func:`grpo_trainer.metrics.step_record`); a
    ValidationError names what in the record does not fit."""
    step = record.get("step")
    remaining = max(total_steps - step, 0) if isinstance(step, int) else None
    eta = None if mean_step_seconds is None or remaining is None else round(mean_step_seconds * remaining)
    return Progress.model_validate(
        {
            "step": step,
            "total_steps": total_steps,
            "reward": record.get("reward"),
            "accuracy": record.get("accuracy"),
            "completion_length": record.get("completions/mean_length"),
            "kl": record.get("kl"),
            "tokens_per_second": record.get("tokens_per_second"),
            "eta_seconds": eta,
            "last_update_time": now,
        }
    )


def failure_reason(error: Exception) -> str:
    """Why a request failed, in the API server's words when it answered."""
    if isinstance(error, HTTPError):
        try:
            message = json.loads(error.read())["message"]  # the body is a metav1.Status
        except (OSError, ValueError, TypeError, KeyError):
            message = None
        return f"HTTP {error.code} {error.reason}" + (f": {message}" if message else "")
    if isinstance(error, URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)  # metav1.Time has whole seconds


class StatusReporter:
    """Reports a run's progress and checkpoints to the status of GRPORun ``namespace/name``.

    ``token`` is called for each request: the kubelet rotates the projected token file. ``clock``
    (monotonic seconds) paces the progress patches.
    """

    def __init__(
        self,
        api_url: str,
        token: Callable[[], str],
        namespace: str,
        name: str,
        *,
        total_steps: int,
        ca_file: Path | None = None,
        min_interval: float = MIN_INTERVAL_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.url = f"{api_url.rstrip('/')}{path}?{urlencode({'fieldManager': FIELD_MANAGER})}"
        self.run = f"GRPORun {namespace}/{name}"
        self.token = token
        self.total_steps = total_steps
        self.min_interval = min_interval
        self.timeout = timeout
        self.clock = clock
        # Straight to the API server, as the kubernetes Python client goes: a proxy set in the
        # environment is there for downloads, not for the cluster's own API server.
        context = ssl.create_default_context(cafile=ca_file)
        self.opener = build_opener(ProxyHandler({}), HTTPSHandler(context=context))
        self.status = GRPORunStatus()  # what this trainer last meant the status to say
        self.unsent: set[str] = set()  # fields of self.status the API server has not taken yet
        self.last_attempt: float | None = None
        self.step_seconds = 0.0
        self.steps_timed = 0

    @classmethod
    def from_environment(
        cls,
        total_steps: int,
        *,
        environ: Mapping[str, str] = os.environ,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> StatusReporter | None:
        """The reporter for the run whose pod this is; None outside one (no GRPO_RUN_NAME: a run on a
        laptop), or with a warning when the pod lacks what it takes to reach the API server."""
        name = environ.get("GRPO_RUN_NAME")
        if not name:
            return None
        namespace = environ.get("GRPO_NAMESPACE")
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        token_file, ca_file = service_account_dir / "token", service_account_dir / "ca.crt"
        missing = [
            what
            for what, there in [
                ("GRPO_NAMESPACE", namespace),
                ("KUBERNETES_SERVICE_HOST", host),
                ("KUBERNETES_SERVICE_PORT", port),
                (str(token_file), token_file.is_file()),
                (str(ca_file), ca_file.is_file()),
            ]
            if not there
        ]
        if missing:
            logger.warning(
                "GRPO_RUN_NAME is %s but the pod lacks %s: progress is not reported to the run's status",
                name, ", ".join(missing),
            )
            return None
        assert namespace and host and port  # each is in ``missing`` otherwise
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return cls(
            f"https://{host}:{port}",
            lambda: token_file.read_text().strip(),
            namespace,
            name,
            total_steps=total_steps,
            ca_file=ca_file,
        )

    def report_step(self, record: Mapping[str, Any]) -> None:
        """Take a step's record; patch the status if this is the last step or the last patch is
        ``min_interval`` seconds old."""
        seconds = record.get("time/step")
        if isinstance(seconds, int | float):
            self.step_seconds += seconds
            self.steps_timed += 1
        mean_seconds = self.step_seconds / self.steps_timed if self.steps_timed else None
        try:
            progress = progress_of(record, total_steps=self.total_steps, mean_step_seconds=mean_seconds, now=_now())
        except ValidationError as error:
            step = record.get("step")
            logger.warning("not reporting step %s to %s: its record is not valid progress: %s", step, self.run, error)
            return
        self.status.progress = progress
        self.unsent.add("progress")
        due = self.last_attempt is None or self.clock() - self.last_attempt >= self.min_interval
        if due or progress.step >= self.total_steps:
            self._send(f"progress of step {progress.step}")

    def report_checkpoint(self, step: int, uri: str) -> None:
        """Patch the status with the checkpoint just saved, and the progress not yet sent."""
        try:
            self.status.latest_checkpoint = CheckpointRef(step=step, uri=uri, time=_now())
        except ValidationError as error:
            logger.warning("not reporting checkpoint %s to %s: %s", uri, self.run, error)
            return
        self.unsent.add("latest_checkpoint")
        self._send(f"checkpoint of step {step}")

    def _send(self, what: str) -> None:
        """Merge-patch the unsent fields into the run's status; a failure is a warning."""
        self.last_attempt = self.clock()
        # The JSON dump: a NaN metric becomes null, which a merge patch reads as "remove".
        status = json.loads(self.status.model_dump_json(by_alias=True, include=self.unsent))
        try:
            request = Request(
                self.url,
                data=json.dumps({"status": status}).encode(),
                method="PATCH",
                headers={
                    "Content-Type": "application/merge-patch+json",
                    "Accept": "application/json",
                    "Authorization": f"Bearer {self.token()}",
                },
            )
            with self.opener.open(request, timeout=self.timeout) as response:
                response.read()
        except (OSError, HTTPException) as error:  # URLError, HTTPError and timeouts are OSErrors
            logger.warning("could not report the %s to %s: %s", what, self.run, failure_reason(error))
            return
        self.unsent.clear()

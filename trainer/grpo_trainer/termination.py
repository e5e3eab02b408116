"""How a trainer attempt ended: the contract between the trainer container and the operator.

The trainer writes one JSON object to /dev/termination-log and exits; the kubelet copies the file into
the pod's ``status.containerStatuses[].state.terminated.message`` (at most 4096 bytes), where the
operator reads it beside the exit code:

- exit 0, outcome ``completed``: trained to maxSteps, the final model is written;
- exit 0, outcome ``preempted``: got SIGTERM, wrote a checkpoint at ``step`` and stopped cleanly;
- exit 0, outcome ``evaluated`` (an evaluation Job's ``grpo eval``): ``scores``, one object per
  benchmark in the shape of the status's BenchmarkScore, for the checkpoint at ``step``;
- exit EXIT_INVALID, outcome ``invalid``: bad input (``reason`` such as DatasetError, ``message``
  naming the field or file) that no retry fixes;
- exit EXIT_WEIGHT_SYNC, outcome ``failed``, reason ``WeightSyncFailed``: the policy's weights did
  not reach the vLLM sidecar by either path; a new pod (a fresh sidecar) resumes from the latest
  checkpoint;
- exit EXIT_STORAGE_FULL, outcome ``failed``, reason ``StorageFull``: a checkpoint does not fit on
  the staging folder's or a file:// store's filesystem (the message names it, the bytes needed and
  free). Not retried: a new pod mounts the same volume and the checkpoint is no smaller, so a retry
  would only burn GPU hours to fail at the same save; once space is freed (or the volume grown, or
  keepLast lowered), the run re-created under the same name resumes from its newest checkpoint;
- any other exit: a crash, retried from the latest checkpoint (outcome ``failed`` when the trainer
  could say why).

With ``terminationMessagePolicy: FallbackToLogsOnError`` a container that wrote nothing gets the tail
of its log there instead, so :meth:`TerminationMessage.parse` takes anything and returns None for
what is not ours. Standard library only: the operator image imports this module too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from enum import StrEnum

logger = logging.getLogger(__name__)

EXIT_RETRYABLE = 1  # a failure that may pass on another try: an unreachable store, a failed upload
EXIT_INVALID = 2  # bad input: a manifest that is not a valid GRPORun, a file that cannot be read
EXIT_WEIGHT_SYNC = 3  # retryable: the vLLM sidecar did not take the weights (NCCL and /dev/shm both failed)
EXIT_STORAGE_FULL = 4  # permanent: a checkpoint does not fit where it is written
STORAGE_FULL = "StorageFull"  # its reason; torchrun exits 1 whatever a rank's code, so the operator reads this

TERMINATION_LOG = "/dev/termination-log"
MAX_BYTES = 4096  # what the kubelet keeps of a termination message
_ELLIPSIS = "…"


def _escaped_size(text: str) -> int:
    """Bytes of ``text`` inside a JSON string: ASCII, with everything else escaped."""
    return len(json.dumps(text)) - 2


def _prefix_within(text: str, size: int) -> str:
    """The longest start of ``text`` whose JSON escape takes at most ``size`` bytes."""
    used = 0
    for index, char in enumerate(text):
        used += _escaped_size(char)
        if used > size:
            return text[:index]
    return text


_ELLIPSIS_BYTES = _escaped_size(_ELLIPSIS)


class Outcome(StrEnum):
    COMPLETED = "completed"
    PREEMPTED = "preempted"
    INVALID = "invalid"
    EVALUATED = "evaluated"
    FAILED = "failed"  # retryable, with the reason and message saying why


@dataclass(frozen=True)
class TerminationMessage:
    outcome: Outcome
    step: int | None = None  # the last step trained (completed) or checkpointed (preempted)
    reason: str | None = None  # CamelCase: InvalidSpec, DatasetError, ... (invalid); WeightSyncFailed, StorageFull (failed)
    message: str = ""
    checkpoint_uri: str | None = None
    scores: tuple[dict, ...] = ()  # evaluated: a few hundred bytes for the five benchmarks, never cut

    def to_json(self) -> str:
        """Compact ASCII JSON of at most MAX_BYTES. What does not fit is cut from the end of the
        message first, then of the reason and the checkpoint URI, each cut marked with '…'."""
        fitted = self
        for name in ("message", "reason", "checkpoint_uri"):
            excess = len(fitted._encode()) - MAX_BYTES
            text = getattr(fitted, name)
            if excess <= 0:
                break
            if text:
                kept = _prefix_within(text, _escaped_size(text) - excess - _ELLIPSIS_BYTES)
                fitted = replace(fitted, **{name: kept + _ELLIPSIS if kept else ""})
        return fitted._encode()

    def _encode(self) -> str:
        fields = {key: value for key, value in asdict(self).items() if value not in (None, "", ())}
        # ASCII (non-ASCII escaped), so characters are bytes and even a lone surrogate is writable.
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage | None:
        """The message in ``text``, or None when it is not one (empty, a log tail, a foreign JSON)."""
        try:
            data = json.loads(text or "")
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or data.get("outcome") not in set(Outcome):
            return None
        step = data.get("step")

        def text_field(name: str) -> str | None:
            value = data.get(name)
            return value if isinstance(value, str) and value else None

        return cls(
            outcome=Outcome(data["outcome"]),
            step=step if type(step) is int and step >= 0 else None,  # not bool, which is an int too
            reason=text_field("reason"),
            message=text_field("message") or "",
            checkpoint_uri=text_field("checkpoint_uri"),
            scores=tuple(row for row in data.get("scores") or () if isinstance(row, dict)),
        )

    def write(self, path: str = TERMINATION_LOG) -> None:
        """Write the message for the kubelet. Never raises: outside a pod there is no
        /dev/termination-log, and a lost message must not turn a clean exit into a crash."""
        try:
            with open(path, "w", encoding="utf-8") as file:
                file.write(self.to_json())
        except OSError as error:
            logger.warning("termination message not written to %s (%s): %s", path, error.strerror or error, self.to_json())

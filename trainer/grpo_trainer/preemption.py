"""SIGTERM, as Kubernetes sends it before taking a node or a pod away, becomes a clean stop.

The handler only notes the time and arms a watchdog; the training loop asks ``requested()`` at
points where stopping loses nothing (before a step's rollouts, and after them, before the weights
change), checkpoints and exits 0. If that does not finish within ``grace_seconds`` (matched to the
pod's terminationGracePeriodSeconds) the watchdog ends the process first, so the kubelet's SIGKILL
never lands in the middle of a write it would leave unexplained; the half-written checkpoint has
no manifest and is ignored on resume.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_GRACE_EXPIRED = 3
"""Exit status when the checkpoint after SIGTERM did not finish in time (retryable)."""


class Preemption:
    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.signalled_at: float | None = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.signalled_at is not None:
            return
        self.signalled_at = time.monotonic()
        logger.warning("SIGTERM: stopping at the next safe point to checkpoint (bound %.0f s)", self.grace_seconds)
        watchdog = threading.Timer(self.grace_seconds, self._expire)
        watchdog.daemon = True
        watchdog.start()

    def _expire(self) -> None:
        logger.error("the checkpoint after SIGTERM did not finish within %.0f s; exiting", self.grace_seconds)
        logging.shutdown()
        os._exit(EXIT_GRACE_EXPIRED)

    def requested(self) -> bool:
        """Whether any rank got SIGTERM: every rank must stop at the same point (collective)."""
        flag = torch.tensor([self.signalled_at is not None], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

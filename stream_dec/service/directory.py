"""Health of the checkpoint directory as seen by the loop: failed writes, backoff, recovery.

Journal lines and lease claims are written to the checkpoint directory before a
batch's outputs may leave. When the directory refuses a write (full, read-only,
replaced, a lost mount), the batch waits rather than leave unreplayable:
:class:`DirectoryHealth` counts the failure (``stream_dec_checkpoint_failures_total``,
alerted like a failed checkpoint), logs it and says when to try again, doubling the
wait from 0.1 s up to 5 s; the first write that succeeds after failures is logged too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("stream_dec.service")

#: Shortest and longest wait before a refused write is tried again (seconds).
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 5.0


class DirectoryHealth:
    """Failed writes to one checkpoint directory and the wait before the next try (the loop's thread).

    >>> from stream_dec.service.metrics import ServiceMetrics
    >>> health = DirectoryHealth("/ckpt", ServiceMetrics())
    >>> [health.failed(OSError("disk full")) - time.monotonic() <= b for b in (0.1, 0.2, 0.4)]
    [True, True, True]
    >>> health.backoff_s, health.waiting()
    (0.4, True)
    >>> health.ok(); health.backoff_s
    0.0
    """

    def __init__(self, directory: str | Path, metrics):
        self.directory = Path(directory)
        self.metrics = metrics
        self.backoff_s = 0.0  # wait after the last failure (0: the last write succeeded)
        self.retry_at = 0.0  # monotonic time before which a refused write is not tried again

    def waiting(self) -> bool:
        """Whether a refused write must not be tried again yet."""
        return time.monotonic() < self.retry_at

    def failed(self, exc: OSError) -> float:
        """The directory refused a journal or lease write: count, log, back off; returns :attr:`retry_at`."""
        self.metrics.ckpt_failures.inc()  # a write to the checkpoint directory, alerted like a checkpoint's
        self.backoff_s = min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, 2 * self.backoff_s))
        self.retry_at = time.monotonic() + self.backoff_s
        log.error("checkpoint directory %s unusable (%s); nothing is published until the journal can be written, "
                  "retrying in %.1fs", self.directory, exc, self.backoff_s)
        return self.retry_at

    def ok(self) -> None:
        """A write succeeded: log the recovery after failures."""
        if self.backoff_s:
            log.warning("checkpoint directory %s usable again; resuming", self.directory)
            self.backoff_s = 0.0

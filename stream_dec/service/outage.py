"""Outages: an unreachable broker or output topic is waited out with backoff, then given up.

One :class:`Outage` per service tracks the outage under way, if any: when it began,
what failed (named with the broker and the topic in the log and in the error), the
wait before the next try, and the metrics (``stream_dec_broker_up``,
``stream_dec_outage_seconds_total``; ``/healthz`` answers 503 while it lasts). Past
``STREAM_DEC_KAFKA__MAX_OUTAGE_S`` it raises :class:`OutageError`, which ``stream-dec
run`` turns into exit status 3 (2 stays for bad input and settings).

Invariants:

* An outage never commits anything: the batch whose outputs were not acknowledged
  waits (or the run ends) with its offsets uncommitted and no checkpoint past it.
* Only errors a retry can cure count as an outage (:func:`is_outage`); any other
  Kafka error ends the run as before.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka import errors as kerrors

log = logging.getLogger("stream_dec.service")

#: Exit status of ``stream-dec run`` when an outage outlasts ``max_outage_s``.
EXIT_OUTAGE = 3
#: Exit status of ``stream-dec run`` when input offsets lie outside the log and the policy is ``fail``.
EXIT_OFFSETS = 4

# Errors a later try can cure: the broker, a partition leader or the topic's metadata is
# away for now, or the broker restarted and forgot the idempotent producer
# (docs/kafka-notes.md). kafka-python marks most of them ``retriable``; these are not.
_OUTAGE_TYPES = (
    kerrors.KafkaTimeoutError,
    kerrors.InvalidProducerIdMappingError,
    kerrors.KafkaConnectionError,
    kerrors.UnknownProducerIdError,
    kerrors.OutOfOrderSequenceNumberError,
)


class OutageError(RuntimeError):
    """The broker or the output topic stayed unreachable longer than ``max_outage_s`` (exit status 3)."""


class OffsetsOutOfRangeError(RuntimeError):
    """Input offsets outside the partition's log with ``offset_reset_policy = "fail"`` (exit status 4)."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is a Kafka error that a later try may cure.

    >>> from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
    >>> is_outage(KafkaTimeoutError()), is_outage(MessageSizeTooLargeError()), is_outage(ValueError())
    (True, False, False)
    """
    return isinstance(exc, _OUTAGE_TYPES) or (isinstance(exc, kerrors.KafkaError) and bool(getattr(exc, "retriable", False)))


def backoff_ms(attempt: int, first_ms: int, max_ms: int) -> int:
    """Wait before try ``attempt`` (1-based): ``first_ms`` doubled at each try, at most ``max_ms``.

    >>> [backoff_ms(a, 500, 3000) for a in range(1, 6)]
    [500, 1000, 2000, 3000, 3000]
    """
    return min(max_ms, first_ms * 2 ** min(attempt - 1, 30))


class Outage:
    """The outage under way, if any; thread-safe (the loop and the client's IO thread report to it).

    ``stop``: an event set when the service is asked to stop; it cuts a backoff short.
    """

    def __init__(self, settings, metrics, stop: threading.Event | None = None):
        k = settings.kafka
        self.max_s = k.max_outage_s
        self.first_ms, self.max_ms = k.retry_backoff_ms, k.retry_backoff_max_ms
        self.brokers = k.bootstrap_servers
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.since = 0.0  # monotonic start of the outage under way (0: none)
        self.what = ""
        self.attempts = 0
        self._counted = 0.0  # monotonic time up to which outage seconds are counted
        self._lock = threading.Lock()
        metrics.broker_up.set(1)

    @property
    def active(self) -> bool:
        """Whether an outage is under way."""
        return self.since > 0

    def failed(self, what: str, exc: BaseException | None = None, began: float | None = None) -> None:
        """``what`` (e.g. ``"output topic 'labels'"``) failed; raises :class:`OutageError` once the outage is too old.

        ``began``: when the failed try started (``time.monotonic()``), if it was not now.
        """
        now = time.monotonic()
        with self._lock:
            if not self.since:
                self.since = self._counted = min(now, began or now)
                self.attempts = 0
                log.warning("outage: %s unreachable on %s (%s); retrying for up to %.0f s",
                            what, self.brokers, _describe(exc), self.max_s)
            self.what = what
            self.attempts += 1
            self._count(now)
            self.metrics.broker_up.set(0)
            self.metrics.outage_message = self.message()
            elapsed = now - self.since
        if elapsed >= self.max_s:
            raise OutageError(f"{what} unreachable on {self.brokers} for {elapsed:.0f} s "
                              f"(STREAM_DEC_KAFKA__MAX_OUTAGE_S={self.max_s:g}); last error: {_describe(exc)}")

    def backoff(self) -> None:
        """Wait before the next try (returns early when the service is stopped)."""
        self.stop.wait(backoff_ms(max(1, self.attempts), self.first_ms, self.max_ms) / 1000)
        with self._lock:
            if self.since:
                self._count(time.monotonic())

    def ok(self) -> None:
        """The broker and the output topic answer again (cheap when there was no outage)."""
        if not self.since:
            return
        now = time.monotonic()
        with self._lock:
            if not self.since:
                return
            self._count(now)
            log.warning("outage over: %s reachable again on %s after %.1f s and %d tries", self.what, self.brokers, now - self.since, self.attempts)
            self.since = 0.0
            self.metrics.broker_up.set(1)
            self.metrics.outage_message = ""

    def message(self) -> str:
        """One line for ``/healthz`` while an outage lasts."""
        return f"outage: {self.what} unreachable on {self.brokers} for {time.monotonic() - self.since:.1f}s"

    def retry(self, what: str, fn):
        """``fn()``, tried again after a backoff while it fails with an outage error; ends the outage on success."""
        while True:
            began = time.monotonic()
            try:
                result = fn()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.failed(what, exc, began)
                self.backoff()
                if self.stop.is_set():
                    raise OutageError(f"stopped while {what} was unreachable on {self.brokers}") from None
                continue
            self.ok()
            return result

    def _count(self, now: float) -> None:
        self.metrics.outage_seconds.inc(max(0.0, now - self._counted))
        self._counted = now


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no connection"
    text = str(exc)
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""Dead letters: every input record the model cannot use goes to the dead-letter topic.

A record's dead letter is :func:`stream_dec.io.codecs.dead_letter`: one kafka-python
sends and a default broker stores, whatever the record was (null header values,
tombstones with or without a key, keys and values of any size), bounded by the
``kafka.max_key_bytes`` / ``dlq_max_value_bytes`` / ``dlq_max_header_bytes`` settings.

Invariants:

* An outage is not a refusal: when a dead letter fails while the broker itself is out
  of reach (the service's consumer holds no connection), the dead letters not
  acknowledged are sent again by a new producer after a backoff, like the assignments
  (stream_dec/service/outage.py), until they are acknowledged or the outage outlasts
  ``max_outage_s`` (exit 3, nothing committed, so the restart sends them again).
* A dead letter that still cannot be delivered while the broker answers -- refused by
  ``send`` or by the broker (the DLQ topic's ``max.message.bytes`` or ACLs, a topic that
  cannot be created), or not acknowledged within :data:`ACK_TIMEOUT_S` -- is logged, counted in
  ``stream_dec_dlq_send_failures_total{reason}`` and skipped. It never ends the run and
  never holds the batch's offsets back: the record is then neither labelled nor in the
  DLQ, and its ERROR log line and the counter (alert ``StreamDecDeadLetterSendFailing``)
  are the only trace.
* Dead letters leave through their own producer, neither idempotent nor transactional:
  kafka-python's idempotent producer turns one refused record into a fatal state that
  fails every later send, which on the output producer would fail the assignments too.
  One request in flight keeps them in order without idempotence.
* A batch's dead letters are acknowledged (or given up) before its offsets are
  committed, under exactly-once too: they are outside the batch's transaction, so a
  crash between the two resends byte-identical dead letters (the same
  ``__connect.errors.topic/partition/offset``). Dead letters are at-least-once.
"""

from __future__ import annotations

import collections
import logging
import time

from typing import Callable

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from stream_dec.io.codecs import REASONS, DeadLetter, dead_letter, dead_letter_max_bytes
from stream_dec.io.producer import max_request_size, producer_config
from stream_dec.service.outage import Outage, is_outage

log = logging.getLogger("stream_dec.service")

#: Seconds a send may block on the DLQ topic's metadata, and one request may take: a DLQ
#: topic that cannot be found costs this once per batch (its other dead letters are then
#: given up at once).
TIMEOUT_S = 10
#: Seconds a batch waits for its dead letters' acknowledgements before giving them up (the
#: producer's delivery timeout for ``TIMEOUT_S``).
ACK_TIMEOUT_S = 30
#: Linger of the DLQ producer: the batch's dead letters are flushed together anyway.
LINGER_MS = 5


def dlq_producer_config(settings) -> dict:
    """Keyword arguments of the dead-letter producer.

    >>> from stream_dec.settings import load_settings
    >>> cfg = dlq_producer_config(load_settings(kafka__client_id="svc"))
    >>> cfg["client_id"], cfg["acks"], cfg["enable_idempotence"], cfg["max_in_flight_requests_per_connection"]
    ('svc-dlq', 'all', False, 1)
    >>> cfg["max_request_size"] >= dead_letter_max_bytes(), cfg["delivery_timeout_ms"] == ACK_TIMEOUT_S * 1000
    (True, True)
    """
    k = settings.kafka
    largest = dead_letter_max_bytes(k.max_key_bytes, k.dlq_max_value_bytes, k.dlq_max_header_bytes)
    return producer_config(
        k.bootstrap_list, client_id=f"{k.client_id}-dlq", acks="all", enable_idempotence=False,
        max_in_flight_requests_per_connection=1, linger_ms=LINGER_MS, max_request_size=max_request_size(largest),
        timeout_s=TIMEOUT_S,
    )


class DeadLetters:
    """Sends the dead letters of each batch and counts what became of them.

    ``metrics``: the service's :class:`~stream_dec.service.metrics.ServiceMetrics`: dead
    letters acknowledged count in its ``dlq``, those given up in its ``dlq_failures``.
    :attr:`delivered` and :attr:`failed` count them by reason over the run.
    """

    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        for reason in REASONS:  # every series from 0, so that an alert on increase() sees the first failure
            metrics.dlq_failures.labels(reason)
        self.producer: KafkaProducer | None = None
        self.delivered: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        # (future or None, reason, dead letter) of the dead letters sent and not yet
        # acknowledged; None: send() itself failed in an outage, to be sent again.
        self._unacked: list = []
        self.outage: Outage | None = None
        self._broker_up: Callable[[], bool] = lambda: True

    def start(self, outage: Outage | None = None, broker_up: Callable[[], bool] | None = None) -> None:
        """Build the producer (once, with the service's other clients).

        ``outage`` and ``broker_up`` (whether the broker answers at all) let an outage be
        waited out instead of skipping the dead letters it holds up.
        """
        self.outage = outage
        if broker_up is not None:
            self._broker_up = broker_up
        self.producer = KafkaProducer(**dlq_producer_config(self.settings))

    def _in_outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the broker being away (wait for it) rather than a refusal (skip)."""
        return self.outage is not None and is_outage(exc) and not self._broker_up()

    def send(self, records: list, failures: list) -> None:
        """Send the dead letter of each ``(position, DecodeError)`` of ``failures`` among ``records``."""
        k = self.settings.kafka
        refused: list[tuple[str, Exception]] = []
        timed_out: KafkaTimeoutError | None = None
        for pos, err in failures:
            if timed_out is not None:  # the DLQ topic's metadata did not come: do not wait again
                refused.append((err.reason, timed_out))
                continue
            r = records[pos]
            dl = dead_letter(err, r.key, r.value, r.headers, r.topic, r.partition, r.offset, max_key_bytes=k.max_key_bytes,
                             max_value_bytes=k.dlq_max_value_bytes, max_header_bytes=k.dlq_max_header_bytes)
            try:
                self._unacked.append((self._send(dl), err.reason, dl))
            except (KafkaError, TypeError, ValueError) as exc:  # every error send() documents
                if self._in_outage(exc):
                    self._unacked.append((None, err.reason, dl))
                    continue
                refused.append((err.reason, exc))
                if isinstance(exc, KafkaTimeoutError):
                    timed_out = exc
        self._give_up(refused)

    def _send(self, dl: DeadLetter):
        return self.producer.send(self.settings.kafka.dlq_topic, key=dl.key, value=dl.value, headers=dl.headers)

    def await_acks(self) -> None:
        """Wait for every dead letter sent so far; count each as delivered or given up. Never raises."""
        if not self._unacked:
            return
        waiting = self._collect()
        if waiting:
            log.warning("outage: %d dead letter(s) wait for the broker", len(waiting))
            self._unacked = waiting
            self.outage.retry(f"dead-letter topic {self.settings.kafka.dlq_topic!r}", self._resend)

    def _collect(self) -> list:
        """Count what was acknowledged or refused; return what an outage holds up."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        try:
            self.producer.flush(timeout=ACK_TIMEOUT_S)
        except KafkaTimeoutError:
            pass  # the futures still pending are judged below
        refused, waiting = [], []
        for future, reason, dl in self._unacked:
            if future is None:  # send() failed in an outage: it waits for the next try
                waiting.append((None, reason, dl))
                continue
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except KafkaError as exc:
                if self._in_outage(exc):
                    waiting.append((None, reason, dl))
                else:
                    refused.append((reason, exc))
            else:
                self.delivered[reason] += 1
                self.metrics.dlq.labels(reason).inc()
        self._unacked = []
        self._give_up(refused)
        return waiting

    def _resend(self) -> None:
        """One try after an outage: a new producer (the old one may be unusable) sends what waits."""
        waiting = self._unacked
        self.producer.close(timeout=0)
        self.producer = KafkaProducer(**dlq_producer_config(self.settings))
        self._unacked = []
        for _, reason, dl in waiting:
            try:
                self._unacked.append((self._send(dl), reason, dl))
            except (KafkaError, TypeError, ValueError) as exc:
                if not self._in_outage(exc):
                    self._give_up([(reason, exc)])
                    continue
                self._unacked.append((None, reason, dl))
        still = self._collect()
        if still:
            self._unacked = still
            raise KafkaTimeoutError(f"{len(still)} dead letter(s) not acknowledged: the broker is out of reach")

    def close(self) -> None:
        """Wait for what is in flight, then close the producer (idempotent)."""
        if self.producer is None:
            return
        self.await_acks()
        self.producer.close()
        self.producer = None

    def _give_up(self, refused: list[tuple[str, Exception]]) -> None:
        if not refused:
            return
        reasons = collections.Counter(reason for reason, _ in refused)
        for reason, n in reasons.items():
            self.failed[reason] += n
            self.metrics.dlq_failures.labels(reason).inc(n)
        exc = refused[0][1]
        log.error("%d dead letter(s) not delivered to %s, skipped (reasons: %s): %s: %s", len(refused),
                  self.settings.kafka.dlq_topic, dict(sorted(reasons.items())), type(exc).__name__, exc)

"""Input positions against the partitions' logs: the broker's state and the offset-reset policy.

The service positions every partition itself (clients.py) and the client resets
nothing, so a position the log no longer holds must be found here:

* **past the end**: the log was truncated, the topic recreated or the broker restored
  empty. tansu answers such a fetch with no records and no error; only the high
  watermark below the position shows it (docs/kafka-notes.md). Apache Kafka refuses the
  fetch (``OffsetOutOfRangeError``), which :meth:`InputPositions.refused` reads.
* **before the start**: retention deleted records the service had not read. Checked
  against ``beginning_offsets`` (right on tansu too) after each assignment, a blocking
  call made on the loop's thread.

:class:`InputPositions` finds them and says what the service must do: nothing (an
empty dict), or reset these partitions (:meth:`InputPositions.reset` logs and counts
them, raises :class:`OffsetsOutOfRangeError` under policy ``fail`` and, under
``earliest``, seeks each to its log's start and returns the offsets to resume at).
It also exports the positions and high watermarks and reports a lost broker
connection to the :class:`~stream_dec.service.outage.Outage`.
"""

from __future__ import annotations

import logging
import time

from kafka import TopicPartition

from stream_dec.service.clients import CONNECT_TIMEOUT_S, broker_connected, positions
from stream_dec.service.outage import OffsetsOutOfRangeError

log = logging.getLogger("stream_dec.service")

#: Longest gap between two exports of the positions (and checks of the broker) while no records arrive.
WATCH_EVERY_S = 0.5

#: ``{partition: (where, position, log start or high watermark)}``, ``where`` being
#: ``"past_end"`` or ``"before_start"``.
Outside = dict[int, tuple[str, int, "int | None"]]


def outside_log(seen: dict[int, tuple[int, int | None]], starts: dict[int, int] | None = None) -> Outside:
    """The positions ``seen`` (``{partition: (position, high watermark or None)}``) that the log no longer holds.

    ``starts``: each partition's first offset, when it was looked up.

    >>> outside_log({0: (120, 100), 1: (50, 100), 2: (5, None)}, starts={1: 60, 2: 10})
    {0: ('past_end', 120, 100), 1: ('before_start', 50, 60), 2: ('before_start', 5, 10)}
    >>> outside_log({0: (100, 100)}, starts={0: 0})
    {}
    """
    outside: Outside = {p: ("past_end", pos, hw) for p, (pos, hw) in seen.items() if hw is not None and pos > hw}
    for p, (pos, _) in seen.items():
        if starts and p in starts and pos < starts[p] and p not in outside:
            outside[p] = ("before_start", pos, starts[p])
    return outside


def refused_outside(fetched: dict[int, int], starts: dict[int, int], highwaters: dict[int, int | None]) -> Outside:
    """Where the offsets of a fetch the broker refused as out of range lie (``{partition: offset}``).

    >>> refused_outside({0: 5, 1: 900}, starts={0: 40, 1: 0}, highwaters={1: 300})
    {0: ('before_start', 5, 40), 1: ('past_end', 900, 300)}
    """
    out: Outside = {}
    for p, offset in fetched.items():
        start = starts.get(p, 0)
        out[p] = ("before_start", offset, start) if offset < start else ("past_end", offset, highwaters.get(p))
    return out


def out_of_range_error(outside: Outside, topic: str) -> OffsetsOutOfRangeError:
    """The error that ends the run under policy ``fail`` (exit status 4), naming every partition.

    >>> print(out_of_range_error({0: ("past_end", 120, 100)}, "in"))
    input positions outside the log of 'in': partition 0 at 120 (past end 100); STREAM_DEC_KAFKA__OFFSET_RESET_POLICY=fail (deploy/OPERATE.md says what to do)
    """
    return OffsetsOutOfRangeError(
        f"input positions outside the log of {topic!r}: "
        + ", ".join(f"partition {p} at {pos} ({where.replace('_', ' ')} {edge})" for p, (where, pos, edge) in sorted(outside.items()))
        + "; STREAM_DEC_KAFKA__OFFSET_RESET_POLICY=fail (deploy/OPERATE.md says what to do)")


class InputPositions:
    """The consumer-side checks of the input positions (on the loop's thread).

    ``settings``: the input topic and ``offset_reset_policy``; ``metrics``: positions,
    high watermarks and resets are exported there; ``outage``: told whether the
    consumer still reaches the broker.
    """

    def __init__(self, settings, metrics, outage):
        self.topic = settings.kafka.input_topic
        self.policy = settings.kafka.offset_reset_policy
        self.metrics = metrics
        self.outage = outage
        self.check_log_starts = False  # compare positions with the log's start at the next check
        self._watched = 0.0  # monotonic time positions were last exported
        self._unconnected = 0  # broker checks in a row that found no open connection

    def assigned(self, partitions: list) -> None:
        """Partitions were assigned: compare their positions with the log's start at the next check."""
        self.check_log_starts = bool(partitions)

    def check(self, consumer, polled: int) -> Outside:
        """Export positions and the broker's state; the positions outside the log ({}: none).

        Looks after a poll that returned records, every :data:`WATCH_EVERY_S` and after
        an assignment. Raises :class:`~stream_dec.service.outage.OutageError` once the
        broker has been away longer than ``max_outage_s``.
        """
        now = time.monotonic()
        due = now - self._watched >= WATCH_EVERY_S
        if due:
            self._watched = now
            if broker_connected(consumer):
                self._unconnected = 0
                self.outage.ok()
            else:
                # Twice in a row: a connection is briefly closed after start-up and between
                # tries. The client reconnects by itself; past max_outage_s the run ends.
                self._unconnected += 1
                if self._unconnected >= 2:
                    self.outage.failed(f"broker (input topic {self.topic!r})")
                    return {}
        if not (polled or due or self.check_log_starts):
            return {}
        seen = positions(consumer)
        self.metrics.record_positions(seen)
        starts = None
        if self.check_log_starts and seen:
            self.check_log_starts = False
            starts = self.log_starts(consumer, seen)
        return outside_log(seen, starts)

    def refused(self, consumer, fetched: dict) -> Outside:
        """Where the offsets of a fetch the broker refused lie (Apache Kafka refuses both ends of the log).

        ``fetched``: ``OffsetOutOfRangeError``'s ``{TopicPartition: offset}``.
        """
        offsets = {tp.partition: getattr(o, "offset", o) for tp, o in fetched.items()}
        starts = self.log_starts(consumer, list(offsets))
        return refused_outside(offsets, starts, {tp.partition: consumer.highwater(tp) for tp in fetched})

    def log_starts(self, consumer, partitions) -> dict[int, int]:
        """The first offset of each partition's log (``beginning_offsets`` is right on tansu too)."""
        starts = consumer.beginning_offsets([TopicPartition(self.topic, p) for p in partitions], timeout_ms=CONNECT_TIMEOUT_S * 1000)
        return {tp.partition: o for tp, o in starts.items()}

    def report(self, outside: Outside) -> None:
        """Log loudly and count each position outside the log; raise :class:`OffsetsOutOfRangeError` under policy ``fail``."""
        for p, (where, pos, edge) in sorted(outside.items()):
            self.metrics.offset_resets.labels(where).inc()
            if where == "past_end":
                log.error("input %s[%d]: position %d is past the log's end %s: the log was truncated, the topic "
                          "recreated or the broker restored empty", self.topic, p, pos, edge)
            else:
                log.error("input %s[%d]: position %d is before the log's start %d: %d records were deleted "
                          "(retention) before the service read them", self.topic, p, pos, edge, edge - pos)
        if self.policy == "fail":
            raise out_of_range_error(outside, self.topic)

    def reset(self, consumer, outside: Outside) -> dict[int, int]:
        """Policy ``earliest``: seek each partition of ``outside`` to its log's start; returns those offsets.

        Call after :meth:`report`, once the records already fetched are processed.
        """
        starts = self.log_starts(consumer, outside)
        resumed = {}
        for p, (where, pos, edge) in sorted(outside.items()):
            start = resumed[p] = starts.get(p, 0)
            consumer.seek(TopicPartition(self.topic, p), start)
            if where == "past_end":
                log.warning("input %s[%d]: policy earliest: resuming at the log's start %d; the %s records "
                            "there are read although the checkpoint was past them", self.topic, p, start,
                            "?" if edge is None else max(0, edge - start))
            else:
                log.warning("input %s[%d]: policy earliest: resuming at the log's start %d; %d records skipped",
                            self.topic, p, start, start - pos)
        return resumed

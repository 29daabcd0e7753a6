"""Reading a whole topic for a report: every partition, from its start (or a time) to its end.

The end of a partition is its high watermark as the last fetch reported it
(``consumer.highwater``): tansu answers ``end_offsets`` wrongly (docs/kafka-notes.md).
The consumer never creates topics, so a misspelt name is an error rather than a new
empty topic with tansu's 4 partitions.
"""

from __future__ import annotations

import difflib
import re
import sys
import time
from datetime import datetime, timezone
from typing import NamedTuple

from stream_dec.report.records import ReportError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RawRecord(NamedTuple):
    """One Kafka record as read: where it sits, its value, headers and time (ms since the epoch)."""

    partition: int
    offset: int
    value: bytes | None
    headers: list
    timestamp: int


def parse_since(text: str, now_s: float | None = None) -> int:
    """``--since``: an ISO 8601 time (UTC when no zone is given) or an age such as ``30m``, as epoch ms.

    >>> parse_since("2026-01-01T00:00:00Z")
    1767225600000
    >>> parse_since("2h", now_s=10_000.0)
    2800000
    """
    m = _DURATION.match(text.strip())
    if m:
        now = time.time() if now_s is None else now_s
        return int((now - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1000)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"--since {text!r}: expected an ISO 8601 time (2026-01-31T12:00:00Z) or an age (90s, 30m, 2h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


class _Progress:
    """``report: read N of M records`` on stderr at most twice a second (rewritten in place on a terminal)."""

    def __init__(self, topic: str, enabled: bool):
        self.topic, self.enabled = topic, enabled
        self.tty = enabled and sys.stderr.isatty()
        self._last = 0.0

    def show(self, read: int, total: int | None, final: bool = False) -> None:
        """Show the count read so far (of ``total`` once the partitions' ends are known)."""
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.5):
            return
        self._last = now
        of = f" of {total:,}" if total else ""
        text = f"report: read {read:,}{of} records of {self.topic!r}"
        if self.tty:
            print(f"\r\x1b[2K{text}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


def _consumer(servers: str):
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        return KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, allow_auto_create_topics=False,
                             fetch_max_wait_ms=100, request_timeout_ms=10_000, bootstrap_timeout_ms=10_000,
                             fetch_max_bytes=64 * 1024 * 1024)
    except KafkaError as exc:
        raise ReportError(f"no Kafka broker answers at {servers} ({type(exc).__name__})") from None


def _partitions(consumer, servers: str, topic: str) -> list:
    """The topic's partitions; a topic the broker does not know is an error naming the nearest names."""
    from kafka import TopicPartition

    known = consumer.topics()
    if topic not in known:
        near = difflib.get_close_matches(topic, sorted(known), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else f" ({len(known)} topics there)"
        raise ReportError(f"topic {topic!r} does not exist on {servers}{hint}")
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


def _seek_since(consumer, tps: list, since_ms: int | None) -> None:
    """Start every partition at its beginning, or at the first record at or after ``since_ms`` where the broker says."""
    from kafka.errors import KafkaError

    consumer.seek_to_beginning(*tps)
    if since_ms is None:
        return
    try:
        found = consumer.offsets_for_times({tp: since_ms for tp in tps})
    except KafkaError:  # a broker without the lookup: read from the start, records are filtered by time anyway
        return
    for tp, hit in found.items():
        if hit is not None:
            consumer.seek(tp, hit.offset)


def _at_end(consumer, tps: list) -> bool:
    for tp in tps:
        hw = consumer.highwater(tp)
        if hw is None or consumer.position(tp) < hw:
            return False
    return True


def _drain(consumer, tps: list, since_ms: int | None, progress: _Progress, stall_s: float) -> list[RawRecord]:
    """Poll until every partition's position reaches its high watermark; fail after ``stall_s`` without progress."""
    starts = {tp: consumer.position(tp) for tp in tps}
    out: list[RawRecord] = []
    seen, last_move = 0, time.monotonic()
    while not _at_end(consumer, tps):
        for tp, batch in consumer.poll(timeout_ms=200, max_records=50_000).items():
            seen += len(batch)
            out.extend(RawRecord(tp.partition, r.offset, r.value, list(r.headers or ()), r.timestamp)
                       for r in batch if since_ms is None or r.timestamp >= since_ms)
            last_move = time.monotonic()
        highs = [consumer.highwater(tp) for tp in tps]
        total = sum(h - starts[tp] for tp, h in zip(tps, highs)) if None not in highs else None
        progress.show(seen, total)
        if time.monotonic() - last_move > stall_s:
            raise ReportError(f"reading {tps[0].topic!r}: no progress for {stall_s:.0f} s after {seen:,} records")
    progress.show(seen, seen, final=True)
    return out


def read_topic(servers: str, topic: str, *, since_ms: int | None = None, progress: bool = True,
               stall_s: float = 30.0) -> list[RawRecord]:
    """Every record of ``topic`` (at or after ``since_ms`` when given), all partitions, in partition order."""
    consumer = _consumer(servers)
    try:
        tps = _partitions(consumer, servers, topic)
        consumer.assign(tps)
        _seek_since(consumer, tps, since_ms)
        return _drain(consumer, tps, since_ms, _Progress(topic, progress), stall_s)
    finally:
        consumer.close()


def dlq_reasons(records: list[RawRecord], header: str) -> dict[str, int]:
    """Dead letters counted by the value of their reason ``header`` (``?`` where it is missing).

    >>> dlq_reasons([RawRecord(0, 0, b"", [("r", b"bad_json")], 0), RawRecord(0, 1, b"", [], 0)], "r")
    {'?': 1, 'bad_json': 1}
    """
    counts: dict[str, int] = {}
    for r in records:
        raw = dict(r.headers).get(header)
        reason = raw.decode("utf-8", "replace") if raw else "?"
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))

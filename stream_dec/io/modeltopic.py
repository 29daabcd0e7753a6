"""The model topic: the learner publishes every model version, predictors follow the newest.

One partition, so versions stay in publication order. A snapshot (opaque bytes, from
stream_dec/online/snapshot.py) larger than :data:`CHUNK_BYTES` is split into
consecutive records, each below kafka-python's 1 MB default ``max_request_size``
(docs/kafka-notes.md). Every record of a snapshot carries the same headers:

=================  ==========================================================
header             value
=================  ==========================================================
content-type       ``application/x-stream-dec-model``
model-version      the version, decimal
sha256             hex SHA-256 of the *whole* payload
chunk              ``i/n``: this record is chunk ``i`` (0-based) of ``n``
published-at       epoch seconds, decimal (``repr`` of the float, exact)
x-<name>           one per ``meta`` entry (``x-sample-rate: 0.5``)
=================  ==========================================================

The key is ``b"v<version>"``, the value the chunk's bytes. docs/contracts.md has the
format, docs/kafka-notes.md why it works this way on tansu and on Apache Kafka.

The follower never trusts ``end_offsets`` (wrong on tansu): it learns the high watermark
from a fetch and reads back a window of records before it, doubling the window until a
complete snapshot whose checksum holds is found or the log's start is reached. Chunks
are reassembled only when consecutive; a snapshot with a missing chunk, a bad
checksum, or a foreign record in its middle is dropped and counted (``rejected``).

>>> records = [_Rec(o, *rec) for o, rec in enumerate(_chunked(3, b"abcdef", chunk_bytes=4))]
>>> [(r.key, dict(r.headers)["chunk"]) for r in records]
[(b'v3', b'0/2'), (b'v3', b'1/2')]
>>> asm = _Assembler()
>>> asm.feed(records[0]), asm.feed(records[1])[0].payload
([], b'abcdef')
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "CHUNK_BYTES",
    "MODEL_CONTENT_TYPE",
    "ModelFollower",
    "ModelPublisher",
    "ModelTopicError",
    "Published",
    "ensure_topics",
]

log = logging.getLogger(__name__)

#: A snapshot larger than this is split into chunks, so every record stays below Kafka's
#: (and kafka-python's) default 1 MB request and message limits with room for headers.
CHUNK_BYTES = 900_000
MODEL_CONTENT_TYPE = b"application/x-stream-dec-model"
#: Prefix of the headers that carry ``meta`` entries.
META_PREFIX = "x-"
#: Records read back from the high watermark at first; doubled until a snapshot is found.
_FIRST_WINDOW = 8
#: Largest fetch per partition: a chunk and its neighbours in one response.
_FETCH_BYTES = 4 * 1_048_576
_POLL_MS = 200
_CORE_HEADERS = ("content-type", "model-version", "sha256", "chunk", "published-at")


class ModelTopicError(RuntimeError):
    """The model or feed topic is unusable: missing and not creatable, or with the wrong partition count."""


@dataclass(frozen=True)
class Published:
    """One snapshot as read back from the model topic.

    ``offset`` is the offset of its last chunk; ``meta`` the ``x-`` headers without
    their prefix; ``published_at`` the publisher's clock (epoch seconds).
    """

    version: int
    payload: bytes = field(repr=False)
    sha256: str
    published_at: float
    offset: int
    meta: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- topics


def ensure_topics(bootstrap_servers: str, topics: dict[str, int], *, client_id: str = "stream-dec",
                  timeout_s: float = 10.0) -> None:
    """Create each topic with exactly its partition count if missing; check the count of those that exist.

    Auto-created topics get 4 partitions on tansu (docs/kafka-notes.md), so the roles
    create theirs before first use. The replication factor is the broker's default.
    An existing topic with another partition count is a :class:`ModelTopicError`: the
    model topic must have 1 partition, or versions lose their order.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    for name, n in topics.items():
        if int(n) < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, got {n}")
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id=client_id,
                                 request_timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise ModelTopicError(f"cannot reach the broker at {bootstrap_servers}: {exc!r}") from None
    try:
        for name, n in topics.items():  # one at a time, so one existing topic does not hide the others
            try:
                admin.create_topics([NewTopic(name, num_partitions=int(n), replication_factor=-1)],
                                    timeout_ms=int(timeout_s * 1000))
                continue
            except TopicAlreadyExistsError:
                pass
            have = _partition_count(admin, name)
            if have != int(n):
                raise ModelTopicError(
                    f"topic {name!r} exists with {have} partitions, stream-dec needs exactly {n}: "
                    f"delete it (or pick another name) and let stream-dec create it")
    except KafkaError as exc:
        raise ModelTopicError(f"cannot create topics {sorted(topics)} on {bootstrap_servers}: {exc!r}") from None
    finally:
        admin.close()


def _partition_count(admin, name: str) -> int:
    (desc,) = admin.describe_topics([name])
    if desc.get("error_code"):
        raise ModelTopicError(f"cannot describe topic {name!r}: error code {desc['error_code']}")
    return len(desc["partitions"])


# ---------------------------------------------------------------- publishing


def _chunked(version: int, payload: bytes, *, meta: dict[str, str] | None = None,
             published_at: float | None = None, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """The ``(key, value, headers)`` records of one snapshot, in order."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}")
    payload = bytes(payload)
    at = time.time() if published_at is None else float(published_at)
    if not math.isfinite(at):
        raise ValueError(f"published_at must be finite, got {published_at!r}")
    extra = []
    for name, value in (meta or {}).items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"meta entries must be non-empty str names with str values, got {name!r}: {value!r}")
        extra.append((META_PREFIX + name, value.encode("utf-8")))
    digest = hashlib.sha256(payload).hexdigest().encode()
    pieces = [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)] or [b""]
    key = b"v%d" % version
    common = [("model-version", b"%d" % version), ("sha256", digest), ("published-at", repr(at).encode())]
    return [(key, piece, [("content-type", MODEL_CONTENT_TYPE), *common, ("chunk", b"%d/%d" % (i, len(pieces))), *extra])
            for i, piece in enumerate(pieces)]


class ModelPublisher:
    """Publishes snapshots on the model topic with a producer the caller owns.

    The producer may be transactional: :meth:`publish` only sends, the caller flushes
    or commits. Its ``max_request_size`` must admit :data:`CHUNK_BYTES` plus headers
    (kafka-python's 1 MB default does). It should be idempotent (or transactional): a
    chunk duplicated by a retry breaks the run of consecutive chunks, and followers drop
    that version.
    """

    def __init__(self, producer, topic: str):
        self.producer = producer
        self.topic = topic

    def publish(self, version: int, payload: bytes, *, meta: dict[str, str] | None = None,
                published_at: float | None = None) -> list:
        """Send one snapshot (as many chunks as it needs) to partition 0; returns the send futures.

        ``meta``: extra string entries, sent as ``x-<name>`` headers.
        ``published_at``: epoch seconds, default now.
        """
        return [self.producer.send(self.topic, key=key, value=value, headers=headers, partition=0)
                for key, value, headers in _chunked(version, payload, meta=meta, published_at=published_at)]


# ---------------------------------------------------------------- reassembly


class _Chunk(NamedTuple):
    version: int
    sha256: str
    index: int
    count: int
    published_at: float
    meta: dict[str, str]
    value: bytes
    offset: int


class _Rejected(NamedTuple):
    """A snapshot (or foreign record) dropped; ``offset``: the record that decided it."""

    version: int | None
    reason: str
    offset: int


def _parse(record) -> _Chunk | str:
    """One model-topic record as a chunk, or the reason it is not one."""
    headers: dict[str, bytes] = {}
    for name, value in record.headers or ():
        name = name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)
        headers.setdefault(name.lower(), value)
    missing = [h for h in _CORE_HEADERS if headers.get(h) is None]
    if missing:
        return f"missing headers {missing}"
    if headers["content-type"] != MODEL_CONTENT_TYPE:
        return f"content-type {headers['content-type']!r}"
    if record.value is None:
        return "null value"
    try:
        version = int(headers["model-version"].decode("ascii"))
        index, count = (int(x) for x in headers["chunk"].decode("ascii").split("/"))
        at = float(headers["published-at"].decode("ascii"))
        sha = headers["sha256"].decode("ascii").lower()
        meta = {k[len(META_PREFIX):]: v.decode("utf-8") for k, v in headers.items()
                if k.startswith(META_PREFIX) and v is not None}
    except (ValueError, UnicodeDecodeError) as exc:
        return f"bad header value ({exc})"
    if version < 0 or not 0 <= index < count or len(sha) != 64:
        return f"bad header value (version {version}, chunk {index}/{count}, sha256 of {len(sha)} characters)"
    return _Chunk(version, sha, index, count, at, meta, bytes(record.value), record.offset)


class _Assembler:
    """Turns model-topic records, in offset order, into snapshots; only consecutive chunks join.

    A chunk without its predecessors (the read window began inside a snapshot) is
    skipped silently; a snapshot interrupted by another record, or whose checksum
    fails, is reported as :class:`_Rejected`. An unfinished snapshot at the end of
    what was read stays pending: its next chunks may still come.
    """

    def __init__(self):
        self.pending: list[_Chunk] = []

    def feed(self, record) -> list[Published | _Rejected]:
        """The snapshots completed and rejected by one more record."""
        chunk = _parse(record)
        out: list[Published | _Rejected] = []
        if isinstance(chunk, str):
            if self.pending:
                out.append(self._drop("missing chunks", record.offset))
            out.append(_Rejected(None, f"not a model chunk: {chunk}", record.offset))
            return out
        if self.pending and not self._continues(chunk):
            out.append(self._drop("missing chunks", record.offset))
        if chunk.index == 0 or self.pending:
            self.pending.append(chunk)
        if self.pending and len(self.pending) == chunk.count:
            out.append(self._complete())
        return out

    def _continues(self, chunk: _Chunk) -> bool:
        first = self.pending[0]
        return (chunk.index == len(self.pending) and chunk.version == first.version
                and chunk.sha256 == first.sha256 and chunk.count == first.count)

    def _drop(self, reason: str, offset: int) -> _Rejected:
        version = self.pending[0].version
        self.pending = []
        return _Rejected(version, reason, offset)

    def _complete(self) -> Published | _Rejected:
        first, last = self.pending[0], self.pending[-1]
        payload = b"".join(c.value for c in self.pending)
        self.pending = []
        if hashlib.sha256(payload).hexdigest() != first.sha256:
            return _Rejected(first.version, "sha256 mismatch", last.offset)
        return Published(first.version, payload, first.sha256, first.published_at, last.offset, first.meta)


class _Rec(NamedTuple):
    """The fields of a consumed record the assembler reads (for the docstring examples)."""

    offset: int
    key: bytes
    value: bytes
    headers: list


# ---------------------------------------------------------------- following


def _follower_config(bootstrap_servers: str, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap_servers,
        "client_id": client_id,
        "group_id": None,
        "enable_auto_commit": False,
        # Positions are always set by seek(); a position retention deleted raises and
        # the follower moves to the log's start itself.
        "auto_offset_reset": "none",
        # A follower's metadata request must not create the topic (4 partitions on tansu).
        "allow_auto_create_topics": False,
        # Aborted publications are invisible on Apache Kafka (tansu shows them; the
        # checksum and the version order still hold there).
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": _FETCH_BYTES,
        "fetch_max_wait_ms": 100,
    }


class ModelFollower:
    """Reads the newest snapshot of the model topic, then every newer one as it arrives.

    Its own consumer, partition 0 assigned, no group and no commits. ``consumer_factory``
    (default ``kafka.KafkaConsumer``) is called with the consumer's keyword arguments.
    Not thread-safe: one thread calls :meth:`newest` and :meth:`poll`.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *, client_id: str = "stream-dec-model",
                 consumer_factory: Callable[..., Any] | None = None):
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self._tp = TopicPartition(topic, 0)
        self._consumer = (consumer_factory or KafkaConsumer)(**_follower_config(bootstrap_servers, client_id))
        self._assigned = False
        self._started = False  # a scan reached the high watermark: poll() continues from there
        self._assembler = _Assembler()
        self._last: Published | None = None  # the highest version returned so far
        self._rejected = 0
        self._counted_upto = -1  # rejections decided at or before this offset are counted already

    @property
    def rejected(self) -> int:
        """Snapshots dropped (bad checksum, missing chunks) and foreign records skipped, so far."""
        return self._rejected

    @property
    def last_version(self) -> int | None:
        """The highest version :meth:`newest` or :meth:`poll` returned so far."""
        return None if self._last is None else self._last.version

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()

    def newest(self, timeout_s: float) -> Published | None:
        """The newest complete snapshot whose checksum holds, or None if none is there within ``timeout_s``.

        Reads back from the high watermark a window of records, doubled until it holds
        a valid snapshot or reaches the log's start; of the valid snapshots in it, the
        highest version wins (one learner publishes versions in increasing order, so
        that is the last one; a standby republishing older versions does not hide a
        newer one). A corrupt or incomplete newest falls back to the one before and
        counts in :attr:`rejected`. On a topic without a snapshot, waits for the first
        until ``timeout_s``. Afterwards :meth:`poll` returns what comes next.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        if not self._assign(deadline):
            return None
        start = self._log_start()
        hw = self._learn_highwater(start, deadline)
        if hw is None:
            return None
        window = _FIRST_WINDOW
        while True:
            begin = max(start, hw - window)
            found, rejected = self._scan(begin, hw, deadline)
            if found or begin == start or time.monotonic() >= deadline:
                break
            window *= 2
        while not found and time.monotonic() < deadline:  # an empty topic: wait for the first snapshot
            found, more = self._read(min(_POLL_MS, _remaining_ms(deadline)))
            rejected += more
        best = max(found, key=lambda p: (p.version, p.offset)) if found else None
        self._count(rejected, after=best.offset if best else -1)
        if best is not None and (self._last is None or best.version > self._last.version):
            self._last = best
        return best

    def poll(self, timeout_ms: int = 0) -> list[Published]:
        """Valid snapshots that arrived since the last :meth:`newest` or :meth:`poll`, oldest first.

        Only versions above every version returned so far, in increasing order: an older
        or equal version (a standby republishing, a duplicate) is skipped. Waits up to
        ``timeout_ms`` for the first one. Before any :meth:`newest`, the first call
        returns ``[newest]`` (or ``[]``).
        """
        if not self._started:
            first = self.newest(timeout_ms / 1000)
            return [first] if first is not None else []
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        out: list[Published] = []
        while True:
            found, rejected = self._read(_remaining_ms(deadline))
            self._count(rejected, after=-1)
            for p in found:
                if self._last is None or p.version > self._last.version:
                    out.append(p)
                    self._last = p
                elif p.version == self._last.version and p.sha256 != self._last.sha256:
                    log.warning("model topic %s: version %d republished with another sha256 at offset %d; kept the first",
                                self.topic, p.version, p.offset)
            if out or time.monotonic() >= deadline:
                return out

    # -- consumer plumbing

    def _assign(self, deadline: float) -> bool:
        """Assign partition 0 once the topic exists (the follower never creates it)."""
        if self._assigned:
            return True
        while not self._consumer.partitions_for_topic(self.topic):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        self._consumer.assign([self._tp])
        self._assigned = True
        return True

    def _log_start(self) -> int:
        # beginning_offsets is right on tansu too (only end_offsets is not).
        return self._consumer.beginning_offsets([self._tp])[self._tp]

    def _learn_highwater(self, start: int, deadline: float) -> int | None:
        """The high watermark, from a fetch at the log's start (``end_offsets`` is wrong on tansu)."""
        self._consumer.seek(self._tp, start)
        while True:
            self._poll_records(min(_POLL_MS, _remaining_ms(deadline)))
            hw = self._consumer.highwater(self._tp)
            if hw is not None or time.monotonic() >= deadline:
                return hw

    def _scan(self, begin: int, hw: int, deadline: float) -> tuple[list[Published], list[_Rejected]]:
        """Read from ``begin`` to at least ``hw`` with a fresh assembler (kept for :meth:`poll`)."""
        self._consumer.seek(self._tp, begin)
        self._assembler = _Assembler()
        found: list[Published] = []
        rejected: list[_Rejected] = []
        while self._consumer.position(self._tp) < hw and time.monotonic() < deadline:
            more, bad = self._read(min(_POLL_MS, _remaining_ms(deadline)))
            found += more
            rejected += bad
        self._started = True
        return found, rejected

    def _read(self, timeout_ms: int) -> tuple[list[Published], list[_Rejected]]:
        """Feed the records of one poll to the assembler."""
        found: list[Published] = []
        rejected: list[_Rejected] = []
        for record in self._poll_records(timeout_ms):
            for event in self._assembler.feed(record):
                (found if isinstance(event, Published) else rejected).append(event)
        return found, rejected

    def _poll_records(self, timeout_ms: int) -> list:
        from kafka.errors import OffsetOutOfRangeError

        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms)
        except OffsetOutOfRangeError:  # retention deleted what was next: go on from the log's start
            self._consumer.seek(self._tp, self._log_start())
            self._assembler = _Assembler()
            return []
        return batches.get(self._tp, [])

    def _count(self, rejected: list[_Rejected], *, after: int) -> None:
        """Count each rejection once (scans read some records again), only those after ``after``."""
        for r in rejected:
            if r.offset > max(after, self._counted_upto):
                self._rejected += 1
                log.warning("model topic %s: dropped %s at offset %d: %s", self.topic,
                            "a record" if r.version is None else f"version {r.version}", r.offset, r.reason)
        if rejected:
            self._counted_upto = max(self._counted_upto, max(r.offset for r in rejected))


def _remaining_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))

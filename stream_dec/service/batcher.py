"""The batcher: polled records wait here until they form the next micro-batch.

A batch closes at ``max_size`` records, at ``max_bytes`` bytes of records (keys, values
and headers as fetched) or ``max_wait_ms`` after its first record, whichever comes first. After a crash the batcher replays the journal instead: each
batch ends exactly where a journaled batch ended, so the model sees the batches it saw
before and labels them the same way.

Invariants:

* A batch holds at most ``max_size`` records and ``max_bytes`` bytes, and at least one
  record (a record larger than ``max_bytes`` makes a batch of its own).
* Each record leaves in exactly one batch. Within a batch, records are in (partition,
  offset) order: the order the model learns them in must not depend on how polls
  interleaved the partitions, or a replayed batch would teach it something else (one
  partition: arrival order, which is offset order).
* While replaying, a batch is cut only once every partition of the journaled end has
  been read up to it; a journal line the model is already past cuts nothing.
* When the input does not match the journal (a journaled end is not reached after
  :data:`REPLAY_LOOKAHEAD` batches' worth of records or bytes, or the records must go now), the
  replay is abandoned and batches are cut by size: nothing is lost, but duplicates of
  those batches may carry other labels.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from stream_dec.service.journal import JournalLine

log = logging.getLogger("stream_dec.service")

#: Batches' worth of records read past a journaled boundary before it counts as missing.
REPLAY_LOOKAHEAD = 4


@dataclass
class Batch:
    """Records to process together, and where they end."""

    #: In (partition, offset) order.
    records: list
    #: Next offset of every partition the batch read from.
    end: dict[int, int]
    #: The journal line this batch was cut at (a replay), or None (a new batch, to journal).
    journaled: JournalLine | None = None


def record_bytes(record) -> int:
    """Bytes of a fetched record's key, value and headers (the sizes kafka-python measured)."""
    return max(0, record.serialized_key_size) + max(0, record.serialized_value_size) + max(0, record.serialized_header_size)


def end_offsets(records: Iterable) -> dict[int, int]:
    """The next offset of every partition among ``records``."""
    end: dict[int, int] = {}
    for r in records:
        end[r.partition] = max(end.get(r.partition, 0), r.offset + 1)
    return end


def _batch(records: list, journaled: JournalLine | None = None) -> Batch:
    end = end_offsets(records)
    if len(end) > 1:  # interleaved by the polls: put in an order that replays the same
        records = sorted(records, key=lambda r: (r.partition, r.offset))
    return Batch(records, end, journaled)


class Batcher:
    """Pending records and the rule that cuts them into batches.

    ``max_bytes``: bytes of records per batch at most (None: no bound).
    ``on_replay_abandoned`` is called when the journal stops describing the input (the
    exactly-once outputs then stop treating replayed batches as published).
    ``clock``: seconds, monotonic (the batch wait is measured with it).
    """

    def __init__(self, max_size: int, max_wait_ms: int, *, max_bytes: int | None = None,
                 on_replay_abandoned: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self.max_bytes = max_bytes
        self.pending: list = []
        self.pending_bytes = 0
        self.since = 0.0  # when the oldest pending record arrived
        self.replay: collections.deque[JournalLine] = collections.deque()
        self._on_abandoned = on_replay_abandoned or (lambda: None)
        self._clock = clock

    def add(self, records: list) -> None:
        """Append polled records (one partition's, in offset order)."""
        if records and not self.pending:
            self.since = self._clock()
        self.pending.extend(records)
        self.pending_bytes += sum(map(record_bytes, records))

    def poll_budget(self) -> tuple[int, int]:
        """(milliseconds the next poll may wait, records it may return) for the batch being filled."""
        wait_ms = self.max_wait_ms
        if self.pending:
            wait_ms = max(0, int(wait_ms - (self._clock() - self.since) * 1000))
        return wait_ms, max(1, self.max_size - len(self.pending))

    def clear(self) -> None:
        """Forget the records waiting to be cut and any replay (the partitions are repositioned)."""
        self.pending = []
        self.pending_bytes = 0
        self.replay = collections.deque()

    def replay_from(self, lines: Iterable[JournalLine]) -> None:
        """Cut the next batches at these journaled ends (the lines following the loaded checkpoint)."""
        self.replay = collections.deque(lines)

    def cut(self, offsets: dict[int, int], *, now: bool = False) -> Batch | None:
        """The next batch, or None while it is still filling.

        ``offsets``: the model's next offset per partition. ``now``: the pending records
        must go (shutdown, revocation): cut without waiting, abandoning a replay whose
        end has not been read.
        """
        if not self.pending:
            return None
        # Lines the model is already past (journaled again by an earlier replay) cut nothing.
        while self.replay and self.replay[0].covered_by(offsets):
            self.replay.popleft()
        if self.replay:
            batch = self._cut_replay(offsets, now)
            if batch is not None:
                return batch
            if self.replay:  # still waiting for the journaled end
                return None
        return self._cut_by_size(now)

    def _cut_replay(self, offsets: dict[int, int], now: bool) -> Batch | None:
        line = self.replay[0]
        seen: dict[int, int] = {}
        for r in self.pending:
            seen[r.partition] = max(seen.get(r.partition, -1), r.offset)
        reached = all(seen.get(p, -1) >= o - 1 or offsets.get(p, 0) >= o for p, o in line.end.items())
        if not reached:
            too_far = len(self.pending) >= REPLAY_LOOKAHEAD * self.max_size or (
                self.max_bytes is not None and self.pending_bytes >= REPLAY_LOOKAHEAD * self.max_bytes)
            if now or too_far:
                self._abandon_replay("now" if now else "mismatch")
            return None
        self.replay.popleft()
        batch, rest = [], []
        for r in self.pending:
            (batch if r.offset < line.end.get(r.partition, 0) else rest).append(r)
        self.pending = rest
        self.pending_bytes = sum(map(record_bytes, rest))
        self.since = self._clock()
        return _batch(batch, journaled=line)

    def _cut_by_size(self, now: bool) -> Batch | None:
        full = len(self.pending) >= self.max_size or (self.max_bytes is not None and self.pending_bytes >= self.max_bytes)
        waited = (self._clock() - self.since) * 1000 >= self.max_wait_ms
        if not (full or waited or now):
            return None
        n, nbytes = self._fitting()
        batch, self.pending = self.pending[:n], self.pending[n:]
        self.pending_bytes -= nbytes
        self.since = self._clock()
        return _batch(batch)

    def _fitting(self) -> tuple[int, int]:
        """How many pending records (at least one) the next batch takes within both bounds, and their bytes."""
        n = min(len(self.pending), self.max_size)
        sizes = [record_bytes(r) for r in self.pending[:n]]
        total = sum(sizes)
        if self.max_bytes is None or total <= self.max_bytes:
            return n, total
        total = 0
        for i, size in enumerate(sizes):
            if i and total + size > self.max_bytes:
                return i, total
            total += size
        return n, total

    def _abandon_replay(self, why: str) -> None:
        if why == "mismatch":
            log.warning("batch journal does not match the input; cutting batches by size")
        else:
            log.info("journaled batch not read back before the records must go; cutting batches by size")
        self.replay.clear()
        self._on_abandoned()

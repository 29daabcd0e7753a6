"""Ownership of the input partitions: rebalance events, the owner epoch, fencing, hand-over and resume.

kafka-python 3 calls the rebalance listener on its IO thread, which also sends the
heartbeats: the callbacks (:meth:`Ownership.listener`) only record the event, and
the loop's thread acts on it before its next batch (:meth:`Ownership.handle_events`).
A batch in progress meanwhile is safe: its journal line, written under the lease
(fencing.py), is what the next owner replays exactly.

:class:`Ownership` decides; the service acts through a narrow interface
(:class:`OwnerHost`): write a checkpoint, commit, abandon the work in progress, take
the newest checkpoint's model, resume reading. Invariants:

* An assignment claims a new owner epoch (fencing.py); journal lines, update plans and
  checkpoints are written under it (:meth:`Ownership.guard`).
* :meth:`Ownership.fence_reason` is None only while this instance holds the newest
  epoch, has not lost its partitions, its session has not expired and the checkpoint
  thread found no newer epoch. Otherwise it writes nothing: a fenced owner is dropped
  (:meth:`Ownership.drop`), its model abandoned, and it stands by.
* On a revocation the owner hands over (checkpoint and commit) only while it may still
  write; lost partitions are never handed over.
* On an assignment the model in memory is kept only if it is exactly the newest
  checkpoint (:func:`keeps_model`); otherwise the service resumes from that checkpoint
  and the journal replays the batches after it.
* A failed claim or resume (the checkpoint directory) releases the partitions and is
  retried, with the same event, after the directory's backoff.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Protocol

from kafka import TopicPartition

from stream_dec.service.checkpointer import checkpoint_owner
from stream_dec.service.clients import RebalanceListener, group_generation, request_rejoin, session_expired
from stream_dec.service.fencing import Fenced, OwnerLease

log = logging.getLogger("stream_dec.service")


class OwnerHost(Protocol):
    """What :class:`Ownership` reads from and asks of the service (all on the loop's thread but ``offsets``).

    ``offsets``: the next input offset of each partition the model has learnt
    (read on the client's IO thread too, for provisional positions); ``model``: the
    model in memory (its ``version_``).
    """

    offsets: dict[int, int]
    model: Any

    def checkpoint(self) -> None:
        """Write a checkpoint now and wait until it is on disk."""

    def commit(self) -> None:
        """Commit the input offsets of the processed batches."""

    def abandon(self) -> bool:
        """Forget the work in progress (records not cut, a held batch, the running update).

        True when the model learnt something no journal line describes.
        """

    def begin_assignment(self, partitions: list[TopicPartition]) -> None:
        """A new assignment (maybe empty) begins: forget records polled before it."""

    def adopt(self, model) -> None:
        """Continue from ``model``, the newest checkpoint, and its offsets."""

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Replay the journal after the model's checkpoint and read ``partitions`` from its offsets."""

    def assignment_done(self, partitions: list[TopicPartition]) -> None:
        """The assignment is in effect (the hook ``on_assigned``)."""


def keeps_model(newest, model, written_by: dict | None, dropped: bool) -> bool:
    """Whether the ``model`` in memory may continue rather than the ``newest`` checkpoint.

    Only if it is exactly that checkpoint: the one this instance wrote or loaded last
    (``written_by``: its ``extra["owner"]``), with nothing learnt since (``dropped``:
    the model went past every checkpoint and was abandoned). Any other state (ahead of
    the checkpoint, or of another lineage) may differ from what the stream's outputs
    say: the journal replays from the checkpoint instead.
    """
    return not dropped and newest.version_ == model.version_ and checkpoint_owner(newest) == written_by


class Ownership:
    """Whether this instance owns the input partitions and may write, and what it does when that changes.

    ``lease``: the owner leases of the checkpoint directory; ``checkpointer``: whose
    last write tells whether the model in memory is the newest checkpoint;
    ``directory``: the directory's :class:`~stream_dec.service.directory.DirectoryHealth`
    (a failed claim waits for its backoff); ``newest``: a callable returning the newest
    checkpoint (None: none usable); ``host``: the service (:class:`OwnerHost`);
    ``group``: the consumer group (logs).
    """

    def __init__(self, lease: OwnerLease, checkpointer, directory, metrics, host: OwnerHost, *,
                 newest: Callable[[], Any], group: str = ""):
        self.lease = lease
        self.checkpointer = checkpointer
        self.directory = directory
        self.metrics = metrics
        self.group = group
        self._host = host
        self._newest = newest
        self.consumer = None
        self.epoch: int | None = None  # owner epoch held (fencing.py); None: not the owner
        self.owns = False  # the input partitions are assigned to this instance
        self.dropped = False  # the model in memory went past every checkpoint and was abandoned
        self.claim_at = 0.0  # monotonic time before which a failed claim or resume is not retried
        self._events: collections.deque = collections.deque()  # (kind, partitions) recorded by the listener
        self._events_lock = threading.Lock()
        self._lost = threading.Event()  # set by the listener at once: the loop's fence checks see it mid-batch
        self._refused = threading.Event()  # the checkpoint thread found a newer epoch

    # ------------------------------------------------------------ checks (any thread)
    def fence_reason(self) -> str | None:
        """Why this instance must not write now (None: it is the owner). No I/O: checked often."""
        if self.epoch is None:
            return "not_owner"
        if self._lost.is_set():
            return "lost"
        if self._refused.is_set():
            return "lease"
        if self.consumer is not None and session_expired(self.consumer):
            return "session"
        return None

    def check(self) -> None:
        """Raise :class:`Fenced` when :meth:`fence_reason` says this instance must not write."""
        reason = self.fence_reason()
        if reason is not None:
            raise Fenced(reason)

    def guard(self) -> contextlib.AbstractContextManager:
        """Write inside this only while the epoch held is the newest (:meth:`OwnerLease.guard`)."""
        return self.lease.guard(self.epoch)

    def owner(self) -> dict | None:
        """The writer stored in a checkpoint's ``extra["owner"]`` (None: no epoch held)."""
        return None if self.epoch is None else {"instance": self.lease.instance, "epoch": self.epoch}

    def checkpoint_fenced(self, exc: Fenced) -> None:
        """The checkpoint thread found a newer epoch (runs there): the loop drops at its next check."""
        if exc.reason == "lease":
            self._refused.set()

    # ------------------------------------------------------------ the listener (client's IO thread)
    def listener(self, consumer) -> RebalanceListener:
        """The rebalance listener of ``consumer`` (which this instance also pauses, seeks and checks)."""
        self.consumer = consumer
        return RebalanceListener(self._on_assigned, self._on_revoked, self._on_lost)

    def close(self) -> None:
        """The consumer is closed: forget it (no more session checks, pauses or rejoins)."""
        self.consumer = None

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        if partitions and self.consumer is not None:
            # The client must not look for a position itself (it resets nothing, clients.py):
            # provisional positions now (non-blocking), paused until the loop's thread has
            # chosen the model and seeks for real.
            self.consumer.pause(*partitions)
            known = dict(self._host.offsets)
            for tp in partitions:
                if tp.partition in known:
                    self.consumer.seek(tp, known[tp.partition])
                else:
                    self.consumer.seek_to_beginning(tp)
        self._record("assigned", partitions)

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        self._record("revoked", partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        self._lost.set()
        self._record("lost", partitions)

    def _record(self, kind: str, partitions: list[TopicPartition]) -> None:
        with self._events_lock:
            self._events.append((kind, list(partitions)))

    # ------------------------------------------------------------ acting on events (loop's thread)
    def handle_events(self) -> None:
        """Act on the recorded rebalance events, in order."""
        while (event := self._next_event()) is not None:
            kind, partitions = event
            if kind == "lost":
                self.drop(Fenced("lost", f"partitions {sorted(tp.partition for tp in partitions)} lost"), rejoin=False)
            elif kind == "revoked":
                self._revoked(partitions)
            else:
                try:
                    self._assigned(partitions)
                except OSError as exc:  # the checkpoint directory: claim and resume again after a backoff
                    self.release()
                    self.claim_at = self.directory.failed(exc)
                    with self._events_lock:
                        self._events.appendleft((kind, partitions))
                    return
                self._host.assignment_done(partitions)

    def _next_event(self) -> tuple[str, list[TopicPartition]] | None:
        with self._events_lock:
            if not self._events or (self._events[0][0] == "assigned" and time.monotonic() < self.claim_at):
                return None
            return self._events.popleft()

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        """A rebalance this instance takes part in: hand over, if it still holds the newest epoch.

        The records not yet cut are left to the next owner (perhaps this instance again),
        which resumes from the newest checkpoint and the journal. The last update's drift
        record, a checkpoint and a commit are written only under the lease.
        """
        if partitions and self.owns:
            reason = self.fence_reason()
            if reason is None:
                self._host.checkpoint()
                self._host.commit()
            elif reason != "not_owner":
                self.drop(Fenced(reason), rejoin=False)
                return
        self.release()

    def release(self) -> None:
        """No longer the owner: the service forgets its work in progress; fetch nothing more."""
        if self._host.abandon():
            self.dropped = True  # the model learnt something no journal line describes
        self.owns = False
        self.epoch = None
        if self.consumer is not None:  # fetch nothing more until the group assigns the partitions again
            self.consumer.pause(*self.consumer.assignment())
        self.metrics.assigned.set(0)
        self.metrics.owner_epoch.set(0)

    def drop(self, exc: Fenced, *, rejoin: bool = True) -> None:
        """Fenced while owning the stream: publish, journal, checkpoint and commit nothing more; stand by.

        The model in memory is abandoned (the next assignment loads the newest
        checkpoint). ``rejoin``: ask the group for a fresh assignment (when the client
        itself has not noticed yet).
        """
        if self.epoch is None and not self.owns:
            return
        log.error("FENCED (%s): %s. Stopping all writes (outputs, journal, checkpoints, commits) and standing by; "
                  "the newest owner continues from the shared checkpoint directory", exc.reason, exc)
        self.metrics.fenced.labels(exc.reason).inc()
        self.release()  # the last update's drift record is not published: the next owner replays its batch
        self.dropped = True
        if rejoin and self.consumer is not None:
            request_rejoin(self.consumer)

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        """Claim the next epoch and resume from the newest state (an empty assignment: stand by)."""
        self.metrics.assigned.set(len(partitions))
        self.owns = bool(partitions)
        self._lost.clear()
        self._refused.clear()
        self._host.begin_assignment(partitions)
        if not partitions:
            log.info("standby: another instance of group %s owns the input partitions", self.group)
            return
        if self.epoch is not None:  # reassigned without a revocation event: hand over to itself
            self._host.checkpoint()
        generation, member = group_generation(self.consumer) if self.consumer is not None else (-1, "")
        self.epoch = self.lease.claim(generation, member)
        self.metrics.owner_epoch.set(self.epoch)
        log.info("owner epoch %d (group generation %d)", self.epoch, generation)
        self._resume_newest()
        self._host.resume(partitions)

    def _resume_newest(self) -> None:
        """Another instance may have moved on since this one loaded: continue from the newest state."""
        self.checkpointer.wait()
        newest = self._newest()
        if newest is None:
            return
        if not keeps_model(newest, self._host.model, self.checkpointer.written_by, self.dropped):
            self._host.adopt(newest)
        self.dropped = False

"""The Kafka service: poll, cut, label, learn, publish, commit, checkpoint.

:class:`StreamService` is the loop and the path of a batch; everything else happens in
the rooms of stream_dec/service/. The path of one batch, in order::

    consumer.poll                  clients.py       records of the assigned partitions
     ├> InputPositions.check       positions.py     positions outside the log: the reset policy
     └> Batcher.add, cut           batcher.py       by count, bytes or wait; at journaled ends when replaying
         └> decode_batch                            unusable records become dead letters
             ├> outputs.open_batch outputs.py       exactly-once: the batch's transaction begins
             ├> Learner.settle     learner.py       the previous update ends; its plan is journaled, its drift record sent
             ├> Journal.append     journal.py       the batch's end, under the owner's lease (ownership.py),
             │                                      before any of its outputs leaves; a refused write
             │                                      holds the batch (directory.py)
             ├> DeadLetters.send   deadletters.py   dead letters, on their own producer
             ├> model.predict, outputs.send_many    assignments, by the model after the previous batch
             ├> Learner.start                       partial_fit, overlapping the acks and the next poll
             ├> DeadLetters.await_acks              each delivered (an outage waited out), or refused: counted, skipped
             ├> outputs.close_batch, await_acks     at-least-once: flush and acks; exactly-once: the
             │                                      drift record and offsets join, the transaction commits
             ├> Checkpointer.take  checkpointer.py  every N batches: snapshot here, written on its
             │                                      thread, then Journal.prune
             └> outputs.batch_done                  at-least-once: asynchronous offset commit
    Ownership.handle_events        ownership.py     between batches: rebalances, owner epochs, fencing
    Progress.due, line             progress.py      every N batches or S seconds; a summary at the end

Outages (outage.py) are waited out by the clients and outputs; metrics.py exports what
the rooms count.

Invariants (the rooms' docstrings hold their own):

* At-least-once by default: a batch's offsets are committed only after its outputs
  (assignments, drift record, dead letters) are acknowledged. Exactly-once puts them in
  one transaction per batch, all but the dead letters (deadletters.py says why).
* Any record yields an assignment or a dead letter; a dead letter the broker refuses is
  logged, counted and skipped, and never stops the loop or the offsets (one held up by
  an outage waits for the broker, like the assignments).
* The model and its input offsets travel together in each checkpoint; on every partition
  assignment the service seeks to the checkpoint's offsets, so the model never learns a
  record twice or misses one. Batch ends are journaled before outputs leave, so records
  re-read after a crash form the same batches and get the same labels.
* Every batch is labelled by the model that learnt from all batches before it (predict
  waits for the previous update), so the labels do not depend on timing.
* The rebalance callbacks (kafka-python 3 runs them on its IO thread, which also sends
  the heartbeats) only record what happened; the loop's thread acts on it between batches.
* Only the newest owner writes (ownership.py, fencing.py): an assignment claims an owner
  epoch, and journal lines, update plans and checkpoints are written under it. An
  instance whose partitions were lost, whose session expired or that finds a newer epoch
  publishes, journals, checkpoints and commits nothing more, and stands by; when it gets
  the partitions again it resumes from the newest checkpoint, not from its memory.
* A batch's outputs leave only once its journal line is written: while the checkpoint
  directory fails, the batch waits (retried with backoff, directory.py) rather than
  leave unreplayable.
* One model per consumer group: the assignor gives every input partition to one member;
  the others stand by and take over from the newest checkpoint when the owner leaves.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from kafka.errors import OffsetOutOfRangeError

from stream_dec.io.codecs import (
    decode_batch,
    encode_assignments,
    encode_drift,
    encode_lifecycle,
)
from stream_dec.io.partitioner import default_partitions
from stream_dec.service.batcher import Batch, Batcher
from stream_dec.service.checkpointer import (
    Checkpointer,
    NoCheckpointError,
    checkpoint_offsets,
    checkpoint_owner,
    load_newest,
    newest_or_none,
)
from stream_dec.service.clients import (
    AllToOneAssignor,
    broker_connected,
    highwater_lag,
    make_consumer,
    transactional_id,
)
from stream_dec.service.deadletters import DeadLetters
from stream_dec.service.directory import DirectoryHealth
from stream_dec.service.fencing import Fenced, OwnerLease, instance_id
from stream_dec.service.hooks import BatchInfo, ServiceHooks
from stream_dec.service.journal import JOURNAL, Journal
from stream_dec.service.learner import Learner
from stream_dec.service.metrics import ServiceMetrics, serve_metrics
from stream_dec.service.outage import Outage, OutageError
from stream_dec.service.outputs import OUTPUTS, close_outputs, open_outputs
from stream_dec.service.ownership import Ownership
from stream_dec.service.positions import InputPositions, Outside
from stream_dec.service.progress import Progress
from stream_dec.settings import Settings

__all__ = ["AllToOneAssignor", "NoCheckpointError", "StreamService"]

log = logging.getLogger("stream_dec.service")

#: Longest single poll: the loop checks for stop and idleness at least this often.
MAX_POLL_MS = 200
#: Key of the drift records on the output topic.
DRIFT_KEY = b"__drift__"


class StreamService:
    """One running instance of ``stream-dec run`` (role ``all``; the learner role extends it).

    ``model``: start from this model instead of the newest checkpoint. ``hooks``:
    callables told about polls, batches, updates and checkpoints (stream_dec/service/hooks.py).
    The service holds the model, its input offsets and the rooms, and processes the
    batches; it is the :class:`~stream_dec.service.ownership.OwnerHost` of its
    :class:`~stream_dec.service.ownership.Ownership`.
    """

    #: The model's learning method (the learner role learns from latents).
    learn_method = "partial_fit"
    #: This process's role, as the metrics report it.
    role = "all"

    def __init__(self, settings: Settings, model: Any | None = None, hooks: ServiceHooks | None = None):
        self.settings = settings
        use_torch_threads(settings.model.threads)
        ckpt_dir = Path(settings.checkpoint.dir)
        self.metrics = ServiceMetrics()
        self.metrics.set_role(self.role)
        self.progress = Progress(settings.progress.every_batches, settings.progress.every_s)
        self.hooks = self.progress.observe(hooks or ServiceHooks())
        self.dead_letters = DeadLetters(settings, self.metrics)
        self.model = model if model is not None else load_newest(settings)
        self.offsets: dict[int, int] = checkpoint_offsets(self.model, settings.kafka.input_topic)
        self._outputs_class = OUTPUTS[settings.kafka.processing_guarantee]
        version = int(self.model.version_)
        self.journal = Journal(ckpt_dir / JOURNAL, base=version, durable=self._outputs_class.durable_journal)
        lease = OwnerLease(ckpt_dir, instance_id())
        self.checkpointer = Checkpointer(
            ckpt_dir, journal=self.journal, topic=settings.kafka.input_topic, version=version,
            keep=settings.checkpoint.keep, interval=settings.checkpoint.interval_batches, metrics=self.metrics,
            on_written=lambda v, seconds: self.hooks.on_checkpoint(v, seconds), lease=lease,
            on_fenced=lambda exc: self.ownership.checkpoint_fenced(exc),
        )
        self.checkpointer.written_by = checkpoint_owner(self.model)  # the state in memory is this checkpoint's
        self.directory = DirectoryHealth(ckpt_dir, self.metrics)
        self.ownership = Ownership(lease, self.checkpointer, self.directory, self.metrics, self,
                                   newest=lambda: newest_or_none(settings), group=settings.kafka.group_id)
        self.batcher = Batcher(settings.batch.max_size, settings.batch.max_wait_ms, max_bytes=settings.batch.max_bytes,
                               on_replay_abandoned=self._replay_abandoned)
        self.learner = Learner(self.learn_method)
        self.consumer = self.outputs = self.server = None
        self.processed_batches = 0
        self._last_activity = 0.0  # monotonic time of the last records or assignment (0: none yet)
        self._stop = threading.Event()
        # Batch processing happens on the loop's thread only (the rebalance callbacks just
        # record events, ownership.py); re-entrant for the handlers that drain within it.
        self._lock = threading.RLock()
        self.outage = Outage(settings, self.metrics, self._stop)
        self.positions = InputPositions(settings, self.metrics, self.outage)
        self._held: Batch | None = None  # a batch whose journal line could not be written yet
        self._unsettled = None  # an update whose plan could not be journaled yet (its drift record waits)
        self._batch_plan = self._batch_key = None  # the plan and identity of the batch being labelled
        self.metrics.record_model(self.model)

    @property
    def transactional_id(self) -> str:
        """The exactly-once producer's transactional id (one per consumer group and input topic)."""
        return transactional_id(self.settings)

    @property
    def producer(self):
        """The output producer (replaced after an outage: a restarted broker may not know the old one)."""
        return self.outputs.producer if self.outputs is not None else None

    # ------------------------------------------------------------ the loop
    def run(self, *, max_idle_s: float | None = None, install_signals: bool = True) -> int:
        """Run until :meth:`stop` (SIGTERM/SIGINT) or ``max_idle_s`` without records; returns 0."""
        try:
            self._start(install_signals)
        except OutageError:
            if not self._stop.is_set():
                raise
            # Stopped while waiting for the broker: nothing was read, so nothing is owed.
            log.info("stopped before the broker answered: nothing read, nothing to commit")
            self.close()
            return 0
        first_version = int(self.model.version_)
        try:
            while not self._stop.is_set():
                self.metrics.loop_alive()
                if self._poll():
                    self._last_activity = time.monotonic()
                with self._lock:
                    self.ownership.handle_events()
                    self._process_ready()
                if self.progress.due():
                    log.info("%s", self.progress.line(self._lag()))
                if self._idle(max_idle_s):
                    log.info("no records for %.1fs: stopping", max_idle_s)
                    break
            with self._lock:
                self.ownership.handle_events()
                # A standby, or an owner fenced meanwhile, must not write its stale model over the owner's.
                if self.ownership.owns and self.ownership.fence_reason() is None:
                    self._drain()
                    self.checkpoint()
                    self.commit(wait=True)
        finally:
            self.close()
            log.info("%s", self.progress.summary(delivered=self.dead_letters.delivered, failed=self.dead_letters.failed,
                                                 first_version=first_version, last_version=int(self.model.version_)))
        return 0

    def stop(self, *_args) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and exit."""
        self._stop.set()

    def checkpoint(self, *, wait: bool = True) -> None:
        """Checkpoint the model with the next offset of every input partition.

        The state is serialised here, between updates; the file is written on the
        checkpoint thread unless ``wait`` (shutdown, revocation), which returns only once
        it is durable.
        """
        # The checkpoint holds the model after the last batch's update; that update's drift
        # record must be acknowledged first, or a crash now would lose it for good.
        if not self._settle():  # the update's plan is not journaled: its state cannot be checkpointed yet
            return
        if self.outputs is not None:
            self.outputs.await_acks()
        self.checkpointer.take(self.model, self.offsets, wait=wait, owner=self.ownership.owner())

    def commit(self, *, wait: bool = False) -> None:
        """Commit the input offsets of the processed batches, unless this instance is fenced."""
        if self.ownership.fence_reason() is None:
            self.outputs.commit(self.offsets, wait=wait)

    def close(self) -> None:
        """Close clients, the learner and checkpoint threads and the metrics server (idempotent)."""
        self.learner.close()
        self.checkpointer.close()
        self.dead_letters.close()
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
            self.ownership.close()
        close_outputs(self.outputs, self.outage)
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _start(self, install_signals: bool) -> None:
        if install_signals:
            stop_on_signals(self.stop)
        self.checkpointer.directory.mkdir(parents=True, exist_ok=True)
        self.server = serve_metrics(self.settings, self.metrics)
        k = self.settings.kafka
        # An unreachable broker is waited for (with backoff, up to max_outage_s), with
        # /healthz answering 503 meanwhile, rather than failing on the first try.
        self.consumer = self.outage.retry(f"broker (input topic {k.input_topic!r})", lambda: make_consumer(self.settings))
        self.outputs = open_outputs(self.settings, self._outputs_class, self.consumer, self.outage)
        self.dead_letters.start(self.outage, broker_up=lambda: broker_connected(self.consumer))
        self.consumer.subscribe([k.input_topic], listener=self.ownership.listener(self.consumer))

    def _poll(self) -> int:
        """Poll for the batch being filled; returns the number of records added."""
        t0 = time.perf_counter()
        wait_ms, room = self.batcher.poll_budget()
        try:
            polled = self.consumer.poll(timeout_ms=min(wait_ms, MAX_POLL_MS) if wait_ms else 0, max_records=room)
        except OffsetOutOfRangeError as exc:  # the client resets nothing itself (clients.py)
            fetched = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            self._reset_positions(self.positions.refused(self.consumer, fetched))
            polled = {}
        polled_s = time.perf_counter() - t0
        self.outputs.after_poll(self.offsets)
        n = 0
        with self._lock:  # not around poll(): a rebalance callback inside it takes the lock
            for records in polled.values():
                self.batcher.add(records)
                n += len(records)
        outside = self.positions.check(self.consumer, n)
        if outside:
            self._reset_positions(outside)
        self.hooks.on_poll(n, time.perf_counter() - t0, polled_s)
        return n

    def _lag(self) -> int | None:
        """Records behind the high watermarks, summed over the assigned partitions (None: not known yet)."""
        lag = highwater_lag(self.consumer)
        return sum(lag.values()) if lag else None

    def _idle(self, max_idle_s: float | None) -> bool:
        # The idle clock starts at the first partition assignment: a group join alone
        # takes about half the session timeout.
        if max_idle_s is None or not self._last_activity or self.batcher.pending:
            return False
        return time.monotonic() - self._last_activity > max_idle_s

    def _process_ready(self) -> None:
        """Process the batches that are ready (a held one first), then publish a finished update's drift record."""
        if not self.ownership.owns:  # records polled before a revocation or a fence took effect
            self.batcher.clear()
            return
        if self.directory.waiting():
            return
        while (batch := self._held or self.batcher.cut(self.offsets)) is not None:
            self._held = None
            if self._process(batch) is False:
                return
        if self._unsettled is not None or self.learner.done():
            self._settle()  # publish the drift record now rather than with the next batch

    def _drain(self) -> None:
        """Process every pending record now (shutdown, revocation)."""
        while (batch := self._held or self.batcher.cut(self.offsets, now=True)) is not None:
            self._held = None
            if self._process(batch) is False:
                break  # held by a directory failure, or fenced: unpublished and uncommitted, a restart redoes it

    def _replay_abandoned(self) -> None:
        if self.outputs is not None:
            self.outputs.forget_published()

    def _reset_positions(self, outside: Outside) -> None:
        """Positions outside the log (positions.py): log and count; policy ``fail`` raises, ``earliest`` resets.

        ``earliest``: the records already fetched are processed, then each partition
        resumes at its log's start, the journal (which describes the old log) is dropped
        and a checkpoint is written at once, so a restart does not find the old offsets again.
        """
        self.positions.report(outside)
        with self._lock:
            self._drain()
            self.offsets.update(self.positions.reset(self.consumer, outside))
            self.batcher.replay_from([])
            self.outputs.forget_published()
            self.checkpoint()

    # ------------------------------------------------------------ one batch
    def _process(self, batch: Batch) -> bool | None:
        """Label, start learning, publish; record the offsets once the outputs are acknowledged.

        False when the batch was not processed: held back (its journal line or the previous
        update's plan could not be written; retried) or dropped (this instance is fenced).
        """
        clock = _Stopwatch()
        records = batch.records
        decoded = self._decode(records)
        clock.lap("decode")
        if self.outputs.skip_publishing(records):
            self._relearn(batch, decoded, clock)
            return
        if not self._settle():  # predict needs the model the previous update leaves
            self._hold(batch)
            return False
        clock.lap("wait_update")
        version = int(self.model.version_)  # the model that labels this batch
        if not self._journal(batch, version):
            return False
        clock.lap("journal")
        self._batch_plan = batch.journaled.fields.get("plan") if batch.journaled is not None else None
        self._batch_key = (batch.end, version)
        self.outputs.open_batch()
        self.dead_letters.send(records, decoded.failures)
        self.metrics.records.labels("dead_lettered").inc(len(decoded.failures))
        valid = [records[i] for i in decoded.valid]
        if valid:
            self._label(valid, decoded, version, clock)
        self.dead_letters.await_acks()  # before the offsets move, in the transaction or after it
        self.outputs.close_batch(batch.end, self._settle)
        self.outputs.await_acks()
        clock.lap("acks")
        self.metrics.record_batch(records, valid)
        self.offsets.update(batch.end)
        self.processed_batches += 1
        self._batch_done(clock)
        self.hooks.on_batch(BatchInfo(records=records, end=batch.end, labelled=len(valid), dead_lettered=len(decoded.failures),
                                      relearnt=False, started=clock.started, timings=clock.laps))

    def _decode(self, records: list):
        """The batch's usable rows (``.X``, ``.ids``, ``.valid``) and its ``.failures`` (dead letters)."""
        k = self.settings.kafka
        return decode_batch([(r.key, r.value, r.headers) for r in records], dim=self.model.n_features_in_,
                            max_bytes=k.max_record_bytes, max_key_bytes=k.max_key_bytes, max_id_bytes=k.max_id_bytes)

    def _label(self, valid: list, decoded, version: int, clock: _Stopwatch) -> None:
        """Predict, send the assignments, start the update."""
        out = self.settings.kafka.output_topic
        t0 = time.perf_counter()
        labels, conf = self.model.predict_with_confidence(decoded.X)
        self.metrics.predict_seconds.observe(time.perf_counter() - t0)
        clock.lap("predict")
        keys = [item_id.encode() for item_id in decoded.ids]
        # Kafka's own key partitioning, computed for the whole batch (see io/partitioner.py).
        parts = default_partitions(keys, self.outputs.partitions_for(out)).tolist()
        values = encode_assignments(
            decoded.ids, labels.tolist(), conf, version, valid[0].topic, [r.partition for r in valid], [r.offset for r in valid],
            roots=self.model.roots(labels).tolist(),
        )
        self.outputs.send_many(out, keys, values, parts)
        self.learner.start(self.model, decoded.X, _offset_ranges(valid), plan=self._batch_plan, batch=self._batch_key)
        clock.lap("send")

    def _relearn(self, batch: Batch, decoded, clock: _Stopwatch) -> None:
        """Exactly-once replay of a batch whose outputs were committed before a crash: learn only."""
        self._settle()
        if decoded.valid:
            plan = batch.journaled.fields.get("plan") if batch.journaled is not None else None
            update = self.learner.learn_now(self.model, decoded.X, plan=plan)
            self.metrics.record_update(update.report, self.model)
            self.hooks.on_update(update.report, update.started, update.ended)
        clock.lap("wait_update")
        for p, o in batch.end.items():
            self.offsets[p] = max(self.offsets.get(p, 0), o)
        self.metrics.records.labels("replayed").inc(len(batch.records))
        self._batch_done(clock)
        self.hooks.on_batch(BatchInfo(records=batch.records, end=batch.end, labelled=0, dead_lettered=0,
                                      relearnt=True, started=clock.started, timings=clock.laps))

    def _batch_done(self, clock: _Stopwatch) -> None:
        """Checkpoint when due, then let the outputs commit the offsets."""
        if self.checkpointer.batch_done():
            self.checkpoint(wait=False)
        clock.lap("checkpoint")
        if self.ownership.fence_reason() is None:  # a fenced owner commits nothing
            self.outputs.batch_done(self.offsets)
        clock.lap("commit")
        clock.laps["total"] = time.perf_counter() - clock.started

    def _journal(self, batch: Batch, version: int) -> bool:
        """Journal a new batch's end under the lease: the point after which its outputs may leave.

        False when the batch must not be published: fenced (dropped), or the directory
        failed (the batch is held and retried after a backoff).
        """
        try:
            self.ownership.check()
            with self.ownership.guard():
                if batch.journaled is None:  # a replayed batch's line is in the journal already
                    self.journal.append(batch.end, labelled_by=version, epoch=self.ownership.epoch)
        except Fenced as exc:
            self.ownership.drop(exc)
            return False
        except OSError as exc:
            self._hold(batch)
            self.directory.failed(exc)
            return False
        self.directory.ok()
        return True

    def _settle(self) -> bool:
        """Wait for the running update, if any, journal its plan and publish its batch's drift and lifecycle records.

        False when the plan cannot be journaled (a directory failure: the update waits,
        its drift record unpublished, and is retried; or fenced): a replay could not
        redo the update exactly, so nothing that depends on it may leave.
        """
        update, self._unsettled = self._unsettled or self.learner.settle(), None  # an update that raised ends the run here
        if update is None:
            return True
        if update.batch is not None and not update.replayed:
            end, labelled_by = update.batch
            try:
                with self.ownership.guard():
                    self.journal.append(end, labelled_by=labelled_by, epoch=self.ownership.epoch, plan=update.report.plan)
            except Fenced as exc:
                self.ownership.drop(exc)
                return False
            except OSError as exc:
                self._unsettled = update
                self.directory.failed(exc)
                return False
        drift = encode_drift(update.report, topic=self.settings.kafka.input_topic, offset_ranges=update.ranges)
        self.outputs.send(self.settings.kafka.output_topic, key=DRIFT_KEY, value=drift)
        for event in update.report.lifecycle:  # after the drift record that names the new ids
            self.outputs.send(self.settings.kafka.output_topic, key=str(event["cluster"]).encode(), value=encode_lifecycle(event))
        self._updated(update)
        self.metrics.record_update(update.report, self.model)
        self.hooks.on_update(update.report, update.started, update.ended)
        return True

    def _updated(self, update) -> None:
        """An update's records were sent (the learner role publishes the new version here)."""

    def _hold(self, batch: Batch) -> None:
        if self.ownership.epoch is not None:  # a fenced owner drops its batches instead
            self._held = batch

    # ------------------------------------------------------------ ownership changes (OwnerHost, ownership.py)
    def abandon(self) -> bool:
        """Forget the records not cut, a held batch and an update whose drift record was not published.

        True when the model learnt something no journal line describes.
        """
        learnt = self._unsettled is not None or self.learner.busy()
        self._unsettled = None
        try:
            self.learner.settle()
        except Exception:
            log.exception("update of the abandoned model failed")
        self._held = None
        self.batcher.clear()
        return learnt

    def begin_assignment(self, partitions: list[TopicPartition]) -> None:
        """A new assignment begins: forget what was polled, check the positions against the log at the next poll."""
        self.positions.assigned(partitions)  # a blocking call: done on the loop's thread
        self._last_activity = time.monotonic()
        self.batcher.clear()  # polled before the seek in resume: maybe from the group's committed offsets
        self._held = None

    def adopt(self, model) -> None:
        """Continue from ``model``, the newest checkpoint, and the offsets stored with it."""
        self.model = model
        self.offsets = checkpoint_offsets(model, self.settings.kafka.input_topic)
        self.checkpointer.reset(model.version_, written_by=checkpoint_owner(model))
        self.metrics.record_model(model)
        log.info("resuming from %s (model version %d)", model.checkpoint_path_, model.version_)

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Replay the journal after the model's checkpoint; read ``partitions`` from the model's offsets."""
        self.journal.seal()
        self.batcher.replay_from(self.journal.following(self.model.version_, self.offsets))
        # The checkpoint is the truth: a partition it has no offset for is one the model
        # has not learnt from yet, whatever the group committed since (those commits may
        # be ahead of the checkpoint; the journal replays the batches in between).
        fresh = [tp for tp in partitions if tp.partition not in self.offsets]
        for tp in partitions:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
        if fresh:
            self.consumer.seek_to_beginning(*fresh)
        self.consumer.resume(*partitions)
        self.outputs.on_assigned()
        log.info("assigned %s; resuming at %s", [tp.partition for tp in partitions], self.offsets or "the beginning")

    def assignment_done(self, partitions: list[TopicPartition]) -> None:
        """The assignment is in effect: tell the hooks."""
        self.hooks.on_assigned([tp.partition for tp in partitions])


def _offset_ranges(records: list) -> dict[int, tuple[int, int]]:
    """(first, last) offset of ``records`` per partition (the drift record's ``offset_ranges``)."""
    ranges: dict[int, tuple[int, int]] = {}
    for r in records:
        lo, hi = ranges.get(r.partition, (r.offset, r.offset))
        ranges[r.partition] = (min(lo, r.offset), max(hi, r.offset))
    return ranges


class _Stopwatch:
    """Seconds per named step of one batch."""

    def __init__(self):
        self.started = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def stop_on_signals(stop) -> None:
    """Call ``stop`` on SIGTERM and SIGINT (only the main thread may install handlers; elsewhere nothing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def use_torch_threads(threads: int | None) -> None:
    """``threads`` torch threads, or one per CPU this process may run on."""
    import torch

    # Not torch's own default: that counts the host's cores, also inside a container
    # limited to a few (OpenMP threads then spin against each other).
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or usable)

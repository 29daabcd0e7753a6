"""The Kafka service: poll, cut, label, learn, publish, commit, checkpoint.

:class:`StreamService` is the loop; the work happens in the rooms of stream_dec/service/.
The path of one batch, in order::

    consumer.poll                  clients.py       records of the assigned partitions
     └> Batcher.add, cut           batcher.py       by count, bytes or wait; at journaled ends when replaying
         └> decode_batch                            unusable records become dead letters
             ├> outputs.open_batch outputs.py       exactly-once: the batch's transaction begins
             ├> Learner.settle     learner.py       the previous update ends; its drift record is sent
             ├> Journal.append     journal.py       the batch's end, before any of its outputs leaves
             ├> DeadLetters.send   deadletters.py   dead letters, on their own producer
             ├> model.predict, outputs.send_many    assignments, by the model after the previous batch
             ├> Learner.start                       partial_fit, overlapping the acks and the next poll
             ├> DeadLetters.await_acks              each delivered, or logged, counted and skipped
             ├> outputs.close_batch, await_acks     at-least-once: flush and acks; exactly-once: the
             │                                      drift record and offsets join, the transaction commits
             ├> Checkpointer.take  checkpointer.py  every N batches: snapshot here, written on its
             │                                      thread, then Journal.prune
             └> outputs.batch_done                  at-least-once: asynchronous offset commit
    Progress.due, line             progress.py      every N batches or S seconds; a summary at the end

Invariants (the rooms' docstrings hold their own):

* At-least-once by default: a batch's offsets are committed only after its outputs
  (assignments, drift record, dead letters) are acknowledged. Exactly-once puts them in
  one transaction per batch, all but the dead letters (deadletters.py says why).
* Any record yields an assignment or a dead letter; a dead letter that cannot be
  delivered is logged, counted and skipped, and never stops the loop or the offsets.
* The model and its input offsets travel together in each checkpoint; on every partition
  assignment the service seeks to the checkpoint's offsets, so the model never learns a
  record twice or misses one. Batch ends are journaled before outputs leave, so records
  re-read after a crash form the same batches and get the same labels.
* Every batch is labelled by the model that learnt from all batches before it (predict
  waits for the previous update), so the labels do not depend on timing.
* One lock serialises batch processing on the loop's thread with the rebalance callbacks
  that kafka-python 3 runs on its IO thread at any time.
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

from stream_dec.io.codecs import decode_batch, encode_assignments, encode_drift
from stream_dec.io.partitioner import default_partitions
from stream_dec.service.batcher import Batch, Batcher
from stream_dec.service.checkpointer import (
    Checkpointer,
    NoCheckpointError,
    checkpoint_offsets,
    load_newest,
    read_newest,
)
from stream_dec.service.clients import (
    AllToOneAssignor,
    RebalanceListener,
    highwater_lag,
    make_consumer,
    make_output_producer,
    transactional_id,
)
from stream_dec.service.deadletters import DeadLetters
from stream_dec.service.hooks import BatchInfo, ServiceHooks
from stream_dec.service.journal import JOURNAL, Journal
from stream_dec.service.learner import Learner
from stream_dec.service.metrics import MetricsServer, ServiceMetrics
from stream_dec.service.outputs import OUTPUTS
from stream_dec.service.progress import Progress
from stream_dec.settings import Settings

__all__ = ["AllToOneAssignor", "NoCheckpointError", "StreamService"]

log = logging.getLogger("stream_dec.service")

#: Longest single poll: the loop checks for stop and idleness at least this often.
MAX_POLL_MS = 200
#: Key of the drift records on the output topic.
DRIFT_KEY = b"__drift__"


class StreamService:
    """One running instance of ``stream-dec run``.

    ``model``: start from this model instead of the newest checkpoint. ``hooks``:
    callables told about polls, batches, updates and checkpoints (stream_dec/service/hooks.py).
    """

    def __init__(self, settings: Settings, model: Any | None = None, hooks: ServiceHooks | None = None):
        self.settings = settings
        _use_torch_threads(settings.model.threads)
        self.ckpt_dir = Path(settings.checkpoint.dir)
        self.metrics = ServiceMetrics()
        self.progress = Progress(settings.progress.every_batches, settings.progress.every_s)
        self.hooks = self.progress.observe(hooks or ServiceHooks())
        self.dead_letters = DeadLetters(settings, self.metrics)
        self.model = model if model is not None else load_newest(settings)
        self.offsets: dict[int, int] = checkpoint_offsets(self.model, settings.kafka.input_topic)
        self._outputs_class = OUTPUTS[settings.kafka.processing_guarantee]
        version = int(self.model.version_)
        self.journal = Journal(self.ckpt_dir / JOURNAL, base=version, durable=self._outputs_class.durable_journal)
        self.checkpointer = Checkpointer(
            self.ckpt_dir, journal=self.journal, topic=settings.kafka.input_topic, version=version,
            keep=settings.checkpoint.keep, interval=settings.checkpoint.interval_batches, metrics=self.metrics,
            on_written=lambda v, seconds: self.hooks.on_checkpoint(v, seconds),
        )
        self.batcher = Batcher(settings.batch.max_size, settings.batch.max_wait_ms, max_bytes=settings.batch.max_bytes,
                               on_replay_abandoned=self._replay_abandoned)
        self.learner = Learner()
        self.consumer = self.producer = self.outputs = self.server = None
        self.processed_batches = 0
        self._last_activity = 0.0  # monotonic time of the last records or assignment (0: none yet)
        self._owns = False  # the input partitions are assigned to this instance
        self._stop = threading.Event()
        # kafka-python 3 runs rebalance callbacks on its IO thread, at any time: batch
        # processing there (flush on revoke) and on the loop's thread must not interleave.
        self._lock = threading.RLock()
        self.metrics.record_model(self.model)

    @property
    def transactional_id(self) -> str:
        """The exactly-once producer's transactional id (one per consumer group and input topic)."""
        return transactional_id(self.settings)

    # ------------------------------------------------------------ the loop
    def run(self, *, max_idle_s: float | None = None, install_signals: bool = True) -> int:
        """Run until :meth:`stop` (SIGTERM/SIGINT) or ``max_idle_s`` without records; returns 0."""
        self._start(install_signals)
        first_version = int(self.model.version_)
        try:
            while not self._stop.is_set():
                self.metrics.loop_alive()
                if self._poll():
                    self._last_activity = time.monotonic()
                with self._lock:
                    while (batch := self.batcher.cut(self.offsets)) is not None:
                        self._process(batch)
                    if self.learner.done():
                        self._settle()  # publish the drift record now rather than with the next batch
                if self.progress.due():
                    log.info("%s", self.progress.line(self._lag()))
                if self._idle(max_idle_s):
                    log.info("no records for %.1fs: stopping", max_idle_s)
                    break
            with self._lock:
                self._drain()
                if self._owns:  # a standby must not write its stale model over the owner's
                    self.checkpoint()
                    self.outputs.commit(self.offsets, wait=True)
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
        self._settle()
        if self.outputs is not None:
            self.outputs.await_acks()
        self.checkpointer.take(self.model, self.offsets, wait=wait)

    def close(self) -> None:
        """Close clients, the learner and checkpoint threads and the metrics server (idempotent)."""
        self.learner.close()
        self.checkpointer.close()
        self.dead_letters.close()
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.producer is not None:
            self.producer.flush()
            self.producer.close()
            self.producer = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _start(self, install_signals: bool) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        m = self.settings.metrics
        if m.port:
            stale_after_s = max(30.0, 3 * self.settings.batch.max_wait_ms / 1000)
            self.server = MetricsServer(self.metrics, m.host, m.port, stale_after_s=stale_after_s).start()
            log.info("metrics on http://%s:%d/metrics", m.host, self.server.port)
        self.consumer = make_consumer(self.settings)
        self.producer = make_output_producer(self.settings, **self._outputs_class.producer_overrides(self.settings))
        self.outputs = self._outputs_class(self.settings, self.producer, self.consumer)
        self.outputs.start()
        self.dead_letters.start()
        self.consumer.subscribe([self.settings.kafka.input_topic], listener=RebalanceListener(self._on_assigned, self._on_revoked))

    def _poll(self) -> int:
        """Poll for the batch being filled; returns the number of records added."""
        t0 = time.perf_counter()
        wait_ms, room = self.batcher.poll_budget()
        polled = self.consumer.poll(timeout_ms=min(wait_ms, MAX_POLL_MS) if wait_ms else 0, max_records=room)
        polled_s = time.perf_counter() - t0
        self.outputs.after_poll(self.offsets)
        n = 0
        with self._lock:  # not around poll(): a rebalance callback inside it takes the lock
            for records in polled.values():
                self.batcher.add(records)
                n += len(records)
        if n:
            self.metrics.record_lag(highwater_lag(self.consumer))
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

    def _drain(self) -> None:
        """Process every pending record now (shutdown, revocation)."""
        while (batch := self.batcher.cut(self.offsets, now=True)) is not None:
            self._process(batch)

    def _replay_abandoned(self) -> None:
        if self.outputs is not None:
            self.outputs.forget_published()

    # ------------------------------------------------------------ one batch
    def _process(self, batch: Batch) -> None:
        """Label, start learning, publish; record the offsets once the outputs are acknowledged."""
        clock = _Stopwatch()
        records = batch.records
        k = self.settings.kafka
        decoded = decode_batch([(r.key, r.value, r.headers) for r in records], dim=self.model.n_features_in_,
                               max_bytes=k.max_record_bytes, max_key_bytes=k.max_key_bytes, max_id_bytes=k.max_id_bytes)
        clock.lap("decode")
        if self.outputs.skip_publishing(records):
            self._relearn(batch, decoded, clock)
            return
        self.outputs.open_batch()
        self._settle()  # predict needs the model the previous update leaves
        clock.lap("wait_update")
        version = int(self.model.version_)  # the model that labels this batch
        if batch.journaled is None:  # a replayed batch's line is in the journal already
            self.journal.append(batch.end, labelled_by=version)
        clock.lap("journal")
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

    def _label(self, valid: list, decoded, version: int, clock: _Stopwatch) -> None:
        """Predict, send the assignments, start the update."""
        out = self.settings.kafka.output_topic
        t0 = time.perf_counter()
        labels, conf = self.model.predict_with_confidence(decoded.X)
        self.metrics.predict_seconds.observe(time.perf_counter() - t0)
        clock.lap("predict")
        keys = [item_id.encode() for item_id in decoded.ids]
        # Kafka's own key partitioning, computed for the whole batch (see io/partitioner.py).
        parts = default_partitions(keys, self.producer.partitions_for(out)).tolist()
        values = encode_assignments(
            decoded.ids, labels.tolist(), conf, version, valid[0].topic, [r.partition for r in valid], [r.offset for r in valid]
        )
        self.outputs.send_many(out, keys, values, parts)
        self.learner.start(self.model, decoded.X, _offset_ranges(valid))
        clock.lap("send")

    def _relearn(self, batch: Batch, decoded, clock: _Stopwatch) -> None:
        """Exactly-once replay of a batch whose outputs were committed before a crash: learn only."""
        self._settle()
        if decoded.valid:
            update = self.learner.learn_now(self.model, decoded.X)
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
        self.outputs.batch_done(self.offsets)
        clock.lap("commit")
        clock.laps["total"] = time.perf_counter() - clock.started

    def _settle(self) -> None:
        """Wait for the running update, if any, and publish its batch's drift record."""
        update = self.learner.settle()  # an update that raised ends the run here
        if update is None:
            return
        drift = encode_drift(update.report, topic=self.settings.kafka.input_topic, offset_ranges=update.ranges)
        self.outputs.send(self.settings.kafka.output_topic, key=DRIFT_KEY, value=drift)
        self.metrics.record_update(update.report, self.model)
        self.hooks.on_update(update.report, update.started, update.ended)

    # ------------------------------------------------------------ rebalances (client IO thread)
    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._assigned(partitions)
        self.hooks.on_assigned([tp.partition for tp in partitions])

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        self.metrics.assigned.set(len(partitions))
        self._owns = bool(partitions)
        self._last_activity = time.monotonic()
        if not partitions:
            log.info("standby: another instance of group %s owns the input partitions", self.settings.kafka.group_id)
            return
        self._settle()
        self._resume_newest()
        self.journal.seal()
        self.batcher.replay_from(self.journal.following(self.model.version_))
        # The checkpoint is the truth: a partition it has no offset for is one the model
        # has not learnt from yet, whatever the group committed since (those commits may
        # be ahead of the checkpoint; the journal replays the batches in between).
        fresh = [tp for tp in partitions if tp.partition not in self.offsets]
        for tp in partitions:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
        if fresh:
            self.consumer.seek_to_beginning(*fresh)
        self.outputs.on_assigned()
        log.info("assigned %s; resuming at %s", [tp.partition for tp in partitions], self.offsets or "the beginning")

    def _resume_newest(self) -> None:
        """Another instance may have moved on since this one loaded: resume from the newest state."""
        from stream_dec import CheckpointError

        self.checkpointer.wait()
        try:
            newest = read_newest(self.settings)
        except CheckpointError:
            return
        if newest.version_ > self.model.version_:
            self.model = newest
            self.offsets = checkpoint_offsets(newest, self.settings.kafka.input_topic)
            self.checkpointer.reset(newest.version_)
            self.metrics.record_model(newest)

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        # Runs on the client's IO thread (kafka-python 3): no blocking consumer calls here,
        # so the commit is asynchronous. On our own shutdown everything is already done.
        with self._lock:
            if partitions and (self.batcher.pending or self.offsets != self.outputs.committed):
                self._drain()
                self.checkpoint()
                self.outputs.commit(self.offsets)
            self.metrics.assigned.set(0)
            self._owns = False


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


def _use_torch_threads(threads: int | None) -> None:
    """``threads`` torch threads, or one per CPU this process may run on."""
    import torch

    # Not torch's own default: that counts the host's cores, also inside a container
    # limited to a few (OpenMP threads then spin against each other).
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or usable)

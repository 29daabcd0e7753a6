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
* The rebalance callbacks (kafka-python 3 runs them on its IO thread, which also sends
  the heartbeats) only record what happened; the loop's thread acts on it between batches.
* Only the newest owner writes (fencing.py): an assignment claims an owner epoch, and
  journal lines, update plans and checkpoints are written under it. An instance whose
  partitions were lost, whose session expired or that finds a newer epoch publishes,
  journals, checkpoints and commits nothing more, and stands by; when it gets the
  partitions again it resumes from the newest checkpoint, not from its memory.
* A batch's outputs leave only once its journal line is written: while the checkpoint
  directory fails, the batch waits (retried with backoff) rather than leave unreplayable.
* One model per consumer group: the assignor gives every input partition to one member;
  the others stand by and take over from the newest checkpoint when the owner leaves.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from kafka.errors import OffsetOutOfRangeError

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
from stream_dec.service.checkpointer import checkpoint_owner
from stream_dec.service.clients import group_generation, request_rejoin, session_expired
from stream_dec.service.fencing import Fenced, OwnerLease, instance_id
from stream_dec.service.clients import (
    AllToOneAssignor,
    RebalanceListener,
    CONNECT_TIMEOUT_S,
    broker_connected,
    highwater_lag,
    make_consumer,
    make_output_producer,
    positions,
    transactional_id,
)
from stream_dec.service.deadletters import DeadLetters
from stream_dec.service.hooks import BatchInfo, ServiceHooks
from stream_dec.service.journal import JOURNAL, Journal
from stream_dec.service.learner import Learner
from stream_dec.service.metrics import MetricsServer, ServiceMetrics
from stream_dec.service.outage import OffsetsOutOfRangeError, Outage
from stream_dec.service.outputs import OUTPUTS
from stream_dec.service.progress import Progress
from stream_dec.settings import Settings

__all__ = ["AllToOneAssignor", "NoCheckpointError", "StreamService"]

log = logging.getLogger("stream_dec.service")

#: Longest single poll: the loop checks for stop and idleness at least this often.
MAX_POLL_MS = 200
#: Longest gap between two exports of the positions (and checks of the broker) while no records arrive.
WATCH_EVERY_S = 0.5
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
        self.instance = instance_id()
        self.lease = OwnerLease(self.ckpt_dir, self.instance)
        self.checkpointer = Checkpointer(
            self.ckpt_dir, journal=self.journal, topic=settings.kafka.input_topic, version=version,
            keep=settings.checkpoint.keep, interval=settings.checkpoint.interval_batches, metrics=self.metrics,
            on_written=lambda v, seconds: self.hooks.on_checkpoint(v, seconds), lease=self.lease, on_fenced=self._checkpoint_fenced,
        )
        self.batcher = Batcher(settings.batch.max_size, settings.batch.max_wait_ms, max_bytes=settings.batch.max_bytes,
                               on_replay_abandoned=self._replay_abandoned)
        self.learner = Learner()
        self.consumer = self.outputs = self.server = None
        self.processed_batches = 0
        self._last_activity = 0.0  # monotonic time of the last records or assignment (0: none yet)
        self._owns = False  # the input partitions are assigned to this instance
        self._stop = threading.Event()
        # Batch processing happens on the loop's thread only (the rebalance callbacks just
        # record events, see _on_assigned); re-entrant for the handlers that drain within it.
        self._lock = threading.RLock()
        self.outage = Outage(settings, self.metrics, self._stop)
        self._check_log_starts = False  # compare positions with the log's start at the next poll
        self._watched = 0.0  # monotonic time positions were last exported
        self._unconnected = 0  # broker checks in a row that found no open connection
        self.metrics.record_model(self.model)
        self._init_fencing()

    def _init_fencing(self) -> None:
        """State of the ownership: epoch, rebalance events, batches held back by a directory failure."""
        self.checkpointer.written_by = checkpoint_owner(self.model)  # the state in memory is this checkpoint's
        self._epoch: int | None = None  # owner epoch held (fencing.py); None: not the owner
        self._events: collections.deque = collections.deque()  # (kind, partitions) recorded by the listener
        self._events_lock = threading.Lock()
        self._lost = threading.Event()  # set by the listener at once: the loop's fence checks see it mid-batch
        self._refused = threading.Event()  # the checkpoint thread found a newer epoch
        self._dropped = False  # the model in memory went past every checkpoint and was abandoned
        self._held: Batch | None = None  # a batch whose journal line could not be written yet
        self._unsettled = None  # an update whose plan could not be journaled yet (its drift record waits)
        self._retry_at = 0.0  # monotonic time before which a held write is not retried
        self._claim_at = 0.0  # the same for an assignment whose claim or resume failed
        self._backoff_s = 0.0
        self._batch_plan = self._batch_key = None  # the plan and identity of the batch being labelled

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
                    self._handle_events()
                    self._process_ready()
                if self.progress.due():
                    log.info("%s", self.progress.line(self._lag()))
                if self._idle(max_idle_s):
                    log.info("no records for %.1fs: stopping", max_idle_s)
                    break
            with self._lock:
                self._handle_events()
                # A standby, or an owner fenced meanwhile, must not write its stale model over the owner's.
                if self._owns and self._fence_reason() is None:
                    self._drain()
                    self.checkpoint()
                    self._commit(wait=True)
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
        owner = None if self._epoch is None else {"instance": self.instance, "epoch": self._epoch}
        self.checkpointer.take(self.model, self.offsets, wait=wait, owner=owner)

    def close(self) -> None:
        """Close clients, the learner and checkpoint threads and the metrics server (idempotent)."""
        self.learner.close()
        self.checkpointer.close()
        self.dead_letters.close()
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.outputs is not None and self.outputs.producer is not None:
            # In an outage what is left cannot be delivered: nothing of it was committed.
            self.outputs.producer.close(timeout=0 if self.outage.active else None)
            self.outputs.producer = None
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
        k = self.settings.kafka
        # An unreachable broker is waited for (with backoff, up to max_outage_s), with
        # /healthz answering 503 meanwhile, rather than failing on the first try.
        self.consumer = self.outage.retry(f"broker (input topic {k.input_topic!r})", lambda: make_consumer(self.settings))
        producer = self.outage.retry(f"broker (output topic {k.output_topic!r})", lambda: make_output_producer(
            self.settings, **self._outputs_class.producer_overrides(self.settings)))
        self.outputs = self._outputs_class(self.settings, producer, self.consumer, outage=self.outage)
        self.outage.retry(f"output topic {k.output_topic!r}", self.outputs.start)
        self.outputs.partitions_for(k.output_topic)  # reachable before any input is read
        self.dead_letters.start(self.outage, broker_up=lambda: broker_connected(self.consumer))
        self.consumer.subscribe([self.settings.kafka.input_topic], listener=RebalanceListener(self._on_assigned, self._on_revoked, self._on_lost))

    def _poll(self) -> int:
        """Poll for the batch being filled; returns the number of records added."""
        t0 = time.perf_counter()
        wait_ms, room = self.batcher.poll_budget()
        try:
            polled = self.consumer.poll(timeout_ms=min(wait_ms, MAX_POLL_MS) if wait_ms else 0, max_records=room)
        except OffsetOutOfRangeError as exc:  # the client resets nothing itself (clients.py)
            self._fetch_out_of_range(exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {})
            polled = {}
        polled_s = time.perf_counter() - t0
        self.outputs.after_poll(self.offsets)
        n = 0
        with self._lock:  # not around poll(): a rebalance callback inside it takes the lock
            for records in polled.values():
                self.batcher.add(records)
                n += len(records)
        self._watch_positions(n)
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
        while (batch := self._held or self.batcher.cut(self.offsets, now=True)) is not None:
            self._held = None
            if self._process(batch) is False:
                break  # held by a directory failure, or fenced: unpublished and uncommitted, a restart redoes it

    def _replay_abandoned(self) -> None:
        if self.outputs is not None:
            self.outputs.forget_published()

    # ------------------------------------------------------------ positions and outages
    @property
    def producer(self):
        """The output producer (replaced after an outage: a restarted broker may not know the old one)."""
        return self.outputs.producer if self.outputs is not None else None

    def _watch_positions(self, polled: int) -> None:
        """Export positions, high watermarks and the broker's state; apply the reset policy to a
        position the partition's log no longer holds (on the loop's thread)."""
        now = time.monotonic()
        due = now - self._watched >= WATCH_EVERY_S
        if due:
            self._watched = now
            if broker_connected(self.consumer):
                self._unconnected = 0
                self.outage.ok()
            else:
                # Twice in a row: a connection is briefly closed after start-up and between
                # tries. The client reconnects by itself; past max_outage_s the run ends.
                self._unconnected += 1
                if self._unconnected >= 2:
                    self.outage.failed(f"broker (input topic {self.settings.kafka.input_topic!r})")
                    return
        if not (polled or due or self._check_log_starts):
            return
        seen = positions(self.consumer)
        self.metrics.record_positions(seen)
        # tansu answers a fetch past its log's end with no records and no error: only the
        # high watermark below the position shows it (docs/kafka-notes.md).
        outside = {p: ("past_end", pos, hw) for p, (pos, hw) in seen.items() if hw is not None and pos > hw}
        if self._check_log_starts and seen:
            self._check_log_starts = False
            starts = self._log_starts(seen)
            outside.update({p: ("before_start", pos, starts[p]) for p, (pos, _) in seen.items()
                            if p in starts and pos < starts[p] and p not in outside})
        if outside:
            self._reset_offsets(outside)

    def _log_starts(self, partitions) -> dict[int, int]:
        """The first offset of each partition's log (``beginning_offsets`` is right on tansu too)."""
        topic = self.settings.kafka.input_topic
        starts = self.consumer.beginning_offsets([TopicPartition(topic, p) for p in partitions], timeout_ms=CONNECT_TIMEOUT_S * 1000)
        return {tp.partition: o for tp, o in starts.items()}

    def _fetch_out_of_range(self, fetched: dict) -> None:
        """The broker refused a fetch as out of range (Apache Kafka does, for both ends of the log)."""
        starts = self._log_starts([tp.partition for tp in fetched])
        outside = {}
        for tp, offset in fetched.items():
            offset = getattr(offset, "offset", offset)
            start = starts.get(tp.partition, 0)
            outside[tp.partition] = ("before_start", offset, start) if offset < start else ("past_end", offset, self.consumer.highwater(tp))
        self._reset_offsets(outside)

    def _reset_offsets(self, outside: dict[int, tuple[str, int, int | None]]) -> None:
        """``{partition: (where, position, log start or high watermark)}``: log loudly, count, apply the policy.

        ``earliest``: the records already fetched are processed, then each partition
        resumes at its log's start, the journal (which describes the old log) is dropped
        and a checkpoint is written at once, so a restart does not find the old offsets again.
        """
        topic, policy = self.settings.kafka.input_topic, self.settings.kafka.offset_reset_policy
        for p, (where, pos, edge) in sorted(outside.items()):
            self.metrics.offset_resets.labels(where).inc()
            if where == "past_end":
                log.error("input %s[%d]: position %d is past the log's end %s: the log was truncated, the topic "
                          "recreated or the broker restored empty", topic, p, pos, edge)
            else:
                log.error("input %s[%d]: position %d is before the log's start %d: %d records were deleted "
                          "(retention) before the service read them", topic, p, pos, edge, edge - pos)
        if policy == "fail":
            raise OffsetsOutOfRangeError(
                f"input positions outside the log of {topic!r}: "
                + ", ".join(f"partition {p} at {pos} ({where.replace('_', ' ')} {edge})" for p, (where, pos, edge) in sorted(outside.items()))
                + "; STREAM_DEC_KAFKA__OFFSET_RESET_POLICY=fail (deploy/OPERATE.md says what to do)")
        with self._lock:
            self._drain()
            starts = self._log_starts(outside)
            for p, (where, pos, edge) in sorted(outside.items()):
                start = starts.get(p, 0)
                self.offsets[p] = start
                self.consumer.seek(TopicPartition(topic, p), start)
                if where == "past_end":
                    log.warning("input %s[%d]: policy earliest: resuming at the log's start %d; the %s records "
                                "there are read although the checkpoint was past them", topic, p, start,
                                "?" if edge is None else max(0, edge - start))
                else:
                    log.warning("input %s[%d]: policy earliest: resuming at the log's start %d; %d records skipped",
                                topic, p, start, start - pos)
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
        k = self.settings.kafka
        decoded = decode_batch([(r.key, r.value, r.headers) for r in records], dim=self.model.n_features_in_,
                               max_bytes=k.max_record_bytes, max_key_bytes=k.max_key_bytes, max_id_bytes=k.max_id_bytes)
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
            decoded.ids, labels.tolist(), conf, version, valid[0].topic, [r.partition for r in valid], [r.offset for r in valid]
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
        if self._fence_reason() is None:  # a fenced owner commits nothing
            self.outputs.batch_done(self.offsets)
        clock.lap("commit")
        clock.laps["total"] = time.perf_counter() - clock.started

    def _settle(self) -> bool:
        """Wait for the running update, if any, journal its plan and publish its batch's drift record.

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
                with self.lease.guard(self._epoch):
                    self.journal.append(end, labelled_by=labelled_by, epoch=self._epoch, plan=update.report.plan)
            except Fenced as exc:
                self._drop(exc)
                return False
            except OSError as exc:
                self._unsettled = update
                self._dir_failed(exc)
                return False
        drift = encode_drift(update.report, topic=self.settings.kafka.input_topic, offset_ranges=update.ranges)
        self.outputs.send(self.settings.kafka.output_topic, key=DRIFT_KEY, value=drift)
        self.metrics.record_update(update.report, self.model)
        self.hooks.on_update(update.report, update.started, update.ended)
        return True

    # ------------------------------------------------------------ rebalances and fencing
    # kafka-python 3 calls the listener on its IO thread, which also sends the heartbeats:
    # the callbacks only record the event, the loop's thread acts on it before its next
    # batch (_handle_events). A batch in progress meanwhile is safe: its journal line,
    # written under the lease (fencing.py), is what the next owner replays exactly.
    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        if partitions:
            # The client must not look for a position itself (it resets nothing, clients.py):
            # provisional positions now (non-blocking), paused until the loop's thread has
            # chosen the model and seeks for real.
            self.consumer.pause(*partitions)
            known = dict(self.offsets)
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

    def _handle_events(self) -> None:
        """Act on the recorded rebalance events, in order (the loop's thread)."""
        while True:
            with self._events_lock:
                if not self._events or (self._events[0][0] == "assigned" and time.monotonic() < self._claim_at):
                    return
                kind, partitions = self._events.popleft()
            if kind == "lost":
                self._drop(Fenced("lost", f"partitions {sorted(tp.partition for tp in partitions)} lost"), rejoin=False)
            elif kind == "revoked":
                self._revoked(partitions)
            else:
                try:
                    self._assigned(partitions)
                except OSError as exc:  # the checkpoint directory: claim and resume again after a backoff
                    self._release()
                    self._dir_failed(exc)
                    self._claim_at = self._retry_at
                    with self._events_lock:
                        self._events.appendleft((kind, partitions))
                    return
                self.hooks.on_assigned([tp.partition for tp in partitions])

    def _fence_reason(self) -> str | None:
        """Why this instance must not write now (None: it is the owner). No I/O: checked often."""
        if self._epoch is None:
            return "not_owner"
        if self._lost.is_set():
            return "lost"
        if self._refused.is_set():
            return "lease"
        if self.consumer is not None and session_expired(self.consumer):
            return "session"
        return None

    def _journal(self, batch: Batch, version: int) -> bool:
        """Journal a new batch's end under the lease: the point after which its outputs may leave.

        False when the batch must not be published: fenced (dropped), or the directory
        failed (the batch is held and retried after a backoff).
        """
        reason = self._fence_reason()
        try:
            if reason is not None:
                raise Fenced(reason)
            with self.lease.guard(self._epoch):
                if batch.journaled is None:  # a replayed batch's line is in the journal already
                    self.journal.append(batch.end, labelled_by=version, epoch=self._epoch)
        except Fenced as exc:
            self._drop(exc)
            return False
        except OSError as exc:
            self._hold(batch)
            self._dir_failed(exc)
            return False
        self._dir_ok()
        return True

    def _process_ready(self) -> None:
        """Process the batches that are ready (a held one first), then publish a finished update's drift record."""
        if not self._owns:  # records polled before a revocation or a fence took effect
            self.batcher.clear()
            return
        if time.monotonic() < self._retry_at:
            return
        while (batch := self._held or self.batcher.cut(self.offsets)) is not None:
            self._held = None
            if self._process(batch) is False:
                return
        if self._unsettled is not None or self.learner.done():
            self._settle()  # publish the drift record now rather than with the next batch

    def _hold(self, batch: Batch) -> None:
        if self._epoch is not None:  # a fenced owner drops its batches instead
            self._held = batch

    def _dir_failed(self, exc: OSError) -> None:
        """The checkpoint directory refused a journal or lease write: count, log, back off."""
        self.metrics.ckpt_failures.inc()  # a write to the checkpoint directory, alerted like a checkpoint's
        self._backoff_s = min(5.0, max(0.1, 2 * self._backoff_s))
        self._retry_at = time.monotonic() + self._backoff_s
        log.error("checkpoint directory %s unusable (%s); nothing is published until the journal can be written, "
                  "retrying in %.1fs", self.ckpt_dir, exc, self._backoff_s)

    def _dir_ok(self) -> None:
        if self._backoff_s:
            log.warning("checkpoint directory %s usable again; resuming", self.ckpt_dir)
            self._backoff_s = 0.0

    def _commit(self, *, wait: bool = False) -> None:
        if self._fence_reason() is None:
            self.outputs.commit(self.offsets, wait=wait)

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        """A rebalance this instance takes part in: hand over, if it still holds the newest epoch.

        The records not yet cut are left to the next owner (perhaps this instance again),
        which resumes from the newest checkpoint and the journal. The last update's drift
        record, a checkpoint and a commit are written only under the lease.
        """
        if partitions and self._owns:
            reason = self._fence_reason()
            if reason is None:
                self.checkpoint()
                self._commit()
            elif reason != "not_owner":
                self._drop(Fenced(reason), rejoin=False)
                return
        self._release()

    def _release(self) -> None:
        """No longer the owner: forget what waits to be processed, and an update whose drift record was not published."""
        if self._unsettled is not None or self.learner.busy():
            self._dropped = True  # the model learnt something no journal line describes
        self._unsettled = None
        try:
            self.learner.settle()
        except Exception:  # noqa: BLE001 (an update that failed belongs to the abandoned model)
            log.exception("update of the abandoned model failed")
        self._owns = False
        self._epoch = None
        self._held = None
        if self.consumer is not None:  # fetch nothing more until the group assigns the partitions again
            self.consumer.pause(*self.consumer.assignment())
        self.metrics.assigned.set(0)
        self.metrics.owner_epoch.set(0)
        self.batcher.clear()

    def _drop(self, exc: Fenced, *, rejoin: bool = True) -> None:
        """Fenced while owning the stream: publish, journal, checkpoint and commit nothing more; stand by.

        The model in memory is abandoned (the next assignment loads the newest
        checkpoint). ``rejoin``: ask the group for a fresh assignment (when the client
        itself has not noticed yet).
        """
        if self._epoch is None and not self._owns:
            return
        log.error("FENCED (%s): %s. Stopping all writes (outputs, journal, checkpoints, commits) and standing by; "
                  "the newest owner continues from the shared checkpoint directory", exc.reason, exc)
        self.metrics.fenced.labels(exc.reason).inc()
        self._release()  # the last update's drift record is not published: the next owner replays its batch
        self._dropped = True
        if rejoin and self.consumer is not None:
            request_rejoin(self.consumer)

    def _checkpoint_fenced(self, exc: Fenced) -> None:
        """The checkpoint thread found a newer epoch (runs there): the loop drops at its next check."""
        if exc.reason == "lease":
            self._refused.set()

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        self.metrics.assigned.set(len(partitions))
        self._check_log_starts = bool(partitions)  # a blocking call: done on the loop's thread
        self._owns = bool(partitions)
        self._last_activity = time.monotonic()
        self._lost.clear()
        self._refused.clear()
        self.batcher.clear()  # polled before the seek below: maybe from the group's committed offsets
        self._held = None
        if not partitions:
            log.info("standby: another instance of group %s owns the input partitions", self.settings.kafka.group_id)
            return
        if self._epoch is not None:  # reassigned without a revocation event: hand over to itself
            self.checkpoint()
        generation, member = group_generation(self.consumer)
        self._epoch = self.lease.claim(generation, member)
        self.metrics.owner_epoch.set(self._epoch)
        log.info("owner epoch %d (group generation %d)", self._epoch, generation)
        self._resume_newest()
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

    def _resume_newest(self) -> None:
        """Another instance may have moved on since this one loaded: resume from the newest state."""
        from stream_dec import CheckpointError

        self.checkpointer.wait()
        try:
            newest = read_newest(self.settings)
        except CheckpointError:
            return
        # The model in memory is kept only if it is exactly the newest checkpoint: the one
        # this instance wrote or loaded last, with nothing learnt since. Any other state
        # (ahead of the checkpoint, or of another lineage) may differ from what the
        # stream's outputs say: the journal replays from the checkpoint instead.
        same = not self._dropped and newest.version_ == self.model.version_ and checkpoint_owner(newest) == self.checkpointer.written_by
        if not same:
            self.model = newest
            self.offsets = checkpoint_offsets(newest, self.settings.kafka.input_topic)
            self.checkpointer.reset(newest.version_, written_by=checkpoint_owner(newest))
            self.metrics.record_model(newest)
            log.info("resuming from %s (model version %d)", newest.checkpoint_path_, newest.version_)
        self._dropped = False



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

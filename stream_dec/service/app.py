"""The Kafka service: poll, decode, micro-batch, label, learn, publish, checkpoint, commit.

Delivery is at-least-once: a batch's offsets are committed only after its outputs
(assignments, drift record, dead letters) are acknowledged by the broker. The model
state and the consumed offsets travel together in each checkpoint; on start and on
every partition assignment the service seeks to the checkpoint's offsets, so the model
never sees a record twice or misses one. Batch boundaries are journaled next to the
checkpoints, so records re-read after a crash are cut into the same batches and the
(deterministic) model gives the same labels: duplicates are exact copies.

Learning overlaps I/O: a batch's update runs on a worker thread while the loop waits
for the broker's acknowledgements and reads the next batch; the next ``predict`` waits
for it, so every batch is labelled by the model that learnt from all batches before it,
exactly as offline (the labels do not depend on timing).

One model per consumer group: the group uses an assignor that gives every input
partition to one member; other members are hot standbys that take over (reloading the
newest checkpoint) when the owner leaves.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.abstract import (
    AbstractPartitionAssignor,
    ConsumerProtocolAssignment,
    ConsumerProtocolSubscription,
)
from kafka.structs import OffsetAndMetadata

from stream_dec.io.codecs import decode_batch, dlq_headers_for, encode_assignments, encode_drift
from stream_dec.io.partitioner import default_partitions
from stream_dec.service.metrics import MetricsServer, ServiceMetrics
from stream_dec.settings import Settings

log = logging.getLogger("stream_dec.service")

JOURNAL = "batches.jsonl"


class NoCheckpointError(RuntimeError):
    """The checkpoint directory holds no usable checkpoint (run ``stream-dec train`` first)."""


class AllToOneAssignor(AbstractPartitionAssignor):
    """Every partition to one member (the lowest member id); the others stand by.

    A second instance in the group must not grow a second model that hands out
    conflicting ids for the same stream; with this assignor it idles until the owner
    leaves, then takes over from the newest checkpoint.
    """

    name = "stream-dec-all-to-one"
    version = 0

    @classmethod
    def assign(cls, cluster, members):
        """Map every subscribed partition to the first member by member id."""
        owner = min(m.member_id for m in members)
        topics = sorted({t for m in members for t in m.metadata.topics})
        owned = [(t, sorted(cluster.partitions_for_topic(t) or [])) for t in topics]
        return {
            m.member_id: ConsumerProtocolAssignment(cls.version, owned if m.member_id == owner else [], b"")
            for m in members
        }

    @classmethod
    def metadata(cls, topics):
        """Subscription metadata: just the topics."""
        return ConsumerProtocolSubscription(cls.version, list(topics), b"")

    @classmethod
    def on_assignment(cls, assignment, generation):
        """Nothing to remember between generations."""


@dataclass
class _Pending:
    """Records polled but not yet processed, in arrival order."""

    records: list = field(default_factory=list)
    since: float = 0.0


class StreamService:
    """One running instance of ``stream-dec run``."""

    def __init__(self, settings: Settings, model: Any | None = None):
        self.settings = settings
        import torch

        # Not torch's own default: that counts the host's cores, also inside a container
        # limited to a few (OpenMP threads then spin against each other).
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(settings.model.threads or usable)
        self.ckpt_dir = Path(settings.checkpoint.dir)
        self.metrics = ServiceMetrics()
        self.model = model if model is not None else self._load_newest()
        self.offsets: dict[int, int] = self._checkpoint_offsets(self.model)
        self.replay: collections.deque[dict[int, int]] = collections.deque()
        self._stop = threading.Event()
        self._batches_since_ckpt = 0
        self._pending = _Pending()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.server: MetricsServer | None = None
        self.processed_batches = 0
        self._last_activity = 0.0
        self._committed: dict[int, int] = {}
        self._in_callback = False
        self._owns = False
        self._ckpt_version = int(self.model.version_)
        # One learner thread: updates stay strictly ordered, and torch ops release the GIL.
        self._learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-dec-learn")
        # Checkpoint files are written (fsync included) off the loop; one at a time, in order.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-dec-checkpoint")
        self._writing: Future | None = None
        self._journal_lock = threading.Lock()
        # kafka-python 3 runs rebalance callbacks on its IO thread, at any time: batch
        # processing there (flush on revoke) and on the loop's thread must not interleave.
        self._lock = threading.RLock()
        self._update: tuple[Future, dict[int, tuple[int, int]]] | None = None  # running update, its batch's offsets
        self._unacked: list = []  # futures of outputs sent and not yet acknowledged
        self._from_journal = False  # the batch being processed was cut at a journaled boundary
        self._read_commits = False  # exactly-once: look up the group's commits after an assignment
        self._published: dict[int, int] = {}  # exactly-once: offsets whose outputs are committed already
        self._update_model_gauges()

    # ------------------------------------------------------------ model and checkpoints
    def _load_newest(self):
        from stream_dec import CheckpointError

        try:
            model = self._read_newest()
        except CheckpointError as exc:
            raise NoCheckpointError(
                f"no usable checkpoint in {self.ckpt_dir} ({exc}); create one with "
                f"`stream-dec train --data FILE --n-clusters K --checkpoint-dir {self.ckpt_dir}`"
            ) from None
        log.info("loaded %s (model version %d, %d clusters)", model.checkpoint_path_, model.version_, model.n_clusters_)
        return model

    def _read_newest(self):
        """The newest valid checkpoint, with this service's update budgets applied."""
        from stream_dec import StreamDEC

        model = StreamDEC.load(self.ckpt_dir, device=self.settings.model.device)
        model.set_params(online_steps=self.settings.update.max_steps, max_update_ms=self.settings.update.max_ms, verbose=False)
        return model

    def _checkpoint_offsets(self, model) -> dict[int, int]:
        extra = getattr(model, "checkpoint_extra_", {}) or {}
        by_topic = extra.get("offsets", {})
        return {int(p): int(o) for p, o in by_topic.get(self.settings.kafka.input_topic, {}).items()}

    def _load_journal(self) -> None:
        """Batch boundaries written after the loaded checkpoint, to replay them exactly."""
        self.replay.clear()
        path = self.ckpt_dir / JOURNAL
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash mid-write
            # Only entries written after exactly this checkpoint describe what follows it
            # (after a fall-back past a corrupt checkpoint they do not).
            if entry.get("base") == self.model.version_:
                self.replay.append({int(p): int(o) for p, o in entry["end"].items()})

    def _journal(self, end: dict[int, int], labelled_by: int) -> None:
        """Append a batch's boundary before any of its outputs leave.

        A process crash (kill -9, OOM) keeps what was written. Under exactly-once it is
        also fsynced, since a restart relearns committed batches at exactly these
        boundaries; under at-least-once a machine crash could lose the newest lines,
        and the replay would then cut by size: nothing lost, duplicates may differ.
        """
        with self._journal_lock, open(self.ckpt_dir / JOURNAL, "a", encoding="utf-8") as fh:
            # labelled_by: the model version that labels the batch.
            entry = {"base": self._ckpt_version, "labelled_by": labelled_by, "end": {str(p): o for p, o in end.items()}}
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            if self.exactly_once:
                os.fsync(fh.fileno())

    def checkpoint(self, *, wait: bool = True) -> None:
        """Checkpoint the model with the next offset of every input partition.

        The state is serialised here, between updates; the file is written on the
        checkpoint thread unless ``wait`` (shutdown, revocation), which returns only once
        it is durable.
        """
        # The checkpoint holds the model after the last batch's update; that update's drift
        # record must be acknowledged first, or a crash now would lose it for good.
        self._settle()
        self._await_outputs()
        self._await_checkpoint()
        t0 = time.perf_counter()
        extra = {"offsets": {self.settings.kafka.input_topic: {str(p): o for p, o in self.offsets.items()}}}
        version = int(self.model.version_)
        data = self.model.snapshot(extra=extra)
        # Journal lines from here on follow this checkpoint.
        self._ckpt_version = version
        self._batches_since_ckpt = 0
        self._writing = self._writer.submit(self._write_checkpoint, data, version, t0)
        if wait:
            self._await_checkpoint()

    def _write_checkpoint(self, data: bytes, version: int, t0: float) -> None:
        from stream_dec import checkpoint as ckpt

        try:
            ckpt.save_to_directory(self.ckpt_dir, data, seq=version, keep=self.settings.checkpoint.keep)
        except OSError:
            # The previous checkpoint and its journal lines stay: a restart replays from there.
            self.metrics.ckpt_failures.inc()
            log.exception("checkpoint failed")
            return
        # Lines of batches inside this checkpoint go; lines written since it was taken stay.
        with self._journal_lock:
            path = self.ckpt_dir / JOURNAL
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
            keep = [line for line in lines if _journal_base(line) == version]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, path)
        self.metrics.checkpoint_written(time.perf_counter() - t0)

    def _await_checkpoint(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None

    # ------------------------------------------------------------ Kafka plumbing
    def _connect(self) -> None:
        k = self.settings.kafka
        self.consumer = KafkaConsumer(
            bootstrap_servers=k.bootstrap_list,
            group_id=k.group_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=self.settings.batch.max_size,
            # The client's 500 ms default would sit on top of the micro-batch wait.
            fetch_max_wait_ms=max(10, min(100, self.settings.batch.max_wait_ms // 2)),
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=max(k.max_record_bytes * 2, 8 * 1024 * 1024),
            partition_assignment_strategy=[AllToOneAssignor],
        )
        extra = {}
        if self.exactly_once:
            # Stable per group and input topic: a restarted instance fences its zombie.
            extra["transactional_id"] = self.transactional_id
        self.producer = KafkaProducer(
            bootstrap_servers=k.bootstrap_list,
            client_id=k.client_id,
            acks="all",
            linger_ms=5,
            batch_size=1024 * 1024,
            max_request_size=max(k.max_record_bytes * 2, 4 * 1024 * 1024),
            **extra,
        )
        if self.exactly_once:
            self.producer.init_transactions()
        self.consumer.subscribe([k.input_topic], listener=_Rebalance(self))

    @property
    def exactly_once(self) -> bool:
        """Whether outputs and offsets are committed in one Kafka transaction per batch."""
        return self.settings.kafka.processing_guarantee == "exactly_once"

    @property
    def transactional_id(self) -> str:
        """The producer's transactional id (one per consumer group and input topic)."""
        return f"stream-dec-{self.settings.kafka.group_id}-{self.settings.kafka.input_topic}"

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._assigned(partitions)

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        self.metrics.assigned.set(len(partitions))
        self._owns = bool(partitions)
        self._last_activity = time.monotonic()
        if not partitions:
            log.info("standby: another instance of group %s owns the input partitions", self.settings.kafka.group_id)
            return
        # Another instance may have moved on since this one loaded: resume from the newest state.
        from stream_dec import CheckpointError

        self._settle()
        self._await_checkpoint()
        try:
            newest = self._read_newest()
            if newest.version_ > self.model.version_:
                self.model = newest
                self.offsets = self._checkpoint_offsets(newest)
                self._ckpt_version = int(newest.version_)
        except CheckpointError:
            pass
        self._load_journal()
        # The checkpoint is the truth: a partition it has no offset for is one the model
        # has not learnt from yet, whatever the group committed since (those commits may
        # be ahead of the checkpoint; the journal replays the batches in between).
        fresh = [tp for tp in partitions if tp.partition not in self.offsets]
        for tp in partitions:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
        if fresh:
            self.consumer.seek_to_beginning(*fresh)
        # Under exactly-once, batches after the checkpoint may have been published and
        # committed already; they are replayed to rebuild the model, but not published
        # again. (Their commits are read on the loop's thread: this callback may run on
        # the client's IO thread, where a blocking call would deadlock.)
        self._read_commits = self.exactly_once
        log.info("assigned %s; resuming at %s", [tp.partition for tp in partitions], self.offsets or "the beginning")

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        # Runs on the client's IO thread (kafka-python 3): no blocking consumer calls here,
        # so the commit is asynchronous. On our own shutdown everything is already done.
        with self._lock:
            if partitions and (self._pending.records or self.offsets != self._committed):
                self._in_callback = True
                try:
                    self._flush_pending()
                    self.checkpoint()
                    self._commit()
                finally:
                    self._in_callback = False
            self.metrics.assigned.set(0)
            self._owns = False

    def _commit(self, *, wait: bool = False) -> None:
        """Commit the consumed offsets: asynchronously per batch, synchronously (``wait``) at shutdown.

        Resuming relies on the checkpoint's offsets, not on the group's, so a lost
        asynchronous commit only delays what lag monitors see; waiting for each one
        would block the loop for a broker round trip per batch.
        """
        # Under exactly-once the offsets were committed inside each batch's transaction.
        if not self.offsets or self.consumer is None or self.exactly_once:
            return
        topic = self.settings.kafka.input_topic
        assigned = {tp.partition for tp in self.consumer.assignment()}
        offsets = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in self.offsets.items() if p in assigned}
        if not offsets:
            return
        if wait and not self._in_callback:  # no blocking calls on the client's IO thread
            self.consumer.commit(offsets)
        else:
            self.consumer.commit_async(offsets, callback=_log_commit_failure)
        self._committed = dict(self.offsets)

    # ------------------------------------------------------------ the loop
    def stop(self, *_args) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and exit."""
        self._stop.set()

    def run(self, *, max_idle_s: float | None = None, install_signals: bool = True) -> int:
        """Run until :meth:`stop` (SIGTERM/SIGINT) or ``max_idle_s`` without records; returns 0."""
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        m = self.settings.metrics
        if m.port:
            self.server = MetricsServer(self.metrics, m.host, m.port, stale_after_s=max(30.0, 3 * self.settings.batch.max_wait_ms / 1000)).start()
            log.info("metrics on http://%s:%d/metrics", m.host, self.server.port)
        self._connect()
        try:
            while not self._stop.is_set():
                self.metrics.loop_alive()
                if self._poll():
                    self._last_activity = time.monotonic()
                self._maybe_process()
                if self._update is not None and self._update[0].done():
                    with self._lock:
                        self._settle()  # publish the drift record now rather than with the next batch
                idle = time.monotonic() - self._last_activity
                # The idle clock starts at the first partition assignment: a group join
                # alone takes about half the session timeout.
                if max_idle_s is not None and self._last_activity and not self._pending.records and idle > max_idle_s:
                    log.info("no records for %.1fs: stopping", max_idle_s)
                    break
            with self._lock:
                self._flush_pending()
                if self._owns:  # a standby must not write its stale model over the owner's
                    self.checkpoint()
                    self._commit(wait=True)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        """Close clients, the learner thread and the metrics server (idempotent)."""
        self._learner.shutdown(wait=True)
        self._writer.shutdown(wait=True)
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

    def _poll(self) -> int:
        wait_ms = self.settings.batch.max_wait_ms
        if self._pending.records:
            wait_ms = max(0, int(wait_ms - (time.monotonic() - self._pending.since) * 1000))
        room = self.settings.batch.max_size - len(self._pending.records)
        polled = self.consumer.poll(timeout_ms=min(wait_ms, 200) if wait_ms else 0, max_records=max(1, room))
        if self._read_commits:
            self._read_commits = False
            self._published = {}
            for tp in self.consumer.assignment():
                committed = self.consumer.committed(tp)
                if committed is not None and committed > self.offsets.get(tp.partition, 0):
                    self._published[tp.partition] = committed
            if self._published:
                log.info("exactly-once: outputs up to offsets %s are committed already; replaying them without publishing", self._published)
        n = 0
        with self._lock:  # not around poll(): a rebalance callback inside it takes the lock
            for records in polled.values():
                if not self._pending.records and records:
                    self._pending.since = time.monotonic()
                self._pending.records.extend(records)
                n += len(records)
        if n:
            self._update_lag()
        return n

    def _maybe_process(self) -> None:
        with self._lock:
            while self._pending.records:
                batch = self._cut()
                if batch is None:
                    return
                self._process(batch)

    def _cut(self) -> list | None:
        """The next batch to process, or None while it is still filling.

        When replaying after a crash, batches end exactly where the journal says.
        """
        recs = self._pending.records
        # Entries the model is already past (written again by an earlier replay) cut nothing.
        while self.replay and all(self.offsets.get(p, 0) >= o for p, o in self.replay[0].items()):
            self.replay.popleft()
        self._from_journal = bool(self.replay)
        if self.replay:
            end = self.replay[0]
            batch, rest = [], []
            for r in recs:
                (batch if r.offset < end.get(r.partition, 0) else rest).append(r)
            seen: dict[int, int] = {}
            for r in recs:
                seen[r.partition] = max(seen.get(r.partition, -1), r.offset)
            reached = all(seen.get(p, -1) >= o - 1 or self.offsets.get(p, 0) >= o for p, o in end.items())
            if not reached and len(recs) < 4 * self.settings.batch.max_size:
                return None
            if not reached:  # the journal does not fit what is read back: cut by size instead
                log.warning("batch journal does not match the input; cutting batches by size")
                self.replay.clear()
                self._published = {}
                return self._cut()
            self.replay.popleft()
            self._pending.records = rest
            self._pending.since = time.monotonic()
            return batch
        full = len(recs) >= self.settings.batch.max_size
        waited = (time.monotonic() - self._pending.since) * 1000 >= self.settings.batch.max_wait_ms
        if not (full or waited):
            return None
        batch, self._pending.records = recs[: self.settings.batch.max_size], recs[self.settings.batch.max_size :]
        self._pending.since = time.monotonic()
        return batch

    def _flush_pending(self) -> None:
        while self._pending.records:
            batch = self._cut()
            if batch is None:  # a journaled batch whose records never came back: cut by size
                self.replay.clear()
                self._published = {}
                continue
            self._process(batch)

    def _settle(self) -> None:
        """Wait for the running update, if any, and publish its batch's drift record."""
        if self._update is None:
            return
        future, ranges = self._update
        self._update = None
        report = future.result()  # an update that raised ends the run here
        self.metrics.update_seconds.observe(report.update_ms / 1000.0)
        drift = encode_drift(report, topic=self.settings.kafka.input_topic, offset_ranges=ranges)
        self._unacked.append(self.producer.send(self.settings.kafka.output_topic, key=b"__drift__", value=drift))
        self._record_report(report)

    def _await_outputs(self) -> None:
        """Block until every output sent so far is acknowledged (raises if one was not)."""
        if not self._unacked:
            return
        if not self.exactly_once:
            self.producer.flush()
        for f in self._unacked:
            f.get(timeout=30)  # raises if the broker did not take an output: nothing is committed then
        self._unacked.clear()

    def _process(self, batch: list) -> None:
        """Label, start learning, publish, then record offsets; commit after the outputs are acknowledged."""
        k = self.settings.kafka
        decoded = decode_batch([(r.key, r.value, r.headers) for r in batch], dim=self.model.n_features_in_, max_bytes=k.max_record_bytes)
        if self._published and all(r.offset < self._published.get(r.partition, 0) for r in batch):
            self._relearn(batch, decoded)
            return
        self._published = {}
        end: dict[int, int] = {}
        for r in batch:
            end[r.partition] = max(end.get(r.partition, 0), r.offset + 1)
        if self.exactly_once:
            self.producer.begin_transaction()
        # The previous batch's update: predict needs the model it leaves (under at-least-once
        # its drift record joins this batch's acknowledgements).
        self._settle()
        model = self.model
        version = int(model.version_)  # the model that labels this batch
        if not self._from_journal:  # a replayed batch's entry is in the journal already
            self._journal(end, version)
        send = self.producer.send
        sent = self._unacked
        for pos, err in decoded.failures:
            r = batch[pos]
            headers = dlq_headers_for(err, r.headers, r.topic, r.partition, r.offset)
            sent.append(send(k.dlq_topic, key=r.key, value=r.value, headers=headers))
            self.metrics.dlq.labels(err.reason).inc()
        if decoded.failures:
            self.metrics.records.labels("dead_lettered").inc(len(decoded.failures))
        valid = [batch[i] for i in decoded.valid]
        if valid:
            ranges: dict[int, tuple[int, int]] = {}
            for r in valid:
                lo, hi = ranges.get(r.partition, (r.offset, r.offset))
                ranges[r.partition] = (min(lo, r.offset), max(hi, r.offset))
            t0 = time.perf_counter()
            labels, conf = model.predict_with_confidence(decoded.X)
            self.metrics.predict_seconds.observe(time.perf_counter() - t0)
            keys = [item_id.encode() for item_id in decoded.ids]
            # Kafka's own key partitioning, computed for the whole batch (see io/partitioner.py).
            parts = default_partitions(keys, self.producer.partitions_for(k.output_topic)).tolist()
            values = encode_assignments(
                decoded.ids, labels.tolist(), conf, version, valid[0].topic, [r.partition for r in valid], [r.offset for r in valid]
            )
            out = k.output_topic
            sent.extend(send(out, key=key, value=value, partition=part) for key, value, part in zip(keys, values, parts))
            self._update = (self._learner.submit(model.partial_fit, decoded.X), ranges)
        if self.exactly_once:
            # Outputs, drift record and the batch's offsets become visible together, or not
            # at all; a failure (e.g. this producer was fenced by a newer instance) ends the
            # run, and the restart resumes from the checkpoint.
            self._settle()
            offsets = {TopicPartition(k.input_topic, p): OffsetAndMetadata(o, "", -1) for p, o in end.items()}
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
        self._await_outputs()
        if valid:
            ts = np.fromiter((r.timestamp or 0 for r in valid), dtype=np.float64, count=len(valid))
            ts = ts[ts > 0]
            self.metrics.e2e_seconds.observe_many(np.maximum(0.0, time.time() - ts / 1000.0))
        self.metrics.input_bytes.inc(sum(len(r.value) for r in batch if r.value))
        self.metrics.records.labels("labelled").inc(len(valid))
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(batch))
        self.offsets.update(end)
        self.processed_batches += 1
        self._batches_since_ckpt += 1
        if self._batches_since_ckpt >= self.settings.checkpoint.interval_batches:
            self.checkpoint(wait=False)
        if self.exactly_once:
            self._committed = dict(self.offsets)
        else:
            self._commit()

    def _relearn(self, batch: list, decoded) -> None:
        """Exactly-once replay of a batch whose outputs were committed before a crash: learn only."""
        self._settle()
        if decoded.valid:
            self._record_report(self.model.partial_fit(decoded.X))
        for r in batch:
            self.offsets[r.partition] = max(self.offsets.get(r.partition, 0), r.offset + 1)
        self.metrics.records.labels("replayed").inc(len(batch))
        self._batches_since_ckpt += 1
        if self._batches_since_ckpt >= self.settings.checkpoint.interval_batches:
            self.checkpoint(wait=False)
        self._committed = dict(self.offsets)

    def _record_report(self, report) -> None:
        m = self.metrics
        m.churn.set(report.churn)
        m.centre_shift.set(report.centre_shift)
        m.novelty.set(report.novelty_rate)
        m.new_clusters.inc(len(report.new_cluster_ids))
        if report.guard_action != "none":
            m.guard.labels(report.guard_action).inc()
        self._update_model_gauges()

    def _update_model_gauges(self) -> None:
        self.metrics.clusters.set(self.model.n_clusters_)
        self.metrics.max_clusters.set(self.model.max_clusters_)
        self.metrics.model_version.set(self.model.version_)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            # highwater() is right on tansu, where end_offsets() is not (KAFKA_NOTES.md).
            hw = self.consumer.highwater(tp)
            if hw is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, hw - self.consumer.position(tp)))


def _journal_base(line: str) -> int | None:
    try:
        return json.loads(line).get("base")
    except ValueError:  # a torn line from a crash mid-write
        return None


def _log_commit_failure(offsets, response) -> None:
    if isinstance(response, Exception):
        log.warning("offset commit failed (the next one supersedes it): %s", response)


class _Rebalance(ConsumerRebalanceListener):
    """Flush, checkpoint and commit before partitions go; seek to the checkpoint when they come."""

    def __init__(self, service: StreamService):
        self.service = service

    def on_partitions_revoked(self, revoked):
        self.service._on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned):
        self.service._on_assigned(list(assigned))

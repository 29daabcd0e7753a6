"""The predictor role: label the input with the learner's newest model, feed the learner latents.

Any number of predictors share the input partitions through an ordinary consumer group
(range assignment). Per micro-batch::

    consumer.poll, Batcher.cut        batcher.py        by count, bytes or wait
     └> decode_batch                                    unusable records become dead letters
         ├> outputs.open_batch        outputs.py        exactly-once: the batch's transaction begins
         ├> DeadLetters.send          deadletters.py
         ├> snapshot.label                              ids, confidence and roots by one model version
         ├> outputs.send_many                           assignments (model_version, cluster, root)
         ├> outputs.send (feed topic)                   latents of a deterministic sample (io/feed.py)
         ├> outputs.close_batch, await_acks             exactly-once: offsets join, the transaction commits
         └> outputs.batch_done                          at-least-once: asynchronous offset commit
    ModelFollower.poll                io/modeltopic.py  between batches: swap in a newer version

Invariants:

* A predictor labels nothing until it has a model: at start it waits for a snapshot on
  the model topic, and after every partition assignment it reads the topic to its end
  and takes the newest version before labelling again.
* Versions only go up, and only between batches: one batch is labelled by one version,
  the one its assignments carry.
* Any record yields an assignment or a dead letter; offsets are committed only after the
  batch's outputs are acknowledged (at-least-once: a killed predictor's partitions are
  relabelled from the last commit by their next owner, so nothing goes unlabelled).
* The learner gets latents, never raw records; which items go is decided by the item
  id (io/feed.py ``sample_mask``), so every predictor picks the same ones at a rate.
* No checkpoint and no disk: a predictor's whole state is its snapshot and its group's
  committed offsets.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import OffsetOutOfRangeError

from stream_dec.io.codecs import decode_batch, encode_assignments
from stream_dec.io.feed import encode_latents, sample_mask
from stream_dec.io.modeltopic import ModelFollower, Published
from stream_dec.io.partitioner import default_partitions
from stream_dec.online.snapshot import PredictSnapshot, SnapshotError
from stream_dec.service.app import stop_on_signals, use_torch_threads
from stream_dec.service.batcher import Batch, Batcher
from stream_dec.service.clients import (
    broker_connected,
    consumer_config,
    highwater_lag,
    transactional_id,
)
from stream_dec.service.deadletters import DeadLetters
from stream_dec.service.fencing import instance_id
from stream_dec.service.hooks import BatchInfo, ServiceHooks
from stream_dec.service.metrics import ServiceMetrics, serve_metrics
from stream_dec.service.outage import Outage, OutageError
from stream_dec.service.outputs import (
    AtLeastOnceOutputs,
    ExactlyOnceOutputs,
    close_outputs,
    open_outputs,
)
from stream_dec.service.positions import InputPositions
from stream_dec.service.progress import Progress
from stream_dec.settings import Settings

log = logging.getLogger("stream_dec.service")

#: Longest single poll: the loop checks for stop and idleness at least this often.
MAX_POLL_MS = 200
#: While no batch is ready, the model topic is looked at this often (its metrics stay current).
FOLLOW_IDLE_S = 1.0
#: Header naming the sample rate the learner advises (io/modeltopic.py passes ``x-`` headers as meta).
RATE_META = "sample-rate"


def _exactly_once_outputs(instance: str) -> type[ExactlyOnceOutputs]:
    """Exactly-once outputs with this predictor's own transactional id, so predictors do not fence each other.

    A zombie predictor is fenced by the group generation that
    ``send_offsets_to_transaction`` carries, not by a shared id. The id is kept when an
    outage replaces the producer.
    """

    class PredictorExactlyOnce(ExactlyOnceOutputs):
        @classmethod
        def producer_overrides(cls, settings) -> dict:
            return {"transactional_id": f"{transactional_id(settings)}-predictor-{instance}"}

    return PredictorExactlyOnce


class PredictorService:
    """One running ``stream-dec run --role predictor``.

    ``hooks``: callables told about polls, batches and assignments (service/hooks.py).
    """

    def __init__(self, settings: Settings, hooks: ServiceHooks | None = None):
        self.settings = settings
        # One torch thread unless set: a predictor's labelling is small matrix work, and
        # the Kafka clients need the other cores (more threads measured slower, bench/run_scale.py).
        use_torch_threads(settings.model.threads or 1)
        self.metrics = ServiceMetrics()
        self.metrics.set_role("predictor")
        self.progress = Progress(settings.progress.every_batches, settings.progress.every_s)
        self.hooks = self.progress.observe(hooks or ServiceHooks())
        self.dead_letters = DeadLetters(settings, self.metrics)
        self.batcher = Batcher(settings.batch.max_size, settings.batch.max_wait_ms, max_bytes=settings.batch.max_bytes)
        self.snapshot: PredictSnapshot | None = None
        self.published_at: float | None = None
        self.advised_rate = 1.0
        self.offsets: dict[int, int] = {}
        self.processed_batches = 0
        self.consumer = self.outputs = self.follower = self.server = None
        eos = settings.kafka.processing_guarantee == "exactly_once"
        self._outputs_class = _exactly_once_outputs(instance_id()) if eos else AtLeastOnceOutputs
        self._stop = threading.Event()
        self._lock = threading.RLock()  # batch processing vs the rebalance callbacks (client IO thread)
        self._refresh = threading.Event()  # an assignment happened: read the model topic to its end first
        self._last_activity = 0.0
        self._rejected = 0  # snapshots the follower rejected so far (counted into the metrics)
        self._looked = 0.0  # monotonic time the model topic was last looked at
        self.outage = Outage(settings, self.metrics, self._stop)
        self.positions = InputPositions(settings, self.metrics, self.outage)

    # ------------------------------------------------------------ the loop
    def run(self, *, max_idle_s: float | None = None, install_signals: bool = True) -> int:
        """Run until :meth:`stop` (SIGTERM/SIGINT) or ``max_idle_s`` without records; returns 0."""
        try:
            self._start(install_signals)
            if not self._wait_for_model():
                return 0
            self.consumer.subscribe([self.settings.kafka.input_topic], listener=_Listener(self))
            while not self._stop.is_set():
                self.metrics.loop_alive()
                if self._poll():
                    self._last_activity = time.monotonic()
                with self._lock:
                    if self._refresh.is_set():
                        self._refresh.clear()
                        self._follow(newest=True)
                    # New versions are taken between batches: look when one is ready (or
                    # now and then while idle), not at every poll.
                    batch = self.batcher.cut(self.offsets)
                    if batch is not None or time.monotonic() - self._looked >= FOLLOW_IDLE_S:
                        self._follow()
                    while batch is not None:
                        self._process(batch)
                        batch = self.batcher.cut(self.offsets)
                if self.progress.due():
                    log.info("%s", self.progress.line(_sum(highwater_lag(self.consumer))))
                if self._idle(max_idle_s):
                    log.info("no records for %.1fs: stopping", max_idle_s)
                    break
            with self._lock:
                while (batch := self.batcher.cut(self.offsets, now=True)) is not None:
                    self._process(batch)
                self._commit(wait=True)
        except OutageError:
            if not self._stop.is_set():
                raise
            log.info("stopped while waiting for the broker: nothing read is committed")
        finally:
            self.close()
        return 0

    def stop(self, *_args) -> None:
        """Ask the loop to finish its batch, commit and exit."""
        self._stop.set()

    def close(self) -> None:
        """Close the clients and the metrics server (idempotent)."""
        self.dead_letters.close()
        if self.follower is not None:
            self.follower.close()
            self.follower = None
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        close_outputs(self.outputs, self.outage)
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _start(self, install_signals: bool) -> None:
        if install_signals:
            stop_on_signals(self.stop)
        k = self.settings.kafka
        self.server = serve_metrics(self.settings, self.metrics)
        cfg = consumer_config(self.settings)
        # An ordinary group: partitions are shared among the predictors. A partition the
        # group never committed is labelled from its beginning.
        cfg.update(partition_assignment_strategy=_range_assignors(), auto_offset_reset="earliest")
        self.consumer = self.outage.retry(f"broker (input topic {k.input_topic!r})", lambda: KafkaConsumer(**cfg))
        self.outputs = open_outputs(self.settings, self._outputs_class, self.consumer, self.outage)
        self.dead_letters.start(self.outage, broker_up=lambda: broker_connected(self.consumer))
        self.follower = ModelFollower(k.bootstrap_servers, k.model_topic, client_id=f"{k.client_id}-model")

    def _wait_for_model(self) -> bool:
        """Block until a snapshot is loaded (False: stopped first). Nothing is read before."""
        self.metrics.waiting_for_model(True)
        waited, wait_s = 0.0, self.settings.scale.model_wait_s
        while not self._stop.is_set():
            self.metrics.loop_alive()  # waiting is not a stalled loop: /healthz stays 200
            self._follow(newest=True, timeout_s=min(2.0, wait_s))
            if self.snapshot is not None:
                self.metrics.waiting_for_model(False)
                return True
            waited += min(2.0, wait_s)
            if waited >= wait_s:
                log.warning("no model snapshot on %r after %.0fs: is the learner running? (still waiting)",
                            self.settings.kafka.model_topic, waited)
                waited = 0.0
        return False

    def _follow(self, *, newest: bool = False, timeout_s: float = 5.0) -> None:
        """Swap in the newest valid version found on the model topic, if newer than the one in use.

        ``newest``: read the topic to its end now (start, assignment); otherwise take
        what arrived since the last look.
        """
        if newest:
            found = self.follower.newest(timeout_s)
            candidates = [found] if found is not None else []
            candidates += self.follower.poll(0)
        else:
            candidates = self.follower.poll(0)
        self._looked = time.monotonic()
        rejected_before = self._rejected
        for pub in sorted(candidates, key=lambda p: p.version, reverse=True):
            if self.snapshot is not None and pub.version <= self.snapshot.version:
                break
            if self._swap(pub):
                break
        rejected = self.follower.rejected
        if rejected > rejected_before:
            self.metrics.snapshot_rejected(rejected - rejected_before)
        self._rejected = rejected

    def _swap(self, pub: Published) -> bool:
        """Use ``pub`` from now on; False (counted) when its bytes are not a valid snapshot."""
        self.metrics.newest_known_version(pub.version)
        try:
            snap = PredictSnapshot.from_bytes(pub.payload, device=self.settings.model.device)
        except SnapshotError as exc:
            log.error("model version %d rejected: %s", pub.version, exc)
            self.metrics.snapshot_rejected(1)
            return False
        if self.snapshot is not None and snap.n_features_in_ != self.snapshot.n_features_in_:
            log.warning("model version %d expects %d features (was %d)", snap.version, snap.n_features_in_, self.snapshot.n_features_in_)
        first = self.snapshot is None
        self.snapshot, self.published_at = snap, pub.published_at
        rate = pub.meta.get(RATE_META)
        try:
            self.advised_rate = min(1.0, max(0.0, float(rate))) if rate is not None else 1.0
        except ValueError:
            self.advised_rate = 1.0
        self.metrics.model_swapped(snap.version, pub.published_at, propagated=not first)
        log.info("model version %d in use (%d ids)", snap.version, len(snap.cluster_ids_))
        return True

    def _poll(self) -> int:
        t0 = time.perf_counter()
        wait_ms, room = self.batcher.poll_budget()
        try:
            polled = self.consumer.poll(timeout_ms=min(wait_ms, MAX_POLL_MS) if wait_ms else 0, max_records=room)
        except OffsetOutOfRangeError as exc:
            fetched = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            self._reset_positions(self.positions.refused(self.consumer, fetched))
            polled = {}
        polled_s = time.perf_counter() - t0
        n = 0
        with self._lock:
            for records in polled.values():
                self.batcher.add(records)
                n += len(records)
        outside = self.positions.check(self.consumer, n)
        if outside:
            self._reset_positions(outside)
        self.hooks.on_poll(n, time.perf_counter() - t0, polled_s)
        return n

    def _reset_positions(self, outside) -> None:
        """Positions outside the log (positions.py): the offset-reset policy, after the fetched records are labelled."""
        self.positions.report(outside)
        with self._lock:
            while (batch := self.batcher.cut(self.offsets, now=True)) is not None:
                self._process(batch)
            self.offsets.update(self.positions.reset(self.consumer, outside))

    def _idle(self, max_idle_s: float | None) -> bool:
        if max_idle_s is None or not self._last_activity or self.batcher.pending:
            return False
        return time.monotonic() - self._last_activity > max_idle_s

    # ------------------------------------------------------------ one batch
    def _process(self, batch: Batch) -> None:
        """Label with the snapshot in use, send assignments and the feed, commit once acknowledged."""
        t0 = time.perf_counter()
        records, k = batch.records, self.settings.kafka
        snap = self.snapshot
        decoded = decode_batch([(r.key, r.value, r.headers) for r in records], dim=snap.n_features_in_,
                               max_bytes=k.max_record_bytes, max_key_bytes=k.max_key_bytes, max_id_bytes=k.max_id_bytes)
        self.outputs.open_batch()
        self.dead_letters.send(records, decoded.failures)
        self.metrics.records.labels("dead_lettered").inc(len(decoded.failures))
        valid = [records[i] for i in decoded.valid]
        if valid:
            self._label(snap, valid, decoded)
        self.dead_letters.await_acks()
        self.outputs.close_batch(batch.end, lambda: None)
        self.outputs.await_acks()
        self.metrics.record_batch(records, valid)
        self.offsets.update(batch.end)
        self.processed_batches += 1
        self._commit()
        self.hooks.on_batch(BatchInfo(records=records, end=batch.end, labelled=len(valid), dead_lettered=len(decoded.failures),
                                      relearnt=False, started=t0, timings={"total": time.perf_counter() - t0}))

    def _label(self, snap: PredictSnapshot, valid: list, decoded) -> None:
        k = self.settings.kafka
        t0 = time.perf_counter()
        z = snap._latents(decoded.X)
        labels, conf = snap.predict_with_confidence_latent(z)
        self.metrics.predict_seconds.observe(time.perf_counter() - t0)
        keys = [item_id.encode() for item_id in decoded.ids]
        parts = default_partitions(keys, self.outputs.partitions_for(k.output_topic)).tolist()
        values = encode_assignments(decoded.ids, labels.tolist(), conf, snap.version, valid[0].topic,
                                    [r.partition for r in valid], [r.offset for r in valid], roots=snap.roots(labels).tolist())
        self.outputs.send_many(k.output_topic, keys, values, parts)
        rate = min(self.settings.scale.sample_rate, self.advised_rate)
        mask = sample_mask(decoded.ids, rate)
        sent = int(mask.sum())
        if sent:
            Z = z.cpu().numpy()[mask] if sent < len(mask) else z.cpu().numpy()
            for value, headers in encode_latents(np.ascontiguousarray(Z), model_version=snap.version, encoder=snap.encoder_id):
                self.outputs.send(k.feed_topic, key=None, value=value, headers=headers)
        self.metrics.feed_sampled(rate, sent, len(mask) - sent)

    def _commit(self, *, wait: bool = False) -> None:
        if self.offsets and self.outputs is not None:
            self.outputs.batch_done(self.offsets) if not wait else self.outputs.commit(self.offsets, wait=True)

    # ------------------------------------------------------------ rebalances (client IO thread)
    def assigned(self, partitions: list[TopicPartition]) -> None:
        """New partitions: forget what was polled, read the model topic to its end before labelling."""
        with self._lock:
            self.batcher.clear()
            self.offsets = {}
            self._refresh.set()
            self._last_activity = time.monotonic()
        self.positions.assigned(partitions)
        self.metrics.assigned.set(len(self.consumer.assignment()) if self.consumer is not None else len(partitions))
        log.info("assigned input partitions %s", sorted(tp.partition for tp in partitions))
        self.hooks.on_assigned([tp.partition for tp in partitions])

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Partitions leave: pending records are dropped (their next owner labels them from the last commit)."""
        with self._lock:
            self.batcher.clear()
            self.offsets = {}
        self.metrics.forget_partitions([tp.partition for tp in partitions])


class _Listener(ConsumerRebalanceListener):
    """Rebalance listener handing the events to the predictor."""

    def __init__(self, predictor: PredictorService):
        self.p = predictor

    def on_partitions_revoked(self, revoked):
        self.p.revoked(list(revoked))

    def on_partitions_assigned(self, assigned):
        self.p.assigned(list(assigned))

    def on_partitions_lost(self, lost):
        self.p.revoked(list(lost))


def _range_assignors() -> list:
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    return [RangePartitionAssignor, RoundRobinPartitionAssignor]


def _sum(lag: dict[int, int]) -> int | None:
    return sum(lag.values()) if lag else None

"""Prometheus metrics of the service and the HTTP endpoint serving ``/metrics`` and ``/healthz``.

Names follow Prometheus conventions (``stream_dec_`` prefix, ``_total`` counters,
``_seconds`` / ``_bytes`` units). Every metric lives in the service's own registry, so
two services in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# From a snapshot's publication to a predictor labelling with it: a poll of the model
# topic plus the rest of the batch in hand, so seconds; minutes mean a predictor is stuck.
_PROPAGATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: What ``STREAM_DEC_ROLE`` may be: one ``stream_dec_role_info`` series each.
ROLES = ("all", "learner", "predictor")


class BatchHistogram(Collector):
    """A Prometheus histogram that takes a whole array of observations in one call.

    The end-to-end latency is observed for every record, and ``Histogram.observe``
    is a locked Python call per value: a visible share of the loop's per-record
    budget. Here a batch costs one ``searchsorted``. Exposed exactly like a client
    histogram.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.observe_many(np.asarray([value], dtype=np.float64))

    def observe_many(self, values) -> None:
        """Add every value of a 1-d array."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        # "le" buckets: a value equal to a bound belongs to that bound's bucket.
        idx = np.searchsorted(self._bounds, values, side="left")
        counts = np.bincount(idx, minlength=self._counts.size)
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self):
        """The histogram's samples (cumulative buckets, sum, count)."""
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        bounds = [repr(float(b)) for b in self._bounds] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation, buckets=list(zip(bounds, cumulative.tolist())), sum_value=total)
        return [family]

    def describe(self):
        """No samples at registration time: keeps ``register`` from calling :meth:`collect`."""
        return []


class ServiceMetrics:
    """All metrics of one running service."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.records = Counter("stream_dec_records_total", "Input records by outcome (labelled, dead_lettered, replayed: relearnt after an exactly-once restart, not republished).", ["outcome"], registry=r)
        self.dlq = Counter("stream_dec_dlq_records_total", "Dead letters the dead-letter topic acknowledged, by reason.", ["reason"], registry=r)
        self.dlq_failures = Counter("stream_dec_dlq_send_failures_total", "Dead letters that could not be delivered (logged and skipped), by reason.", ["reason"], registry=r)
        self.batches = Counter("stream_dec_batches_total", "Micro-batches processed.", registry=r)
        self.batch_size = Histogram("stream_dec_batch_size_records", "Records per micro-batch.", buckets=_SIZE_BUCKETS, registry=r)
        self.input_bytes = Counter("stream_dec_input_bytes_total", "Bytes of input record values consumed.", registry=r)
        self.update_seconds = Histogram("stream_dec_update_seconds", "Duration of one bounded online update.", buckets=_LATENCY_BUCKETS, registry=r)
        self.predict_seconds = Histogram("stream_dec_predict_seconds", "Duration of labelling one micro-batch.", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_seconds = BatchHistogram(
            "stream_dec_end_to_end_latency_seconds", "From the input record's timestamp to its label being acknowledged.",
            buckets=_E2E_BUCKETS, registry=r,
        )
        self.lag = Gauge("stream_dec_consumer_lag_records", "Records behind the partition's high watermark (never below 0).", ["partition"], registry=r)
        # The raw figures beside the clamped lag: a position past the high watermark (the
        # log was truncated, recreated or restored empty) shows here, not as a lag of 0.
        self.highwater = Gauge("stream_dec_input_highwater_offset", "High watermark of the input partition, as last fetched.", ["partition"], registry=r)
        self.position = Gauge("stream_dec_input_position_offset", "Next offset the consumer fetches from the input partition.", ["partition"], registry=r)
        self.offset_resets = Counter("stream_dec_offset_resets_total", "Input positions found outside the partition's log and reset by policy, by where they were (past_end, before_start).", ["where"], registry=r)
        self.broker_up = Gauge("stream_dec_broker_up", "1 while the broker and the output topic answer, 0 during an outage.", registry=r)
        self.broker_up.set(1)  # no outage known: only a failed try (stream_dec/service/outage.py) sets 0
        self.outage_seconds = Counter("stream_dec_outage_seconds_total", "Seconds spent in broker or output-topic outages.", registry=r)
        self.assigned = Gauge("stream_dec_assigned_partitions", "Input partitions assigned to this instance (0: standby).", registry=r)
        self.churn = Gauge("stream_dec_churn_ratio", "Share of remembered items relabelled by the last update.", registry=r)
        self.centre_shift = Gauge("stream_dec_centre_shift_radii", "Mean centre movement of the last update, in cluster radii.", registry=r)
        self.novelty = Gauge("stream_dec_novelty_ratio", "Share of the last batch beyond every cluster's radius.", registry=r)
        self.clusters = Gauge("stream_dec_clusters", "Current number of clusters.", registry=r)
        self.max_clusters = Gauge("stream_dec_clusters_max", "Cap on the number of clusters.", registry=r)
        self.new_clusters = Counter("stream_dec_new_clusters_total", "Clusters created online.", registry=r)
        self.model_version = Gauge("stream_dec_model_version", "Version of the model (one per update).", registry=r)
        self.guard = Counter("stream_dec_guard_actions_total", "Churn-guard interventions, by action.", ["action"], registry=r)
        self.ckpt_seconds = Histogram("stream_dec_checkpoint_duration_seconds", "Time to write one checkpoint.", buckets=_LATENCY_BUCKETS, registry=r)
        # A failed journal write counts here too (a write to the checkpoint directory), so
        # the checkpoint alerts cover it.
        self.ckpt_failures = Counter("stream_dec_checkpoint_failures_total", "Writes to the checkpoint directory that failed (checkpoint files, journal lines).", registry=r)
        self.fenced = Counter("stream_dec_fenced_total", "Times this instance, while it owned the stream, found it no longer did (reason: lease, a newer owner's epoch; session, no heartbeat for a session timeout; lost, the group took the partitions) and stopped writing.", ["reason"], registry=r)
        for reason in ("lease", "session", "lost", "not_owner"):  # every series from 0: increase() sees the first
            self.fenced.labels(reason)
        self.owner_epoch = Gauge("stream_dec_owner_epoch", "Owner epoch this instance holds (0: none, a standby).", registry=r)
        self.ckpt_last = Gauge("stream_dec_checkpoint_last_success_timestamp_seconds", "Unix time of the last checkpoint written.", registry=r)
        self.ckpt_age = Gauge("stream_dec_checkpoint_age_seconds", "Seconds since the last checkpoint written.", registry=r)
        self.ckpt_age.set_function(lambda: time.time() - self._ckpt_time if self._ckpt_time else 0.0)
        self.loop_last = Gauge("stream_dec_loop_last_iteration_timestamp_seconds", "Unix time of the last poll-loop iteration.", registry=r)
        # Scale-out roles. Dashboards and alerts select a role by joining on instance with
        # role_info, so every process exports it, and every role's series from the start.
        self.role_info = Gauge("stream_dec_role_info", "1 for the role this process runs (all, learner, predictor), 0 for the others.", ["role"], registry=r)
        self.set_role("all")  # the default role; the service sets its own at start
        self.newest_known = Gauge("stream_dec_model_newest_known_version", "Newest model version this predictor has seen on the model topic.", registry=r)
        self.snapshot_time = Gauge("stream_dec_snapshot_published_timestamp_seconds", "Unix time the learner published the snapshot in use (predictor) or its newest snapshot (learner); 0 before the first.", registry=r)
        self.snapshot_bytes = Gauge("stream_dec_snapshot_bytes", "Size of the newest snapshot the learner published.", registry=r)
        self.snapshots_published = Counter("stream_dec_snapshots_published_total", "Model snapshots the learner published on the model topic.", registry=r)
        self.snapshots_rejected = Counter("stream_dec_snapshots_rejected_total", "Snapshots a predictor read and refused (bad checksum, missing chunk); it kept the version it had.", registry=r)
        self.propagation = Histogram("stream_dec_model_propagation_seconds", "From a snapshot's publication to this predictor labelling with it.", buckets=_PROPAGATION_BUCKETS, registry=r)
        self.sample_rate = Gauge("stream_dec_feed_sample_rate", "Share of labelled items whose latents reach the learner: the rate a predictor uses, or the rate the learner advises.", registry=r)
        self.sample_rate.set(1)  # everything is learnt until a rate is set (always so in role all)
        self.feed_items = Counter("stream_dec_feed_items_total", "Labelled items a predictor sent to the learner or left out by sampling, by outcome (sent, skipped).", ["outcome"], registry=r)
        for outcome in ("sent", "skipped"):  # every series from 0: increase() sees the first
            self.feed_items.labels(outcome)
        self.waiting = Gauge("stream_dec_waiting_for_model", "1 while this predictor labels nothing because it has no model snapshot yet.", registry=r)
        self._ckpt_time = 0.0
        self.last_loop = 0.0
        #: Why /healthz answers 503 while an outage lasts ("" when there is none).
        self.outage_message = ""

    def checkpoint_written(self, seconds: float) -> None:
        """Record a successful checkpoint."""
        self._ckpt_time = time.time()
        self.ckpt_seconds.observe(seconds)
        self.ckpt_last.set(self._ckpt_time)

    def record_update(self, report, model) -> None:
        """One update's drift report, and the model it left."""
        self.update_seconds.observe(report.update_ms / 1000.0)
        self.churn.set(report.churn)
        self.centre_shift.set(report.centre_shift)
        self.novelty.set(report.novelty_rate)
        self.new_clusters.inc(len(report.new_cluster_ids))
        if report.guard_action != "none":
            self.guard.labels(report.guard_action).inc()
        self.record_model(model)

    def record_model(self, model) -> None:
        """Clusters, their cap and the version of the model in use."""
        self.clusters.set(model.n_clusters_)
        self.max_clusters.set(model.max_clusters_)
        self.model_version.set(model.version_)

    def record_batch(self, records: list, valid: list) -> None:
        """A processed batch (``valid``: its labelled records), once its outputs are acknowledged."""
        if valid:
            ts = np.fromiter((r.timestamp or 0 for r in valid), dtype=np.float64, count=len(valid))
            ts = ts[ts > 0]
            self.e2e_seconds.observe_many(np.maximum(0.0, time.time() - ts / 1000.0))
        self.input_bytes.inc(sum(len(r.value) for r in records if r.value))
        self.records.labels("labelled").inc(len(valid))
        self.batches.inc()
        self.batch_size.observe(len(records))

    def record_lag(self, lag: dict[int, int]) -> None:
        """Records behind the high watermark, per partition."""
        for partition, behind in lag.items():
            self.lag.labels(str(partition)).set(behind)

    def record_positions(self, positions: dict[int, tuple[int, int | None]]) -> None:
        """``{partition: (position, highwater or None)}``: the raw figures and the clamped lag."""
        for partition, (position, highwater) in positions.items():
            label = str(partition)
            self.position.labels(label).set(position)
            if highwater is not None:
                self.highwater.labels(label).set(highwater)
                self.lag.labels(label).set(max(0, highwater - position))

    def forget_partitions(self, partitions) -> None:
        """Drop the per-partition series of partitions this instance no longer owns.

        A predictor's partitions move between members; a series left behind would repeat
        its last lag forever and be summed with the new owner's.
        """
        for partition in partitions:
            for gauge in (self.lag, self.position, self.highwater):
                try:
                    gauge.remove(str(partition))
                except KeyError:  # never set here
                    pass

    def set_role(self, role: str) -> None:
        """``stream_dec_role_info{role}``: 1 for ``role``, 0 for the other roles."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        for name in ROLES:
            self.role_info.labels(name).set(1 if name == role else 0)

    def model_swapped(self, version: int, published_at: float | None, *, propagated: bool = True) -> None:
        """A predictor labels with ``version`` from now on (``published_at``: when the learner published it, if known).

        ``propagated``: False for a predictor's first model (at start): its age is not a
        propagation time, so the histogram leaves it out.
        """
        self.model_version.set(version)
        if published_at is not None:
            self.snapshot_time.set(published_at)
            if propagated:
                # Clocks of two machines may disagree by a little: never a negative time.
                self.propagation.observe(max(0.0, time.time() - published_at))

    def newest_known_version(self, version: int) -> None:
        """A predictor has seen ``version`` on the model topic (whether or not it uses it yet)."""
        self.newest_known.set(version)

    def snapshot_published(self, version: int, nbytes: int, published_at: float) -> None:
        """The learner published ``version`` as a snapshot of ``nbytes`` at ``published_at`` (Unix time)."""
        self.snapshots_published.inc()
        self.snapshot_bytes.set(nbytes)
        self.snapshot_time.set(published_at)
        self.model_version.set(version)

    def snapshot_rejected(self, count: int) -> None:
        """A predictor refused ``count`` snapshots it read (bad checksum, missing chunk)."""
        self.snapshots_rejected.inc(count)

    def feed_sampled(self, rate: float, sent: int, skipped: int) -> None:
        """A predictor sent ``sent`` items' latents to the learner and left ``skipped`` out, sampling at ``rate``."""
        self.sample_rate.set(rate)
        self.feed_items.labels("sent").inc(sent)
        self.feed_items.labels("skipped").inc(skipped)

    def advised_sample_rate(self, rate: float) -> None:
        """The sample rate the learner advises predictors (below 1: it cannot keep up with every item)."""
        self.sample_rate.set(rate)

    def waiting_for_model(self, waiting: bool) -> None:
        """Whether a predictor is holding its records because it has no model snapshot yet."""
        self.waiting.set(1 if waiting else 0)

    def loop_alive(self) -> None:
        """Mark one iteration of the poll loop."""
        self.last_loop = time.time()
        self.loop_last.set(self.last_loop)


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` (200 while the loop is alive and no outage lasts) over HTTP."""

    def __init__(self, metrics: ServiceMetrics, host: str, port: int, stale_after_s: float):
        self.metrics = metrics
        self.stale_after_s = stale_after_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, ctype, code = generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/healthz"):
                    age = time.time() - server.metrics.last_loop
                    alive = server.metrics.last_loop > 0 and age < server.stale_after_s
                    outage = server.metrics.outage_message
                    body = (f"{outage}\n" if outage else f"ok: loop iterated {age:.1f}s ago\n" if alive
                            else f"stale: last loop iteration {age:.1f}s ago\n").encode()
                    ctype, code = "text/plain; charset=utf-8", 200 if alive and not outage else 503
                else:
                    body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="stream-dec-metrics", daemon=True)

    def start(self) -> MetricsServer:
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down."""
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(settings, metrics: ServiceMetrics) -> MetricsServer | None:
    """Start the ``/metrics`` and ``/healthz`` server of ``settings.metrics`` (None when the port is 0).

    ``/healthz`` turns 503 when the loop has not iterated for three batch waits (at least 30 s).
    """
    m = settings.metrics
    if not m.port:
        return None
    stale_after_s = max(30.0, 3 * settings.batch.max_wait_ms / 1000)
    server = MetricsServer(metrics, m.host, m.port, stale_after_s=stale_after_s).start()
    logging.getLogger("stream_dec.service").info("metrics on http://%s:%d/metrics", m.host, server.port)
    return server

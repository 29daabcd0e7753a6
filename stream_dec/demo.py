"""``stream-dec demo``: the main job end to end on a real sample of Banking77.

One call of :func:`run_demo` starts an embedded Kafka broker (or uses a given one),
splits the shipped sample like the stream protocol of docs/quality-protocol.md (60% of
the intents are known at training time, the others appear part-way through the stream),
trains a base :class:`~stream_dec.StreamDEC`, writes its first checkpoint, runs the
Kafka service in this process, streams the rest of the sample through it (plus a few
malformed records for the dead-letter topic), reads every output record back and
scores what the service published. Labels are used only to build the split and to score.

Progress goes to stderr; :func:`format_report` renders the returned report for humans.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stream_dec.datasets import sample_path
from stream_dec.evaluation import score_all
from stream_dec.evaluation.protocol import SEGMENTS, class_incremental_split
from stream_dec.io.codecs import REASON_HEADER

class DemoError(RuntimeError):
    """The demo could not run to the end; the message says which phase failed and why."""


@dataclass
class Sample:
    """A labelled embedding set: float32 rows, integer labels, class names and attribution."""

    X: np.ndarray
    y: np.ndarray
    label_names: np.ndarray
    name: str
    attribution: str


def load_sample(path: str | os.PathLike | None = None) -> Sample:
    """Load a ``.npz`` with arrays ``X`` and ``y`` (``label_names``, ``attribution`` optional)."""
    p = Path(path) if path is not None else sample_path()
    if not p.is_file():
        raise DemoError(f"data file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("X", "y") if k not in z.files]
            if missing:
                raise DemoError(f"{p} lacks array(s) {', '.join(missing)}: the demo needs embeddings X and labels y")
            X = np.asarray(z["X"], dtype=np.float32)
            y = np.asarray(z["y"]).astype(np.int64)
            names = z["label_names"] if "label_names" in z.files else np.array([], dtype=str)
            attribution = str(z["attribution"]) if "attribution" in z.files else ""
    except DemoError:
        raise
    except Exception as exc:  # truncated or foreign files
        raise DemoError(f"cannot read {p}: {exc}") from None
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise DemoError(f"{p}: X must be [n, d] and y [n], got {X.shape} and {y.shape}")
    if not np.isfinite(X).all():
        raise DemoError(f"{p}: X holds NaN or infinite values")
    if len(np.unique(y)) < 4:
        raise DemoError(f"{p}: the demo needs at least 4 classes, got {len(np.unique(y))}")
    return Sample(X, y, names, p.stem, attribution)


def _class_name(sample: Sample, c: int) -> str:
    return str(sample.label_names[c]) if 0 <= c < len(sample.label_names) else str(c)


@dataclass
class DemoSplit:
    """Row indices of the sample: fitted on, held out (REF), and streamed (in stream order)."""

    fit: np.ndarray
    ref: np.ndarray
    stream: np.ndarray
    base_classes: np.ndarray
    novel_classes: np.ndarray
    novel_start: dict[int, int]  # novel class -> position in the stream of its first item


def split_like_protocol(y: np.ndarray, seed: int, segments: int = SEGMENTS) -> DemoSplit:
    """The stream protocol's seeded class-incremental split, flattened into one stream.

    :func:`~stream_dec.evaluation.protocol.class_incremental_split` (the quality
    benchmark's split): 60% of the classes are base classes; each base class gives 50%
    of its items to ``fit``, 20% to REF (never streamed nor trained on) and 30% to the
    stream. Novel classes go to the stream whole, each starting in a random one of the
    first half of ``segments`` equal stretches of the stream, so new clusters must
    appear mid-stream.
    """
    split = class_incremental_split(y, seed, segments)
    stream = split.stream
    novel_start = {int(c): int(np.flatnonzero(y[stream] == c)[0]) for c in split.novel_classes}
    return DemoSplit(split.base, split.ref, stream, split.base_classes, split.novel_classes, novel_start)


def malformed_records(dim: int, rng: np.random.Generator) -> list[tuple[bytes, bytes, list, str]]:
    """Unusable input records ``(key, value, headers, expected DLQ reason)``, one per kind."""
    from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, CONTENT_TYPE_HEADER, encode_float32, encode_json

    f32 = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_FLOAT32.encode())]
    vec = rng.standard_normal(dim).astype(np.float32)
    nan = vec.copy()
    nan[dim // 2] = np.nan
    inf = vec.copy()
    inf[0] = np.inf
    return [
        (b"bad-json", b'{"id": "bad-json", "embedding": [0.1, 0.2,', [], "bad_json"),
        (b"wrong-dim-json", encode_json("wrong-dim-json", vec[: dim // 2]), [], "wrong_dimension"),
        (b"wrong-dim-f32", encode_float32(np.concatenate([vec, vec[:8]])), f32, "wrong_dimension"),
        (b"nan-f32", encode_float32(nan), f32, "non_finite"),
        (b"inf-f32", encode_float32(inf), f32, "non_finite"),
        (b"no-id", b'{"embedding": [0.5, 0.5]}', [], "missing_id"),
    ]


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def _scores(y_true: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    return {k: round(v, 4) for k, v in score_all(y_true, ids).items()}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


class _Progress:
    """Phase lines and one progress line on stderr: rewritten in place on a terminal, repeated otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False
        self._t0 = time.perf_counter()

    def _stamp(self) -> str:
        return f"[demo {time.perf_counter() - self._t0:5.1f}s]"

    def phase(self, text: str) -> None:
        """Start a phase: one line of its own."""
        if self.enabled:
            self.close()
            print(f"{self._stamp()} {text}", file=self.stream, flush=True)

    def update(self, text: str) -> None:
        """Show the state of the running phase."""
        if not self.enabled:
            return
        if self.tty:
            print(f"\r\x1b[2K{self._stamp()}   {text}", end="", file=self.stream, flush=True)
            self._open = True
        else:
            print(f"{self._stamp()}   {text}", file=self.stream, flush=True)

    def close(self) -> None:
        """End an open progress line."""
        if self._open:
            print(file=self.stream, flush=True)
            self._open = False


def _check_reachable(servers: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when no bootstrap server accepts a TCP connection.

    Kafka clients would retry for tens of seconds before giving up on a wrong address.
    """
    errors = []
    for server in servers.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DemoError(f"--bootstrap-servers: {server.strip()!r} is not HOST:PORT")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except OSError as exc:
            errors.append(f"{server.strip()}: {exc.strerror or exc}")
    raise DemoError(f"no broker answers at {servers} ({'; '.join(errors)})")


def _read_topic(bootstrap_servers: str, topic: str, done: Callable[[list], bool], timeout_s: float) -> list:
    """Every record of a one-partition topic, read until ``done(records)`` and the end is reached."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=100,
                             request_timeout_ms=10_000, fetch_max_bytes=64 * 1024 * 1024)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            hw = consumer.highwater(tp)
            if hw is not None and consumer.position(tp) >= hw and done(records):
                return records
        raise DemoError(f"reading {topic!r} back: got {len(records)} records in {timeout_s:.0f} s, fewer than expected")
    finally:
        consumer.close()


def _write_items(path: Path, items: list) -> None:
    """Store ``(key, value, headers)`` records for the producer process (no pickle)."""
    np.savez(
        path,
        keys=np.array([k.decode() for k, _, _ in items]),
        lengths=np.array([len(v) for _, v, _ in items], dtype=np.int64),
        blob=np.frombuffer(b"".join(v for _, v, _ in items), dtype=np.uint8),
        float32=np.array([bool(h) for _, _, h in items]),
    )


def _producer_main(argv: list[str] | None = None) -> int:
    """Producer process of the demo: ``ITEMS.npz SERVERS TOPIC RATE``; prints ``sent N`` lines.

    A separate process, as producers are in production: inside the service's process
    it would compete with the service for the GIL, delay its own sends and distort the
    measured latency. Records are paced by the clock to RATE records/s (0: unpaced).
    """
    from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, CONTENT_TYPE_HEADER
    from stream_dec.io.producer import PACED_LINGER_MS, make_producer

    path, servers, topic, rate_text = argv if argv is not None else sys.argv[1:]
    rate = float(rate_text)
    with np.load(path, allow_pickle=False) as z:
        keys, lengths, blob, f32 = z["keys"], z["lengths"], z["blob"].tobytes(), z["float32"]
    header = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_FLOAT32.encode())]
    try:
        overrides = {"linger_ms": PACED_LINGER_MS} if rate else {}
        producer = make_producer(servers, client_id="stream-dec-demo", **overrides)
    except Exception as exc:
        print(f"cannot connect a producer to {servers}: {exc!r}", file=sys.stderr)
        return 1
    failed: list[BaseException] = []
    ends = np.cumsum(lengths)
    t0 = time.perf_counter()
    try:
        for i, key in enumerate(keys):
            if rate:
                # Paced by the clock, not by a sleep per record: the mean rate stays exact.
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            value = blob[ends[i] - lengths[i] : ends[i]]
            producer.send(topic, key=str(key).encode(), value=value, headers=header if f32[i] else []).add_errback(failed.append)
            if failed:
                break
            if (i + 1) % 50 == 0:
                print(f"sent {i + 1}", flush=True)
        producer.flush(timeout=60)
    except Exception as exc:
        failed.append(exc)
    finally:
        producer.close(timeout=5)
    if failed:
        print(f"{len(failed)} records were not delivered (first: {failed[0]!r})", file=sys.stderr)
        return 1
    print(f"sent {len(keys)}", flush=True)
    return 0


def run_demo(
    data: str | os.PathLike | None = None,
    bootstrap_servers: str | None = None,
    batch_size: int = 128,
    seed: int = 0,
    rate: float = 1000.0,
    max_wait_ms: int = 100,
    progress: bool = True,
    timeout_s: float = 240.0,
) -> dict[str, Any]:
    """Run the whole demo and return its report (plain data, JSON-ready).

    ``data``: a ``.npz`` with ``X`` and ``y`` (default: the shipped Banking77 sample).
    ``bootstrap_servers``: use this broker instead of starting an embedded one (topics
    and a consumer group with a unique name are created on it). ``batch_size`` /
    ``max_wait_ms``: the service's micro-batch bounds. ``rate``: records per second
    offered to the service (0: as fast as the producer goes, which measures throughput
    under a backlog). ``timeout_s`` bounds the streaming phase. Raises :class:`DemoError`
    on failure.
    """
    if batch_size < 1:
        raise DemoError(f"batch size must be >= 1, got {batch_size}")
    if rate < 0:
        raise DemoError(f"rate must be >= 0 records/s, got {rate}")
    ui = _Progress(progress)
    t_start = time.perf_counter()
    try:
        sample = load_sample(data)
        split = split_like_protocol(sample.y, seed)
        _show_data(sample, split, ui)
        with contextlib.ExitStack() as stack:
            servers, broker_desc = _start_broker(stack, bootstrap_servers, ui)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stream-dec-demo-")))
            report = _run(sample, split, servers, work, batch_size, seed, rate, max_wait_ms, timeout_s, ui)
            report["broker"] = broker_desc
    finally:
        ui.close()
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _show_data(sample: Sample, split: DemoSplit, ui: _Progress) -> None:
    """Phase lines: the data set and how it is split."""
    ui.phase(
        f"data: {sample.name}, {len(sample.y)} items x {sample.X.shape[1]} dims, {len(np.unique(sample.y))} classes; "
        f"{len(split.base_classes)} known at training, {len(split.novel_classes)} appear mid-stream"
    )
    ui.phase(f"split: fit {len(split.fit)}, held-out REF {len(split.ref)}, stream {len(split.stream)} "
             f"(new classes start at stream items {sorted(split.novel_start.values())})")


def _start_broker(stack: contextlib.ExitStack, bootstrap_servers: str | None, ui: _Progress) -> tuple[str, str]:
    """The bootstrap servers and a description of the broker: the given one, or an embedded one kept by ``stack``."""
    if bootstrap_servers:
        ui.phase(f"broker: using {bootstrap_servers}")
        _check_reachable(bootstrap_servers)
        return bootstrap_servers, f"external broker {bootstrap_servers}"
    from stream_dec.io.broker import BrokerError, EmbeddedBroker

    ui.phase("broker: starting an embedded tansu broker ...")
    try:
        broker = stack.enter_context(EmbeddedBroker())
    except BrokerError as exc:
        raise DemoError(f"cannot start the embedded broker: {exc}") from None
    ui.phase(f"broker: ready on {broker.bootstrap_servers}")
    return broker.bootstrap_servers, f"embedded tansu on {broker.bootstrap_servers}"


def _stream_items(sample: Sample, split: DemoSplit, seed: int) -> tuple[list, list]:
    """The input records in stream order (float32 values keyed by item id) with the malformed ones mixed in."""
    from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, CONTENT_TYPE_HEADER, encode_float32

    header = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_FLOAT32.encode())]
    items = [(f"{sample.name}-{row}".encode(), encode_float32(sample.X[row]), header) for row in split.stream]
    rng = np.random.default_rng([seed, 1])
    bad = malformed_records(sample.X.shape[1], rng)
    # At random places of the stream, as they would arrive in production; back to front
    # so that earlier insertions do not shift the later positions.
    positions = rng.choice(len(items), len(bad), replace=False)
    for pos, (key, value, headers, _reason) in sorted(zip(positions.tolist(), bad), key=lambda t: -t[0]):
        items.insert(pos, (key, value, headers))
    return items, bad


def _run(sample: Sample, split: DemoSplit, servers: str, work: Path, batch_size: int, seed: int, rate: float,
         max_wait_ms: int, timeout_s: float, ui: _Progress) -> dict[str, Any]:
    """The demo on a reachable broker, with ``work`` as scratch space: train, serve, stream, read back, report."""
    # A unique name per run: an external broker may hold topics and groups of earlier runs.
    tag = f"stream-dec-demo-{uuid.uuid4().hex[:8]}"
    topics = {"input": f"{tag}.embeddings", "output": f"{tag}.labels", "dlq": f"{tag}.embeddings.dlq"}
    ckpt_dir = work / "checkpoints"
    settings = _settings(servers, tag, topics, batch_size, max_wait_ms, ckpt_dir)
    _create_topics(servers, topics, ui)
    k_base = len(split.base_classes)
    ui.phase(f"train: loading torch, then StreamDEC(n_clusters={k_base}) on {len(split.fit)} items of the known classes ...")
    ckpt_dir.mkdir()
    base = _train(sample, split, settings, seed, ui)

    svc = _ServiceThread(settings)
    ui.phase(f"service: starting (batches of <= {batch_size} records or {max_wait_ms} ms), joining group {tag} ...")
    svc.start_and_join(timeout_s=60, topic=topics["input"], group=tag, servers=servers)
    items, bad = _stream_items(sample, split, seed)
    ui.phase(f"service: owns {topics['input']}; streaming {len(split.stream)} records + {len(bad)} malformed ones "
             f"({'as fast as possible' if not rate else f'{rate:,.0f} records/s'}) ...")
    _stream_through(svc, items, len(bad), work, servers, topics["input"], rate, timeout_s, ui)
    ui.phase("service: stopped (final checkpoint written, offsets committed); reading the outputs back ...")
    published = _read_published(servers, topics, n_labels=len(split.stream), n_dead=len(bad), n_inputs=len(items))
    report = _report(sample, split, base, svc.service, published, topics, bad, seed, rate, batch_size, max_wait_ms)
    # Outside the scratch dir, which goes with the run: the page is for the user to open afterwards.
    report["report"] = _write_page(servers, topics, Path(tempfile.gettempdir()) / f"{tag}-report.html", ui)
    return report


def _write_page(servers: str, topics: dict[str, str], path: Path, ui: _Progress) -> str | None:
    """Draw the run's output and dead-letter topics as the ``stream-dec report`` page; None without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from stream_dec.report.figures import INSTALL_HINT

        ui.phase(f"report: no page drawn (matplotlib is not installed: {INSTALL_HINT})")
        return None
    from stream_dec.report import ReportError, stream_from_kafka, write_report
    from stream_dec.report.reader import read_topic

    ui.phase("report: drawing the run's topics ...")
    try:
        out = read_topic(servers, topics["output"], progress=False)
        dlq = read_topic(servers, topics["dlq"], progress=False)
        written = write_report(stream_from_kafka(out, f"topic {topics['output']}", dlq=dlq), path)
    except (ReportError, OSError) as exc:
        raise DemoError(f"cannot write the report page {path}: {exc}") from None
    ui.phase(f"report: {written}")
    return str(written)


def _create_topics(servers: str, topics: dict[str, str], ui: _Progress) -> None:
    """Create the run's input, output and dead-letter topics, one partition each."""
    from stream_dec.io.broker import BrokerError, create_topics

    try:
        create_topics(servers, list(topics.values()), partitions=1, timeout_s=15)
    except BrokerError as exc:
        raise DemoError(f"cannot create the demo topics on {servers}: {exc}") from None
    ui.phase(f"topics: {', '.join(topics.values())}")


def _settings(servers: str, tag: str, topics: dict[str, str], batch_size: int, max_wait_ms: int, ckpt_dir: Path):
    """The service settings of the run: its topics and group, short group timings, no metrics endpoint.

    Raises :class:`~stream_dec.settings.SettingsError` for bad ``STREAM_DEC_*`` variables,
    a device this host lacks included, before anything is trained.
    """
    from stream_dec.settings import check_device, load_settings

    settings = load_settings(
        kafka__bootstrap_servers=servers,
        kafka__group_id=tag,
        kafka__client_id="stream-dec-demo",
        kafka__input_topic=topics["input"],
        kafka__output_topic=topics["output"],
        kafka__dlq_topic=topics["dlq"],
        # Short group timings: a join takes about half the session timeout (docs/kafka-notes.md).
        kafka__session_timeout_ms=6000,
        kafka__heartbeat_interval_ms=1000,
        batch__max_size=batch_size,
        batch__max_wait_ms=max_wait_ms,
        checkpoint__dir=str(ckpt_dir),
        metrics__port=0,
    )
    check_device(settings)
    return settings


@dataclass
class _BaseModel:
    """The trained base model and what it says before any streaming."""

    model: Any
    ref_before: np.ndarray  # REF ids right after training
    frozen: np.ndarray  # stream ids of a model that never learns
    ids_start: list[int]


def _train(sample: Sample, split: DemoSplit, settings, seed: int, ui: _Progress) -> _BaseModel:
    """Fit the base model on the known classes and write the first checkpoint the service starts from."""
    t0 = time.perf_counter()
    from stream_dec import StreamDEC

    X = sample.X
    # The service's device setting (STREAM_DEC_MODEL__DEVICE) also decides where the base model trains.
    model = StreamDEC(n_clusters=len(split.base_classes), random_state=seed, device=settings.model.device,
                      verbose=ui.enabled).fit(X[split.fit])
    base = _BaseModel(model, model.predict(X[split.ref]), model.predict(X[split.stream]), [int(i) for i in model.cluster_ids_])
    model.save(settings.checkpoint.dir)
    ui.phase(f"train: done in {time.perf_counter() - t0:.1f}s (fit {model.fit_seconds_:.1f}s), {len(base.ids_start)} clusters "
             f"(ids {base.ids_start[0]}..{base.ids_start[-1]}); first checkpoint in {settings.checkpoint.dir}")
    return base


class _ServiceThread:
    """The Kafka service on a thread of this process; its failure is kept for the main thread to report."""

    def __init__(self, settings):
        from stream_dec.service import StreamService

        self.service = StreamService(settings)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, name="stream-dec-service", daemon=True)

    def _serve(self) -> None:
        try:
            # The idle exit is only a backstop: the demo stops the service once all is labelled.
            self.service.run(max_idle_s=30.0, install_signals=False)
        except BaseException as exc:  # re-raised from the main thread
            self.failure.append(exc)

    def metric(self, name: str, labels: dict | None = None) -> float:
        """A sample of the service's Prometheus registry (0 before it is first set)."""
        return self.service.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def counts(self) -> tuple[int, int]:
        """Records labelled and dead-lettered so far; they move once the broker acknowledged the batch's outputs."""
        return (int(self.metric("stream_dec_records_total", {"outcome": "labelled"})),
                int(self.metric("stream_dec_records_total", {"outcome": "dead_lettered"})))

    def is_down(self) -> bool:
        """Whether the service failed or its thread ended."""
        return bool(self.failure) or not self.thread.is_alive()

    def start_and_join(self, timeout_s: float, topic: str, group: str, servers: str) -> None:
        """Start the thread and wait until the service owns a partition of its input topic."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while self.metric("stream_dec_assigned_partitions") < 1:
            if self.is_down():
                raise DemoError(f"the service stopped before joining its group: {self.failure[0] if self.failure else 'no error given'}")
            if time.monotonic() > deadline:
                self.service.stop()
                raise DemoError(f"the service got no partition of {topic} within {timeout_s:.0f} s (consumer group {group} on {servers})")
            time.sleep(0.05)

    def stop(self) -> None:
        """Ask the service to stop (final checkpoint and commit) and wait up to 60 s for the thread."""
        self.service.stop()
        self.thread.join(timeout=60)

    def check_stopped(self) -> None:
        """Raise :class:`DemoError` when the service did not stop, or failed while stopping."""
        if self.thread.is_alive():
            raise DemoError("the service did not stop within 60 s")
        if self.failure:
            raise DemoError(f"the service failed while stopping: {self.failure[0]!r}")


class _ProducerProcess:
    """The producer child process (:func:`_producer_main`) and how many records it reports sent."""

    def __init__(self, items_path: Path, servers: str, topic: str, rate: float):
        env = dict(os.environ)
        # The child imports this package from wherever this process did (a checkout or site-packages).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from stream_dec.demo import _producer_main; sys.exit(_producer_main())",
             str(items_path), servers, topic, repr(float(rate))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.produced = 0
        self._follower = threading.Thread(target=self._follow, name="stream-dec-demo-producer-output", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("sent "):
                self.produced = int(line.split()[1])

    def failure(self) -> str | None:
        """Why the process failed, once it exited with an error; None while it runs or after success."""
        if not self.proc.poll():
            return None
        return self.proc.stderr.read().strip() or f"exit code {self.proc.returncode}"

    def close(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the process to end, then kill it; release its pipes."""
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._follower.join(timeout=5)
        self.proc.stdout.close()
        self.proc.stderr.close()


def _stream_through(svc: _ServiceThread, items: list, n_bad: int, work: Path, servers: str, topic: str, rate: float,
                    timeout_s: float, ui: _Progress) -> None:
    """Produce ``items`` from a child process until the service has handled every one, then stop the service."""
    items_path = work / "stream.npz"
    _write_items(items_path, items)
    producer = _ProducerProcess(items_path, servers, topic, rate)
    finished = False
    try:
        _watch(svc, producer, len(items), n_bad, topic, timeout_s, ui)
        finished = True
    finally:
        svc.stop()
        # After a complete run the producer is only closing; after a failure, stop it now.
        producer.close(wait_s=5 if finished else 0)
    svc.check_stopped()


def _watch(svc: _ServiceThread, producer: _ProducerProcess, n_items: int, n_bad: int, topic: str, timeout_s: float,
           ui: _Progress) -> None:
    """Show progress until the service counted all ``n_items``; raise :class:`DemoError` when a part fails or time runs out."""
    n_valid = n_items - n_bad
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    while True:
        labelled, dead = svc.counts()
        now = time.monotonic()
        finished = labelled + dead >= n_items
        if finished or now - last_print >= (0.25 if ui.tty else 1.0):
            last_print = now
            ui.update(f"produced {producer.produced:>5}/{n_items}  labelled {labelled:>5}/{n_valid}  dead-lettered {dead}/{n_bad}  "
                      f"batches {svc.service.processed_batches:>3}  clusters {svc.service.model.n_clusters_}")
        if finished:
            return
        why = producer.failure()
        if why is not None:
            raise DemoError(f"producing to {topic} failed: {why}")
        if svc.is_down():
            why = repr(svc.failure[0]) if svc.failure else "it went idle before the stream ended"
            raise DemoError(f"the service stopped after labelling {labelled} of {n_valid} records: {why}")
        if now > deadline:
            raise DemoError(f"only {labelled} of {n_valid} records labelled and {dead} of {n_bad} dead-lettered after {timeout_s:.0f} s")
        time.sleep(0.05)


@dataclass
class _Published:
    """What the run's topics hold after the stream: labels by item id, drift records, timings, dead letters."""

    labels: dict[str, int]  # item id -> cluster id of its first assignment
    assignments: int  # assignment records, duplicates included
    drifts: list[dict]
    latency_ms: np.ndarray  # per assignment: label record time - input record time
    stream_s: float  # first record produced to last label published
    dlq: list


def _is_assignment(record) -> bool:
    """Whether an output record is an assignment (not a drift or lifecycle record)."""
    return record.value is not None and b'"kind":"assignment"' in record.value


def _read_published(servers: str, topics: dict[str, str], n_labels: int, n_dead: int, n_inputs: int) -> _Published:
    """Read the output, dead-letter and input topics back and pair each label with its input record."""
    import orjson

    out = _read_topic(servers, topics["output"], lambda recs: sum(_is_assignment(r) for r in recs) >= n_labels, timeout_s=60)
    dlq = _read_topic(servers, topics["dlq"], lambda recs: len(recs) >= n_dead, timeout_s=30)
    inputs = _read_topic(servers, topics["input"], lambda recs: len(recs) >= n_inputs, timeout_s=30)
    produced_ts = {r.offset: r.timestamp for r in inputs}  # the producer's CreateTime
    labels: dict[str, int] = {}
    drifts, label_ts, latency = [], [], []
    assignments = 0
    for r in out:
        v = orjson.loads(r.value)
        if v.get("kind") == "drift":
            drifts.append(v)
        elif v.get("kind") == "assignment":
            assignments += 1
            label_ts.append(r.timestamp)
            labels.setdefault(v["id"], int(v["cluster"]))  # at-least-once: a replayed copy repeats the first
            sent = produced_ts.get(v["offset"])
            if sent is not None and sent >= 0 and r.timestamp >= 0:
                latency.append(r.timestamp - sent)
    # From the first record produced to the last label published, by the records' own clocks
    # (the producer process takes a moment to start, which the wall clock here would count).
    stream_s = max(max(label_ts) - min(produced_ts.values()), 1) / 1000.0
    return _Published(labels, assignments, drifts, np.array(latency, dtype=np.float64), stream_s, dlq)


def _report(sample: Sample, split: DemoSplit, base: _BaseModel, service, pub: _Published, topics: dict[str, str],
            bad: list, seed: int, rate: float, batch_size: int, max_wait_ms: int) -> dict[str, Any]:
    """The demo report: data, split, stream figures, clusters, churn, quality and dead letters."""
    X, y = sample.X, sample.y
    missing = [f"{sample.name}-{row}" for row in split.stream if f"{sample.name}-{row}" not in pub.labels]
    if missing:
        raise DemoError(f"{len(missing)} stream records have no label on {topics['output']} (first: {missing[0]})")
    ids_stream = np.array([pub.labels[f"{sample.name}-{row}"] for row in split.stream])
    final = service.model
    ref_after = final.predict(X[split.ref])
    ids_end = [int(i) for i in final.cluster_ids_]
    n_valid, n_bad = len(split.stream), len(bad)
    update_ms = np.array([d["update_ms"] for d in pub.drifts if d.get("update_ms") is not None])
    return {
        "dataset": _dataset_section(sample, split),
        "split": {"fit": int(len(split.fit)), "ref": int(len(split.ref)), "stream": int(n_valid),
                  "stream_novel": int(np.isin(y[split.stream], split.novel_classes).sum()),
                  "novel_class_first_item": sorted(split.novel_start.values())},
        "topics": topics,
        "seed": seed,
        "training": {"seconds": round(base.model.fit_seconds_, 1), "clusters": len(base.ids_start)},
        "stream": {
            "records_sent": n_valid,
            "malformed_sent": n_bad,
            "offered_rate_per_s": rate or None,
            "labelled": int(len(pub.labels)),
            "duplicates": int(pub.assignments - len(pub.labels)),
            "seconds": round(pub.stream_s, 2),
            "records_per_s": round((n_valid + n_bad) / pub.stream_s, 1),
            "micro_batches": int(service.processed_batches),
            "drift_records": int(len(pub.drifts)),
            "batch_size_max": batch_size,
            "max_wait_ms": max_wait_ms,
        },
        "latency_ms": {"p50": _pct(pub.latency_ms, 50), "p99": _pct(pub.latency_ms, 99), "max": _pct(pub.latency_ms, 100),
                       "items": int(len(pub.latency_ms))},
        "update_ms": {"p50": _pct(update_ms, 50), "p95": _pct(update_ms, 95), "max": _pct(update_ms, 100)},
        "clusters": {
            "start": len(base.ids_start),
            "end": len(ids_end),
            "created_ids": sorted(set(ids_end) - set(base.ids_start)),
            "created_ids_in_drift_records": sorted({int(i) for d in pub.drifts for i in d.get("new_cluster_ids", [])}),
            "used_in_labels": int(len(np.unique(ids_stream))),
            "model_version": int(final.version_),
        },
        # The churn measure of docs/quality-protocol.md: a move into a descendant of the
        # stored id is an announced refinement, not churn.
        "churn_ref": round(float(np.mean(~_kept(base.ref_before, ref_after, final.parent_ids_))), 4),
        "refined_ref": round(float(np.mean(_kept(base.ref_before, ref_after, final.parent_ids_) & (base.ref_before != ref_after))), 4),
        "quality": _quality_section(y, split, ids_stream, ref_after, base.frozen),
        "dlq": {
            "records": int(len(pub.dlq)),
            "reasons": _count(dict(r.headers).get(REASON_HEADER, b"?").decode() for r in pub.dlq),
            "expected": _count(reason for *_, reason in bad),
        },
    }


def _kept(before: np.ndarray, after: np.ndarray, parents: dict[int, int | None]) -> np.ndarray:
    """Whether each item's stored id ``before`` is still valid ``after``: the same id, or an ancestor of the new one.

    >>> _kept(np.array([0, 0, 1]), np.array([0, 5, 5]), {0: None, 1: None, 5: 0}).tolist()
    [True, True, False]
    """
    def lineage(c: int) -> list[int]:
        chain = [c]
        while parents.get(chain[-1]) is not None:
            chain.append(parents[chain[-1]])
        return chain

    return np.array([b in lineage(a) for b, a in zip(before.tolist(), after.tolist())], dtype=bool)


def _dataset_section(sample: Sample, split: DemoSplit) -> dict[str, Any]:
    """The data set: size, known and new class names, attribution."""
    return {
        "name": sample.name,
        "items": int(len(sample.y)),
        "dims": int(sample.X.shape[1]),
        "classes": int(len(np.unique(sample.y))),
        "base_classes": [_class_name(sample, int(c)) for c in split.base_classes],
        "novel_classes": [_class_name(sample, int(c)) for c in split.novel_classes],
        "attribution": sample.attribution,
    }


def _quality_section(y: np.ndarray, split: DemoSplit, ids_stream: np.ndarray, ref_after: np.ndarray,
                     frozen: np.ndarray) -> dict[str, dict[str, float]]:
    """ACC/NMI/ARI of the published labels, of REF after the stream and of the frozen model."""
    y_stream = y[split.stream]
    novel = np.isin(y_stream, split.novel_classes)
    return {
        "stream": _scores(y_stream, ids_stream),
        "stream_novel": _scores(y_stream[novel], ids_stream[novel]),
        "stream_known": _scores(y_stream[~novel], ids_stream[~novel]),
        "ref_after": _scores(y[split.ref], ref_after),
        "frozen_stream": _scores(y_stream, frozen),
        "frozen_stream_novel": _scores(y_stream[novel], frozen[novel]),
    }


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    d, s, q, c, lat = r["dataset"], r["stream"], r["quality"], r["clusters"], r["latency_ms"]

    def sc(x: dict) -> str:
        return f"ACC {x['acc']:.3f}  NMI {x['nmi']:.3f}  ARI {x['ari']:.3f}"

    offered = f"offered {s['offered_rate_per_s']:,.0f}/s" if s["offered_rate_per_s"] else "sent as fast as possible"
    lines = [
        "",
        "== stream-dec demo report ==",
        f"data            {d['name']}: {d['items']} items x {d['dims']} dims, {d['classes']} intents "
        f"({len(d['base_classes'])} known at training, {len(d['novel_classes'])} new mid-stream)",
        f"broker          {r['broker']}",
        f"split           fit {r['split']['fit']}, held-out REF {r['split']['ref']}, stream {r['split']['stream']} "
        f"({r['split']['stream_novel']} of new intents)",
        f"training        {r['training']['seconds']:.1f} s, {r['training']['clusters']} clusters",
        f"throughput      {s['records_per_s']:,.0f} records/s end to end ({s['records_sent'] + s['malformed_sent']} records "
        f"in {s['seconds']:.2f} s, {offered})",
        f"label latency   p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms (produce -> label record)",
        f"micro-batches   {s['micro_batches']} (<= {s['batch_size_max']} records or {s['max_wait_ms']} ms); "
        f"update p50 {r['update_ms']['p50']} ms, p95 {r['update_ms']['p95']} ms",
        f"labelled        {s['labelled']} of {s['records_sent']} stream records ({s['duplicates']} duplicates)",
        f"clusters        {c['start']} at start -> {c['end']} at end; new ids {c['created_ids']}; "
        f"{c['used_in_labels']} ids used in the published labels",
        f"churn on REF    {r['churn_ref']:.2%} of {r['split']['ref']} held-out items changed id (before vs after the stream; "
        f"{r['refined_ref']:.2%} more moved into a child of their id)",
        f"published       all stream items   {sc(q['stream'])}",
        f"  labels        new-intent items   {sc(q['stream_novel'])}",
        f"                known-intent items {sc(q['stream_known'])}",
        f"frozen model    all stream items   {sc(q['frozen_stream'])}   (no online learning, for comparison)",
        f"                new-intent items   {sc(q['frozen_stream_novel'])}",
        f"REF after       {sc(q['ref_after'])}",
        f"dead letters    {r['dlq']['records']} of {s['malformed_sent']} malformed records: "
        + ", ".join(f"{k} {v}" for k, v in r["dlq"]["reasons"].items()),
        f"total           {r['total_seconds']:.1f} s",
    ]
    if r.get("report"):
        lines.append(f"report page     {r['report']} (stream-dec report: ids, sizes, churn per batch)")
    if d["attribution"]:
        lines.append(f"data credit     {d['attribution']}")
    return "\n".join(lines)

"""Helpers of the Kafka tests: service settings for the test broker, streams, sending and reading records.

Test modules import them from here (``from kafka_helpers import ...``), never from each
other. The fixtures (a fresh embedded broker per module) are in conftest_kafka.py.
"""

from __future__ import annotations

import os
import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, encode_float32, encode_json
from stream_dec.settings import load_settings

#: Short group timings: a join takes about half the session timeout (docs/kafka-notes.md).
GROUP_TIMING = {"kafka__session_timeout_ms": 6000, "kafka__heartbeat_interval_ms": 1000}


def consumer_record(partition: int, offset: int, *, topic: str = "in", key: bytes | None = None, value: bytes | None = b"v",
                    headers=(), timestamp: int = 1_700_000_000_000) -> ConsumerRecord:
    """A record as kafka-python's ``poll`` returns it (for tests of the service's rooms without a broker)."""
    key = b"k%d-%d" % (partition, offset) if key is None else key
    return ConsumerRecord(topic, partition, -1, offset, timestamp, 0, key, value, list(headers), None,
                          len(key), len(value or b""), -1)


def run_env(broker, tag: str, ckpt_dir, **over) -> dict:
    """Environment of a ``stream-dec run`` subprocess on the test broker: topics in-/out-/dlq-<tag>, group g-<tag>.

    Defaults: the test group timing, batches of 50 records or 100 ms, a checkpoint every
    4 batches, metrics off, one OpenMP thread. ``over`` sets or replaces variables by
    their full name (``STREAM_DEC_BATCH__MAX_SIZE="64"``).
    """
    env = dict(os.environ)
    env.update(
        STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        STREAM_DEC_KAFKA__GROUP_ID=f"g-{tag}",
        STREAM_DEC_KAFKA__INPUT_TOPIC=f"in-{tag}",
        STREAM_DEC_KAFKA__OUTPUT_TOPIC=f"out-{tag}",
        STREAM_DEC_KAFKA__DLQ_TOPIC=f"dlq-{tag}",
        STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS=str(GROUP_TIMING["kafka__session_timeout_ms"]),
        STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS=str(GROUP_TIMING["kafka__heartbeat_interval_ms"]),
        STREAM_DEC_BATCH__MAX_SIZE="50",
        STREAM_DEC_BATCH__MAX_WAIT_MS="100",
        STREAM_DEC_CHECKPOINT__DIR=str(ckpt_dir),
        STREAM_DEC_CHECKPOINT__INTERVAL_BATCHES="4",
        STREAM_DEC_METRICS__PORT="0",
        OMP_NUM_THREADS="1",
    )
    env.update({k: str(v) for k, v in over.items()})
    return env


def service_settings(broker, ckpt_dir, tag: str, **over):
    """Settings of a service on the test broker: topics in-/out-/dlq-<tag>, group g-<tag>.

    Defaults: batches of 64 records or 200 ms, a checkpoint every 2 batches, metrics on
    an ephemeral port. ``batch_size``, ``interval``, ``metrics_port`` and any
    ``load_settings`` keyword (``kafka__processing_guarantee=...``) override them.
    """
    return load_settings(
        kafka__bootstrap_servers=broker.bootstrap_servers,
        kafka__group_id=f"g-{tag}",
        kafka__input_topic=f"in-{tag}",
        kafka__output_topic=f"out-{tag}",
        kafka__dlq_topic=f"dlq-{tag}",
        **GROUP_TIMING,
        batch__max_size=over.pop("batch_size", 64),
        batch__max_wait_ms=over.pop("batch__max_wait_ms", 200),
        checkpoint__dir=str(ckpt_dir),
        checkpoint__interval_batches=over.pop("interval", 2),
        metrics__port=over.pop("metrics_port", 0),
        metrics__host="127.0.0.1",
        **over,
    )


def setup_stream(broker, blobs, tmp_path, tag: str, partitions: int = 1):
    """Fresh topics in-/out-/dlq-<tag> (``partitions`` input partitions) and a checkpoint dir with a model
    fitted on the base blobs; returns the dir."""
    from stream_dec import StreamDEC
    from tests.conftest import FAST  # here, not at the top: conftest imports this module's importer

    broker.create_topics([f"in-{tag}"], partitions=partitions)
    broker.create_topics([f"out-{tag}", f"dlq-{tag}"])
    ckpt = tmp_path / "ckpt"
    StreamDEC(n_clusters=5, random_state=0, **FAST).fit(blobs["X"]).save(ckpt)
    return ckpt


def send_items(broker, topic: str, items, bad=()) -> None:
    """Produce ``(item_id, vector)`` items, alternately as JSON and float32, then ``bad`` ``(key, value, headers)`` records."""
    p = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for i, (item_id, vec) in enumerate(items):
        if i % 2:
            p.send(topic, key=item_id.encode(), value=encode_float32(vec), headers=[("content-type", CONTENT_TYPE_FLOAT32.encode())])
        else:
            p.send(topic, key=item_id.encode(), value=encode_json(item_id, vec))
    for key, value, headers in bad:
        p.send(topic, key=key, value=value, headers=headers)
    p.flush()
    p.close()


def run_in_thread(service, idle: float | None = 2.5) -> threading.Thread:
    """Start ``service.run`` on a daemon thread (stops after ``idle`` seconds without records)."""
    t = threading.Thread(target=service.run, kwargs={"max_idle_s": idle, "install_signals": False}, daemon=True)
    t.start()
    return t


def wait_for(cond, timeout_s: float = 45) -> bool:
    """Poll ``cond()`` until it is true or ``timeout_s`` passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def published(bootstrap_servers: str, topic: str, partition: int = 0) -> int:
    """Records in one partition of ``topic`` so far: its high watermark (known after a fetch)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap_servers)
    tp = TopicPartition(topic, partition)
    c.assign([tp])
    c.seek(tp, 0)
    c.poll(timeout_ms=100)
    n = c.highwater(tp) or 0
    c.close()
    return n


def committed(broker, group: str, topic: str, partition: int = 0) -> int | None:
    """The offset group ``group`` committed for one partition of ``topic`` (None if none)."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, partition))
    finally:
        c.close()


def consume(bootstrap_servers: str, topic: str, n: int, timeout_s: float = 10.0, from_offset: int = 0) -> list:
    """Read ``n`` records from every partition of ``topic`` (assigned, not subscribed), or fail after ``timeout_s``.

    ``assign()`` instead of group subscription avoids the group join wait. Returns
    kafka-python ``ConsumerRecord`` objects sorted by (partition, offset).
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        request_timeout_ms=5000,
        bootstrap_timeout_ms=5000,
    )
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.05)
        assert partitions, f"topic {topic!r} has no partitions after {timeout_s} s"
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, from_offset)
        records: list = []
        while len(records) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        assert len(records) >= n, f"got {len(records)} of {n} records from {topic!r} within {timeout_s} s"
        # A short extra poll catches records beyond n (tests assert exact counts).
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a subprocess's metrics server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    """The sum over its labels of metric ``name`` scraped from ``/metrics`` on ``port`` (raises if unreachable)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def read_topic(bootstrap_servers: str, topic: str, partition: int = 0, timeout_s: float = 30) -> list:
    """Every record of one partition, to its high watermark (transaction markers take offsets but hold no record)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=100,
                      fetch_max_bytes=8 * 1_048_576, max_partition_fetch_bytes=8 * 1_048_576)
    tp = TopicPartition(topic, partition)
    c.assign([tp])
    c.seek(tp, 0)
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=200).values():
                out.extend(batch)
            hw = c.highwater(tp)
            if hw is not None and c.position(tp) >= hw:
                return out
        raise AssertionError(f"could not read {topic} to its end")
    finally:
        c.close()

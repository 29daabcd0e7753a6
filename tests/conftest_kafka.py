"""Kafka fixtures: a fresh embedded tansu broker per test module, and a consume helper.

Imported by ``conftest.py``. Memory storage never frees data, so each module gets its
own broker; ``assign()`` instead of group subscription avoids the group join wait
(about half the session timeout on tansu, see ../shared/KAFKA_NOTES.md).
"""

from __future__ import annotations

import time

import pytest

from stream_dec.io.broker import EmbeddedBroker


def consume(bootstrap_servers: str, topic: str, n: int, timeout_s: float = 10.0, from_offset: int = 0) -> list:
    """Read ``n`` records from every partition of ``topic`` (assigned, not subscribed), or fail after ``timeout_s``.

    Returns kafka-python ``ConsumerRecord`` objects sorted by (partition, offset).
    """
    from kafka import KafkaConsumer, TopicPartition

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


@pytest.fixture(scope="module")
def broker():
    """A running embedded broker, fresh for each test module (``broker.bootstrap_servers``)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def kafka_consume():
    """The :func:`consume` helper, as a fixture for modules that prefer not to import it."""
    return consume

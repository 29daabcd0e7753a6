"""The model topic on a real broker: topic creation, chunked snapshots, newest() from the high watermark, poll()."""

from __future__ import annotations

import hashlib
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka_helpers import consume, published

from stream_dec.io.modeltopic import (
    CHUNK_BYTES,
    ModelFollower,
    ModelPublisher,
    ModelTopicError,
    _chunked,
    ensure_topics,
)


def payload(version: int, size: int = 5_000) -> bytes:
    """Distinct bytes per version (a stand-in for a snapshot, which is opaque here)."""
    return hashlib.sha256(b"%d" % version).digest() * (size // 32) + bytes(size % 32)


@pytest.fixture()
def producer(broker):
    # kafka-python's default max_request_size (1 MB): every chunk must fit it.
    p = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    yield p
    p.close()


@pytest.fixture()
def follower(broker):
    made = []

    def make(topic):
        made.append(ModelFollower(broker.bootstrap_servers, topic))
        return made[-1]

    yield make
    for f in made:
        f.close()


def publish(producer, topic, version, data, **kw):
    futures = ModelPublisher(producer, topic).publish(version, data, **kw)
    producer.flush()
    return [f.get(timeout=10) for f in futures]


def send_raw(producer, topic, records):
    for key, value, headers in records:
        producer.send(topic, key=key, value=value, headers=headers, partition=0)
    producer.flush()


def partitions(broker, topic):
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, allow_auto_create_topics=False)
    try:
        return c.partitions_for_topic(topic) or set()
    finally:
        c.close()


def test_ensure_topics_creates_exact_partition_counts_and_refuses_a_wrong_one(broker):
    ensure_topics(broker.bootstrap_servers, {"model-a": 1, "feed-a": 3})
    assert partitions(broker, "model-a") == {0}
    assert partitions(broker, "feed-a") == {0, 1, 2}
    ensure_topics(broker.bootstrap_servers, {"model-a": 1, "feed-a": 3})  # existing with the right count: fine

    broker.create_topics("model-b", partitions=4)  # what auto-creation gives on tansu
    with pytest.raises(ModelTopicError, match="'model-b' exists with 4 partitions.*exactly 1"):
        ensure_topics(broker.bootstrap_servers, {"model-b": 1})
    with pytest.raises(ValueError):
        ensure_topics(broker.bootstrap_servers, {"model-c": 0})


def test_records_of_a_chunked_snapshot(broker, producer):
    ensure_topics(broker.bootstrap_servers, {"model-rec": 1})
    data = payload(5, 2 * CHUNK_BYTES + 10)
    metas = publish(producer, "model-rec", 5, data, meta={"sample-rate": "0.5"}, published_at=1_700_000_000.25)
    assert [m.offset for m in metas] == [0, 1, 2]

    records = consume(broker.bootstrap_servers, "model-rec", 3)
    assert [r.key for r in records] == [b"v5"] * 3
    assert [len(r.value) for r in records] == [CHUNK_BYTES, CHUNK_BYTES, 10]
    assert b"".join(r.value for r in records) == data
    for i, r in enumerate(records):
        assert dict(r.headers) == {
            "content-type": b"application/x-stream-dec-model",
            "model-version": b"5",
            "sha256": hashlib.sha256(data).hexdigest().encode(),
            "chunk": b"%d/3" % i,
            "published-at": b"1700000000.25",
            "x-sample-rate": b"0.5",
        }


def test_newest_is_the_last_valid_snapshot_and_corrupt_ones_fall_back(broker, producer, follower):
    topic = "model-newest"
    ensure_topics(broker.bootstrap_servers, {topic: 1})
    publish(producer, topic, 1, payload(1))
    publish(producer, topic, 2, payload(2, CHUNK_BYTES + 1234))  # chunked in 2
    publish(producer, topic, 3, payload(3), meta={"sample-rate": "0.25"}, published_at=1_700_000_123.5)

    got = follower(topic).newest(timeout_s=20)
    assert (got.version, got.payload, got.meta, got.published_at, got.offset) == (3, payload(3), {"sample-rate": "0.25"}, 1_700_000_123.5, 3)
    assert got.sha256 == hashlib.sha256(payload(3)).hexdigest()

    # Version 4: its second chunk damaged, so the whole fails its checksum.
    (k0, v0, h0), (k1, v1, h1) = _chunked(4, payload(4, CHUNK_BYTES + 100))
    send_raw(producer, topic, [(k0, v0, h0), (k1, b"X" + v1[1:], h1)])
    f = follower(topic)
    got = f.newest(timeout_s=20)
    assert (got.version, got.payload, f.rejected) == (3, payload(3), 1)

    # Version 5: three chunks, the middle one missing.
    c0, _, c2 = _chunked(5, payload(5, 2 * CHUNK_BYTES + 7))
    send_raw(producer, topic, [c0, c2])
    f = follower(topic)
    got = f.newest(timeout_s=20)
    assert (got.version, f.rejected) == (3, 2)

    # A record that is no model chunk after them also counts; the valid version 2 before 3 is not returned.
    send_raw(producer, topic, [(b"x", b"not a snapshot", [("content-type", b"text/plain")])])
    f = follower(topic)
    assert (f.newest(timeout_s=20).version, f.rejected) == (3, 3)


def test_newest_reads_back_past_many_bad_records_and_counts_each_once(broker, producer, follower):
    topic = "model-window"
    ensure_topics(broker.bootstrap_servers, {topic: 1})
    data = payload(1, 2 * CHUNK_BYTES + 1)
    publish(producer, topic, 1, data)  # offsets 0-2
    # Six single-chunk versions whose checksum fails: the first window (8 records back from
    # the high watermark 9) starts inside version 1, so it must be doubled to reach offset 0.
    bad = []
    for v in range(2, 8):
        ((k, value, headers),) = _chunked(v, payload(v))
        bad.append((k, value[::-1], headers))
    send_raw(producer, topic, bad)
    assert published(broker.bootstrap_servers, topic) == 9

    f = follower(topic)
    got = f.newest(timeout_s=20)
    assert (got.version, got.payload, got.offset) == (1, data, 2)
    assert f.rejected == 6
    again = f.newest(timeout_s=20)  # a second read-back counts nothing twice
    assert (again.version, f.rejected) == (1, 6)


def poll_until(f, n, timeout_s=20):
    """poll() until ``n`` snapshots came (a chunked one may need several fetches), then once more."""
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += f.poll(timeout_ms=500)
    return got + f.poll(timeout_ms=300)


def test_poll_returns_newer_versions_in_order_and_never_goes_back(broker, producer, follower):
    topic = "model-poll"
    ensure_topics(broker.bootstrap_servers, {topic: 1})
    publish(producer, topic, 1, payload(1))
    publish(producer, topic, 2, payload(2))
    f = follower(topic)
    assert f.newest(timeout_s=20).version == 2
    assert f.poll(timeout_ms=300) == []

    publish(producer, topic, 3, payload(3))
    publish(producer, topic, 1, payload(1))  # an older version again (a standby catching up)
    publish(producer, topic, 3, payload(3))  # version 3 republished, identical
    ((k, v, h),) = _chunked(4, payload(4))
    send_raw(producer, topic, [(k, v + b"!", h)])  # version 4 corrupt
    publish(producer, topic, 5, payload(5, CHUNK_BYTES * 2 + 3))  # chunked
    publish(producer, topic, 4, payload(4))  # below 5, once 5 is returned

    got = poll_until(f, 2)
    assert [(p.version, p.payload) for p in got] == [(3, payload(3)), (5, payload(5, CHUNK_BYTES * 2 + 3))]
    assert f.rejected == 1
    assert f.last_version == 5

    publish(producer, topic, 6, payload(6))
    assert [p.version for p in poll_until(f, 1)] == [6]

    # How a predictor polls between batches: without waiting, until the chunks are all in.
    publish(producer, topic, 7, payload(7, CHUNK_BYTES + 1))
    got = []
    for _ in range(400):
        got += f.poll()
        if got:
            break
        time.sleep(0.05)
    assert [(p.version, p.payload) for p in got] == [(7, payload(7, CHUNK_BYTES + 1))]


def test_transactional_publication_is_read(broker, follower):
    topic = "model-txn"
    ensure_topics(broker.bootstrap_servers, {topic: 1})
    p = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, transactional_id="model-txn-test")
    try:
        p.init_transactions()
        for version in (1, 2):
            p.begin_transaction()
            ModelPublisher(p, topic).publish(version, payload(version, CHUNK_BYTES + 9))
            p.commit_transaction()
    finally:
        p.close()
    got = follower(topic).newest(timeout_s=20)
    assert (got.version, got.payload) == (2, payload(2, CHUNK_BYTES + 9))


def test_follower_on_an_empty_or_missing_topic(broker, producer, follower):
    ensure_topics(broker.bootstrap_servers, {"model-empty": 1})
    f = follower("model-empty")
    assert f.newest(timeout_s=1.5) is None
    assert f.rejected == 0
    # It keeps following: the first snapshot published afterwards comes by poll().
    publish(producer, "model-empty", 1, payload(1))
    assert [p.version for p in poll_until(f, 1)] == [1]

    g = follower("model-missing")
    assert g.newest(timeout_s=1.5) is None
    assert g.poll(timeout_ms=200) == []
    assert partitions(broker, "model-missing") == set()  # the follower did not create it


def test_poll_before_newest_returns_the_newest(broker, producer, follower):
    topic = "model-first-poll"
    ensure_topics(broker.bootstrap_servers, {topic: 1})
    for v in (1, 2):
        publish(producer, topic, v, payload(v))
    f = follower(topic)
    assert [p.version for p in f.poll(timeout_ms=20_000)] == [2]
    assert f.poll(timeout_ms=200) == []


def test_publish_refuses_bad_arguments(producer):
    pub = ModelPublisher(producer, "unused")
    for bad in ({"version": -1}, {"version": True}, {"version": 1, "meta": {"": "x"}},
                {"version": 1, "meta": {"a": 1}}, {"version": 1, "published_at": float("nan")}):
        with pytest.raises(ValueError):
            pub.publish(payload=b"x", **bad)

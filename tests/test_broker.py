"""The embedded tansu broker: lifecycle, failure messages, topics, and a real produce -> consume round trip."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest_kafka import consume
from kafka import KafkaProducer

from stream_dec.io.broker import BrokerError, EmbeddedBroker
from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, decode_record, dlq_headers, encode_float32, encode_json


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_start_and_stop():
    b = EmbeddedBroker()
    assert not b.is_running and "stopped" in repr(b)
    with pytest.raises(BrokerError, match="not running"):
        b.bootstrap_servers
    t0 = time.monotonic()
    with b:
        assert time.monotonic() - t0 < 5
        assert b.is_running and b.bootstrap_servers == f"127.0.0.1:{b.port}" and _accepts(b.port)
        assert "ready" in b.log_tail() and b.log_path.exists()
        log = b.log_path
        pid = b.pid
    assert not b.is_running and not _alive(pid) and not _accepts(b.port)
    assert not log.exists()  # the temporary log goes with the broker
    b.stop()  # idempotent


def test_port_taken_by_another_broker(broker):
    with pytest.raises(BrokerError, match=rf"exited with code .* on 127\.0\.0\.1:{broker.port}") as info:
        EmbeddedBroker(port=broker.port, startup_timeout=5).start()
    assert "in use" in str(info.value)  # the broker's own log explains why
    assert broker.is_running


def test_missing_or_broken_binary(tmp_path):
    with pytest.raises(BrokerError, match="does not exist or is not executable"):
        EmbeddedBroker(binary=tmp_path / "tansu").start()
    with pytest.raises(BrokerError, match="exited with code 1"):
        EmbeddedBroker(binary="/bin/false").start()
    silent = tmp_path / "silent.sh"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    b = EmbeddedBroker(binary=silent, startup_timeout=0.5)
    with pytest.raises(BrokerError, match="did not accept connections .* within"):
        b.start()
    assert not _alive(b.pid)  # a broker that never came up is not left behind


def test_broker_dies_with_its_parent():
    code = "import time; from stream_dec.io.broker import EmbeddedBroker; b = EmbeddedBroker().start(); print(b.pid, flush=True); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the broker outlived a SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()


def test_create_topics(broker):
    broker.create_topics(["three", "one"], partitions=3)
    broker.create_topics("one")  # exists: kept
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert c.partitions_for_topic("three") == {0, 1, 2} and c.partitions_for_topic("one") == {0, 1, 2}
    finally:
        c.close()
    with pytest.raises(BrokerError, match="already exists"):
        broker.create_topics("one", exist_ok=False)
    with pytest.raises(ValueError, match="partitions"):
        broker.create_topics("zero", partitions=0)


def test_produce_consume_round_trip(broker):
    broker.create_topics(["rt", "rt.dlq"])
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 48)).astype(np.float32)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5, batch_size=1_000_000)
    extra = ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    for i, x in enumerate(X):
        key = f"item-{i}"
        if i % 2:
            producer.send("rt", key=key.encode(), value=encode_float32(x), headers=[("content-type", CONTENT_TYPE_FLOAT32.encode()), extra])
        else:
            producer.send("rt", key=key.encode(), value=encode_json(key, x), headers=[extra])
    bad = b'{"id": "x", "embedding": [1, 2]}'
    producer.send("rt.dlq", key=b"x", value=bad, headers=dlq_headers([extra], "rt", 0, 7, "validate", "wrong_dimension", "expected 48 values, got 2"))
    producer.flush(10)
    producer.close()

    records = consume(broker.bootstrap_servers, "rt", len(X))
    assert [r.offset for r in records] == list(range(len(X)))
    for r in records:
        item_id, vec = decode_record(r.key, r.value, r.headers, dim=48)
        assert item_id == f"item-{r.offset}" and np.array_equal(vec, X[r.offset])
        assert extra in r.headers

    (dead,) = consume(broker.bootstrap_servers, "rt.dlq", 1)
    assert dead.key == b"x" and dead.value == bad
    headers = dict(dead.headers)
    assert headers["traceparent"] == extra[1] and headers["__connect.errors.offset"] == b"7"
    assert headers["__stream_dec.errors.reason"] == b"wrong_dimension"

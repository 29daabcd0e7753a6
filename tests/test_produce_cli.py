"""`stream-dec produce` as a real subprocess against the embedded broker, checked by consuming its records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest_kafka import consume

from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, CONTENT_TYPE_JSON, decode_record


def _produce(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "stream_dec.cli", "produce", *args], capture_output=True, text=True, timeout=60, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"produce {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("produce")
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 32)).astype(np.float32)
    np.save(d / "x.npy", X)
    np.savez(d / "x.npz", X=X.astype(np.float64), y=np.arange(300) % 3)
    return {"dir": d, "X": X}


@pytest.mark.parametrize("fmt,source", [("json", "x.npz"), ("float32", "x.npy")])
def test_produce_both_formats(broker, data, fmt, source):
    topic = f"emb-{fmt}"
    out = _produce(
        "--data", str(data["dir"] / source), "--topic", topic, "--bootstrap-servers", broker.bootstrap_servers,
        "--format", fmt, "--key-prefix", "doc-", "--create-topic", "--progress-every", "100",
    )  # fmt: skip
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["records"] == 300 and summary["topic"] == topic and summary["format"] == fmt and summary["records_per_s"] > 0
    assert out.stderr.count("records/s") == 3  # progress every 100 records

    records = consume(broker.bootstrap_servers, topic, 300)
    assert len(records) == 300 and [r.offset for r in records] == list(range(300))
    ctype = (CONTENT_TYPE_JSON if fmt == "json" else CONTENT_TYPE_FLOAT32).encode()
    for r in records:
        assert r.key == f"doc-{r.offset}".encode() and dict(r.headers)["content-type"] == ctype
        item_id, vec = decode_record(r.key, r.value, r.headers, dim=32)
        assert item_id == f"doc-{r.offset}" and np.array_equal(vec, data["X"][r.offset])
    if fmt == "float32":
        assert all(len(r.value) == 32 * 4 for r in records)


def test_start_limit_partitions_and_settings_defaults(broker, data):
    # No --bootstrap-servers/--topic: they come from the service settings in the environment.
    env = {**os.environ, "STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAM_DEC_KAFKA__INPUT_TOPIC": "split"}
    out = _produce("--data", str(data["dir"] / "x.npy"), "--start", "250", "--limit", "40", "--partitions", "3", "--format", "float32", env=env)
    assert json.loads(out.stdout)["records"] == 40  # rows 250..289 (a 40 limit after a 250 start)
    records = consume(broker.bootstrap_servers, "split", 40)
    assert len(records) == 40 and {r.partition for r in records} == {0, 1, 2}  # keys spread over the partitions
    assert sorted(int(r.key) for r in records) == list(range(250, 290))
    for r in records:
        assert np.array_equal(decode_record(r.key, r.value, r.headers)[1], data["X"][int(r.key)])


def test_produce_does_not_load_torch(broker, data):
    code = (
        "import sys; from stream_dec.cli import main; "
        f"rc = main(['produce', '--data', {str(data['dir'] / 'x.npy')!r}, '--topic', 'notorch', "
        f"'--bootstrap-servers', {broker.bootstrap_servers!r}, '--limit', '5', '--create-topic']); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_clear_errors(broker, data, tmp_path):
    x = str(data["dir"] / "x.npy")
    cases = [
        (["--data", x, "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--timeout", "1"], "cannot reach a broker at 127.0.0.1:1"),
        (["--data", str(tmp_path / "missing.npy"), "--topic", "t", "--bootstrap-servers", broker.bootstrap_servers], "does not exist"),
        (["--data", x, "--topic", "bad topic", "--bootstrap-servers", broker.bootstrap_servers], "legal Kafka topic name"),
        (["--data", x, "--topic", "t", "--bootstrap-servers", broker.bootstrap_servers, "--start", "300"], "no rows to send"),
    ]
    np.save(tmp_path / "flat.npy", np.ones(5))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    cases.append((["--data", str(tmp_path / "junk.npz"), "--topic", "t", "--bootstrap-servers", broker.bootstrap_servers], "not a .npz file"))
    cases.append((["--data", x, "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--timeout", "1", "--create-topic"], "127.0.0.1:1"))
    cases.append((["--data", str(tmp_path / "flat.npy"), "--topic", "t", "--bootstrap-servers", broker.bootstrap_servers], "expected a 2-d numeric array"))
    env = {**os.environ, "STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS": "nonsense"}
    cases.append((["--data", x], "STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS"))
    for args, message in cases:
        proc = _produce(*args, check=False, env=env if len(args) == 2 else None)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "stream-dec produce: error:" in proc.stderr and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
    assert _produce("--data", x, "--limit", "-1", check=False).returncode == 2  # argparse rejects it


def test_help():
    top = subprocess.run([sys.executable, "-m", "stream_dec.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert "produce" in top.stdout
    out = _produce("--help").stdout
    for flag in ("--data", "--topic", "--bootstrap-servers", "--format", "--limit", "--key-prefix", "--create-topic", "--partitions"):
        assert flag in out


def test_the_producer_factory_admits_megabyte_values(broker):
    from stream_dec.io.broker import create_topics
    from stream_dec.io.producer import make_producer, producer_config

    # kafka-python's own 1 MB max_request_size refuses a 1 MiB value; the factory's does not.
    assert producer_config(broker.bootstrap_servers)["max_request_size"] > 1_048_576 + 65_536
    create_topics(broker.bootstrap_servers, ["big"], partitions=1)
    producer = make_producer(broker.bootstrap_servers, timeout_s=10)
    value = bytes(range(256)) * 4096  # 1 MiB
    meta = producer.send("big", key=b"k", value=value).get(timeout=30)
    producer.close(timeout=5)
    assert meta.offset == 0 and meta.serialized_value_size == len(value)
    records = consume(broker.bootstrap_servers, "big", 1)
    assert len(records) == 1 and records[0].value == value


def test_producer_config_acks_and_idempotence():
    from stream_dec.io.producer import PACED_LINGER_MS, producer_config

    assert producer_config("h:1")["acks"] == "all" and producer_config("h:1")["enable_idempotence"] is True
    for acks in ("0", "1", 0, 1):
        cfg = producer_config("h:1", acks=acks)
        assert cfg["acks"] == int(acks) and cfg["enable_idempotence"] is False  # idempotence needs acks=all
    assert "max_block_ms" not in producer_config("h:1")  # the client's own timeouts unless asked
    cfg = producer_config("h:1", timeout_s=4, linger_ms=PACED_LINGER_MS, transactional_id="tx")
    assert (cfg["max_block_ms"], cfg["request_timeout_ms"], cfg["delivery_timeout_ms"]) == (4000, 4000, 30000)
    assert (cfg["linger_ms"], cfg["transactional_id"]) == (PACED_LINGER_MS, "tx")
    with pytest.raises(ValueError, match="bootstrap_servers"):
        producer_config(" , ")

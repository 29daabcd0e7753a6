"""Outages against real brokers and processes: no broker at start, a broker restarted empty, outputs across a restart.

The embedded broker keeps its log in memory, so a broker stopped and started again on
the same port comes back empty: the service's checkpoint offsets then lie past the end
of the log (docs/kafka-notes.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from kafka_helpers import consume, run_in_thread, send_items, service_settings, setup_stream, wait_for

from stream_dec.io.broker import EmbeddedBroker, free_port
from stream_dec.service.outage import EXIT_OUTAGE, Outage


@pytest.fixture
def own_broker():
    """A broker this test may stop and start again (same port, empty storage), also from another thread."""
    with EmbeddedBroker(die_with_parent=False) as b:
        yield b


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _items(X, prefix: str):
    return [(f"{prefix}{i}", X[i]) for i in range(len(X))]


def _run_without_broker(blobs, tmp_path, max_outage_s: int):
    """A ``stream-dec run`` process with a checkpoint but no broker at its address: (process, broker port, metrics port)."""
    from stream_dec import StreamDEC
    from tests.conftest import FAST

    ckpt = tmp_path / "ckpt"
    StreamDEC(n_clusters=5, random_state=0, **FAST).fit(blobs["X"]).save(ckpt)
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", STREAM_DEC_KAFKA__INPUT_TOPIC="in-x",
               STREAM_DEC_CHECKPOINT__DIR=str(ckpt), STREAM_DEC_METRICS__PORT=str(metrics_port),
               STREAM_DEC_KAFKA__MAX_OUTAGE_S=str(max_outage_s), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "stream_dec.cli", "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, port, metrics_port


def test_unreachable_broker_at_start_waits_with_503_then_exits_3_with_one_line(blobs, tmp_path):
    proc, port, metrics_port = _run_without_broker(blobs, tmp_path, max_outage_s=11)
    try:
        # Between the first failed try and the give-up /healthz names the outage.
        seen = wait_for(lambda: _get(f"http://127.0.0.1:{metrics_port}/healthz")[1].startswith("outage:"), timeout_s=60)
        health = _get(f"http://127.0.0.1:{metrics_port}/healthz")
        metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert seen and health[0] == 503, health
    assert f"127.0.0.1:{port}" in health[1]
    assert _sample(metrics, "stream_dec_broker_up") == 0.0
    assert proc.returncode == EXIT_OUTAGE, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stream-dec run: error: giving up: broker (input topic 'in-x') unreachable on 127.0.0.1:"), last
    assert "STREAM_DEC_KAFKA__MAX_OUTAGE_S=11" in last


def test_sigterm_while_waiting_for_the_broker_at_start_exits_0(blobs, tmp_path):
    """Stopped before anything was read: nothing is owed, so it is a clean stop, not an outage."""
    proc, _port, metrics_port = _run_without_broker(blobs, tmp_path, max_outage_s=100)
    try:
        waiting = wait_for(lambda: _get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 503, timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)  # one connection try (10 s) at most, not the 100 s outage
    finally:
        proc.kill()
    assert waiting
    assert proc.returncode == 0, err[-2000:]
    assert "stopped before the broker answered" in err and "Traceback" not in err


def test_broker_restarted_empty_mid_stream_resets_to_the_log_start_and_labels_what_comes(own_broker, blobs, tmp_path):
    broker, tag = own_broker, "reset"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    X = blobs["X"]
    settings = service_settings(broker, ckpt, tag, metrics_port=free_port(), interval=1)
    from stream_dec.service import StreamService

    svc = StreamService(settings)
    t = run_in_thread(svc, idle=None)
    try:
        send_items(broker, f"in-{tag}", _items(X[:300], "old-"))
        assert wait_for(lambda: svc.offsets.get(0) == 300, timeout_s=90), svc.offsets
        base = f"http://127.0.0.1:{svc.server.port}"

        broker.stop()
        broker.start()  # same port, empty log: the service's position 300 is past its end
        broker.create_topics([f"in-{tag}", f"out-{tag}", f"dlq-{tag}"])
        send_items(broker, f"in-{tag}", _items(X[300:500], "new-"))

        out = consume(broker.bootstrap_servers, f"out-{tag}", 200, timeout_s=120)
        ids = {json.loads(r.value)["id"] for r in out if json.loads(r.value)["kind"] == "assignment"}
        assert ids == {f"new-{i}" for i in range(200)}
        assert wait_for(lambda: svc.offsets.get(0) == 200, timeout_s=30), svc.offsets
        metrics = _get(f"{base}/metrics")[1]
        assert _sample(metrics, 'stream_dec_offset_resets_total{where="past_end"}') == 1.0
        assert _sample(metrics, 'stream_dec_input_position_offset{partition="0"}') == 200.0
        assert _sample(metrics, 'stream_dec_input_highwater_offset{partition="0"}') == 200.0
        assert _get(f"{base}/healthz")[0] == 200
    finally:
        svc.stop()
        t.join(60)
    assert not t.is_alive()
    # The reset was checkpointed: a restart resumes in the new log, not at offset 300.
    from stream_dec.service.checkpointer import checkpoint_offsets, read_newest

    assert checkpoint_offsets(read_newest(settings), f"in-{tag}") == {0: 200}


def test_outputs_sent_before_a_broker_restart_are_sent_again_by_a_new_producer(own_broker, tmp_path):
    """The old idempotent producer cannot deliver after a restart; the retry replaces it and loses nothing."""
    from stream_dec.service.clients import make_output_producer
    from stream_dec.service.metrics import ServiceMetrics
    from stream_dec.service.outputs import AtLeastOnceOutputs

    broker, tag = own_broker, "acks"
    broker.create_topics([f"out-{tag}"])
    settings = service_settings(broker, tmp_path, tag, kafka__max_outage_s=100, kafka__retry_backoff_ms=200)
    metrics = ServiceMetrics()
    outage = Outage(settings, metrics)
    outputs = AtLeastOnceOutputs(settings, make_output_producer(settings), None, outage=outage)
    outputs.partitions_for(f"out-{tag}")  # metadata cached: sends are queued while the broker is away
    broker.stop()
    outputs.send_many(f"out-{tag}", [b"k%d" % i for i in range(50)], [b"v%d" % i for i in range(50)], [0] * 50)

    def come_back():
        time.sleep(3)
        broker.start()
        broker.create_topics([f"out-{tag}"])

    back = threading.Thread(target=come_back)
    back.start()
    outputs.await_acks()
    back.join()
    outputs.producer.close()
    got = consume(broker.bootstrap_servers, f"out-{tag}", 50, timeout_s=30)
    assert sorted({r.value for r in got}) == sorted(b"v%d" % i for i in range(50))
    assert not outage.active and metrics.broker_up._value.get() == 1
    assert metrics.outage_seconds._value.get() >= 3


def test_checkpoint_past_the_log_end_exits_4_under_policy_fail_and_resumes_at_the_start_under_earliest(blobs, tmp_path):
    """A checkpoint from a broker that is gone: `fail` stops with status 4 and a message; `earliest` labels the new log."""
    tag, X = "policy", blobs["X"]
    with EmbeddedBroker() as old:
        ckpt = setup_stream(old, blobs, tmp_path, tag)
        from stream_dec.service import StreamService

        svc = StreamService(service_settings(old, ckpt, tag))
        t = run_in_thread(svc, idle=None)
        send_items(old, f"in-{tag}", _items(X[:100], "old-"))
        assert wait_for(lambda: svc.offsets.get(0) == 100, timeout_s=90), svc.offsets
        svc.stop()
        t.join(60)
    with EmbeddedBroker() as new:  # the checkpoint says offset 100; this log holds 10 records
        new.create_topics([f"in-{tag}", f"out-{tag}", f"dlq-{tag}"])
        send_items(new, f"in-{tag}", _items(X[100:110], "new-"))
        env = dict(os.environ, STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS=new.bootstrap_servers, STREAM_DEC_KAFKA__GROUP_ID=f"g-{tag}",
                   STREAM_DEC_KAFKA__INPUT_TOPIC=f"in-{tag}", STREAM_DEC_KAFKA__OUTPUT_TOPIC=f"out-{tag}",
                   STREAM_DEC_KAFKA__DLQ_TOPIC=f"dlq-{tag}", STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS="3000",
                   STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS="500", STREAM_DEC_CHECKPOINT__DIR=str(ckpt),
                   STREAM_DEC_METRICS__PORT="0", OMP_NUM_THREADS="1")
        run = [sys.executable, "-m", "stream_dec.cli", "run", "--exit-when-idle", "5"]
        failed = subprocess.run(run, env=dict(env, STREAM_DEC_KAFKA__OFFSET_RESET_POLICY="fail"), capture_output=True,
                                text=True, timeout=180)
        assert failed.returncode == 4, failed.stderr[-2000:]
        assert "Traceback" not in failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith(f"stream-dec run: error: input positions outside the log of 'in-{tag}': partition 0 at 100 (past end 10)"), last
        ok = subprocess.run(run, env=env, capture_output=True, text=True, timeout=180)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "policy earliest: resuming at the log's start 0" in ok.stderr
        out = consume(new.bootstrap_servers, f"out-{tag}", 10, timeout_s=30)
        ids = {json.loads(r.value)["id"] for r in out if json.loads(r.value)["kind"] == "assignment"}
        assert ids == {f"new-{i}" for i in range(10)}


def test_dead_letters_held_up_by_a_broker_restart_are_sent_again_not_skipped(own_broker, tmp_path, monkeypatch):
    """An outage longer than the producer's own delivery timeout is waited out for dead letters too.

    None is counted as refused, and all arrive once the broker is back. (The delivery
    timeout is cut to 2 s here so that the outage outlasts it quickly.)
    """
    from kafka_helpers import consumer_record

    from stream_dec.io.codecs import decode_batch
    from stream_dec.service import deadletters
    from stream_dec.service.deadletters import DeadLetters
    from stream_dec.service.metrics import ServiceMetrics

    monkeypatch.setattr(deadletters, "ACK_TIMEOUT_S", 2)
    monkeypatch.setattr(deadletters, "TIMEOUT_S", 1)

    broker, tag = own_broker, "dlq-outage"
    broker.create_topics([f"dlq-{tag}"])
    settings = service_settings(broker, tmp_path, tag, kafka__max_outage_s=100, kafka__retry_backoff_ms=200)
    metrics = ServiceMetrics()
    outage = Outage(settings, metrics)
    dead = DeadLetters(settings, metrics)
    dead.start(outage, broker_up=lambda: broker.is_running)
    records = [consumer_record(0, i, key=b"bad-%d" % i, value=b"{not json %d" % i) for i in range(6)]
    failures = decode_batch([(r.key, r.value, r.headers) for r in records], dim=4).failures
    assert len(failures) == 6
    dead.send(records[:1], failures[:1])  # the DLQ topic's metadata is cached before the outage
    dead.await_acks()
    broker.stop()
    dead.send(records, [(pos, err) for pos, err in failures if pos > 0])

    def come_back():
        time.sleep(6)
        broker.start()
        broker.create_topics([f"dlq-{tag}"])

    back = threading.Thread(target=come_back)
    back.start()
    dead.await_acks()
    back.join()
    dead.close()
    assert sum(dead.failed.values()) == 0 and dead.delivered["bad_json"] == 6
    got = consume(broker.bootstrap_servers, f"dlq-{tag}", 5, timeout_s=30)
    # The restarted broker kept none of the first. A dead letter sent by the old producer
    # and again by the new one is at-least-once: a duplicate is an exact copy.
    assert sorted({r.key for r in got}) == [b"bad-%d" % i for i in range(1, 6)]
    copies = {}
    for r in got:
        assert copies.setdefault(r.key, (r.value, r.headers)) == (r.value, r.headers)
    assert not outage.active and metrics.outage_seconds._value.get() >= 3

"""The Kafka service end to end on a real (embedded) broker: labels, drift, DLQ, metrics, offsets."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from kafka_helpers import consume, run_in_thread, send_items, service_settings, setup_stream

from stream_dec import StreamDEC
from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32
from stream_dec.service import StreamService
from tests.conftest import FAST

SCHEMAS = Path(__file__).resolve().parents[1] / "stream_dec" / "schemas"


def _schema(name):
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


@pytest.fixture(scope="module")
def base_model(blobs, tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    StreamDEC(n_clusters=5, random_state=0, **FAST).fit(blobs["X"]).save(d / "base.sdec")
    return d / "base.sdec"


def _fresh_ckpt_dir(base_model, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    StreamDEC.load(base_model).save(d)
    return d


def test_labels_drift_dlq_and_metrics(broker, blobs, base_model, tmp_path):
    tag = "e2e"
    broker.create_topics([f"in-{tag}", f"out-{tag}", f"dlq-{tag}"])
    X = np.concatenate([blobs["X"][:300], blobs["X_new"][:100]])
    items = [(f"item-{i}", X[i]) for i in range(len(X))]
    bad = [
        (b"b1", b"{not json", None),
        (b"b2", json.dumps({"id": "x", "embedding": [1.0, 2.0]}).encode(), None),  # wrong dimension
        (b"b3", json.dumps({"id": "y", "embedding": [float("nan")] * 24}).encode().replace(b"NaN", b"NaN"), None),
        (b"b4", b"\x00\x00\x80", [("content-type", CONTENT_TYPE_FLOAT32.encode())]),  # not a multiple of 4 bytes
        (b"b5", json.dumps({"embedding": [0.0] * 24}).encode(), None),  # no id
    ]
    send_items(broker, f"in-{tag}", items, bad)

    ckpt = _fresh_ckpt_dir(base_model, tmp_path)
    service = StreamService(service_settings(broker, ckpt, tag, metrics_port=0))
    from stream_dec.service.metrics import MetricsServer

    server = MetricsServer(service.metrics, "127.0.0.1", 0, stale_after_s=30).start()
    thread = run_in_thread(service)
    deadline = time.monotonic() + 60
    while service.processed_batches < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    health = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    assert health.status == 200
    thread.join(timeout=60)
    assert not thread.is_alive()
    server.stop()

    out = consume(broker.bootstrap_servers, f"out-{tag}", len(items))
    values = [json.loads(r.value) for r in out]
    assignments = [v for v in values if v["kind"] == "assignment"]
    drifts = [v for v in values if v["kind"] == "drift"]
    assert sorted(a["id"] for a in assignments) == sorted(i for i, _ in items)  # each valid record labelled once
    assert all(r.key.decode() == v["id"] for r, v in zip(out, values) if v["kind"] == "assignment")
    assert len(drifts) >= 2 and sum(d["n_items"] for d in drifts) == len(items)
    for v in assignments[:50]:
        jsonschema.validate(v, _schema("assignment"))
    for d in drifts:
        jsonschema.validate(d, _schema("drift"))
    # Offsets of the assignments point back to the input records.
    assert sorted(a["offset"] for a in assignments) == [o for o in range(len(items) + len(bad)) if o < len(items)]

    dlq = consume(broker.bootstrap_servers, f"dlq-{tag}", len(bad))
    assert len(dlq) == len(bad)
    reasons = {r.key: dict(r.headers)["__stream_dec.errors.reason"].decode() for r in dlq}
    assert reasons[b"b1"] == "bad_json" and reasons[b"b2"] == "wrong_dimension"
    assert reasons[b"b4"] == "bad_length" and reasons[b"b5"] == "missing_id"
    assert [r.value for r in dlq] == [b for _, b, _ in bad]  # original bytes
    assert all(dict(r.headers)["__connect.errors.topic"] == f"in-{tag}".encode() for r in dlq)

    assert 'stream_dec_records_total{outcome="labelled"}' in page
    assert "stream_dec_dlq_records_total" in page and "stream_dec_update_seconds_bucket" in page
    labelled = service.metrics.records.labels("labelled")._value.get()
    assert labelled == len(items)

    # The final checkpoint holds the model and the next offset of the input partition.
    resumed = StreamDEC.load(ckpt)
    assert resumed.checkpoint_extra_["offsets"][f"in-{tag}"] == {"0": len(items) + len(bad)}
    assert resumed.version_ == service.model.version_ > 0


def test_restart_resumes_from_checkpoint_without_relabelling(broker, blobs, base_model, tmp_path):
    tag = "resume"
    broker.create_topics([f"in-{tag}", f"out-{tag}", f"dlq-{tag}"])
    ckpt = _fresh_ckpt_dir(base_model, tmp_path)
    first = [(f"a-{i}", blobs["X"][i]) for i in range(200)]
    send_items(broker, f"in-{tag}", first)
    s1 = StreamService(service_settings(broker, ckpt, tag))
    s1.run(max_idle_s=2.0, install_signals=False)
    second = [(f"b-{i}", blobs["X"][200 + i]) for i in range(100)]
    send_items(broker, f"in-{tag}", second)
    s2 = StreamService(service_settings(broker, ckpt, tag))
    assert s2.model.version_ == s1.model.version_
    s2.run(max_idle_s=2.0, install_signals=False)
    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", 300)]
    ids = [v["id"] for v in out if v["kind"] == "assignment"]
    assert sorted(ids) == sorted([i for i, _ in first] + [i for i, _ in second])  # nothing twice, nothing lost


def test_no_checkpoint_is_a_clear_error(broker, tmp_path):
    from stream_dec.service import NoCheckpointError

    with pytest.raises(NoCheckpointError, match="stream-dec train"):
        StreamService(service_settings(broker, tmp_path / "empty", "nock"))


def test_published_labels_equal_offline_streamdec_on_the_same_batches(broker, blobs, tmp_path):
    """The service adds no behaviour of its own: same seed, same batch boundaries, same labels."""
    tag = "offline"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    X = np.concatenate([blobs["X"][:220], blobs["X_new"][:80]])
    X = X[np.random.default_rng(2).permutation(len(X))]
    send_items(broker, f"in-{tag}", [(f"o-{i}", X[i]) for i in range(len(X))])
    # A long wait: batches are cut by size only, so their boundaries are known.
    settings = service_settings(broker, ckpt, tag, batch_size=64, interval=1000, batch__max_wait_ms=3000)
    offline = StreamDEC.load(ckpt)
    StreamService(settings).run(max_idle_s=1.0, install_signals=False)

    published = {}
    for r in consume(broker.bootstrap_servers, f"out-{tag}", len(X)):
        v = json.loads(r.value)
        if v["kind"] == "assignment":
            published[v["offset"]] = (v["cluster"], v["confidence"], v["model_version"])
    assert len(published) == len(X)
    for start in range(0, len(X), 64):
        batch = X[start : start + 64]
        ids, conf = offline.predict_with_confidence(batch)
        version = offline.version_
        offline.partial_fit(batch)
        for j in range(len(batch)):
            cluster, confidence, model_version = published[start + j]
            assert (cluster, model_version) == (int(ids[j]), version)
            assert confidence == pytest.approx(float(conf[j]), abs=1e-6)


def test_hooks_see_every_poll_batch_update_and_checkpoint(broker, blobs, tmp_path):
    import threading

    from stream_dec.service import ServiceHooks
    from stream_dec.service.journal import JOURNAL

    tag = "hooks"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    send_items(broker, f"in-{tag}", [(f"h-{i}", blobs["X"][i]) for i in range(150)])
    seen: dict[str, list] = {"poll": [], "batch": [], "update": [], "checkpoint": [], "assigned": []}
    hooks = ServiceHooks(
        on_poll=lambda n, seconds, consumer_seconds: seen["poll"].append(n),
        on_batch=lambda info: seen["batch"].append(info),
        on_update=lambda report, started, ended: seen["update"].append((report.model_version, report.n_items, ended >= started)),
        on_checkpoint=lambda version, seconds: seen["checkpoint"].append((version, threading.current_thread().name)),
        on_assigned=lambda partitions: seen["assigned"].append(partitions),
    )
    # A long wait: batches are cut by size only, so their sizes are known.
    service = StreamService(service_settings(broker, ckpt, tag, batch__max_wait_ms=3000), hooks=hooks)
    service.run(max_idle_s=1.0, install_signals=False)

    assert seen["assigned"] == [[0]] and sum(seen["poll"]) == 150
    batches = seen["batch"]
    assert [len(b.records) for b in batches] == [64, 64, 22]
    assert all(b.labelled == len(b.records) and not b.relearnt and b.dead_lettered == 0 for b in batches)
    steps = {"decode", "wait_update", "journal", "predict", "send", "acks", "checkpoint", "commit", "total"}
    assert all(set(b.timings) == steps and b.timings["total"] >= b.timings["acks"] >= 0 for b in batches)
    # One update per batch, in order, each by the next model version.
    assert [n for _, n, _ in seen["update"]] == [len(b.records) for b in batches]
    assert [v for v, _, _ in seen["update"]] == list(range(1, len(batches) + 1)) and all(ok for _, _, ok in seen["update"])
    # Every second batch and at shutdown, written on the checkpoint thread; the journal then holds nothing.
    assert [v for v, _ in seen["checkpoint"]][-1] == service.model.version_ == len(batches)
    assert {name for _, name in seen["checkpoint"]} == {"stream-dec-checkpoint_0"}
    assert (ckpt / JOURNAL).read_text() == ""

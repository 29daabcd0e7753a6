"""Scale-out on a real broker: one learner and three predictors over eight input partitions."""

from __future__ import annotations

import json
import threading
from collections import defaultdict

import numpy as np
from kafka import KafkaProducer
from kafka_helpers import read_topic, service_settings, setup_stream, wait_for

from stream_dec.io.codecs import encode_json
from stream_dec.online.snapshot import PredictSnapshot
from stream_dec.service.predictor import PredictorService
from stream_dec.service.roles import LearnerService, build_service

PARTITIONS = 8


def _settings(broker, ckpt, tag, role, **over):
    return service_settings(broker, ckpt, tag, role=role, kafka__model_topic=f"model-{tag}", kafka__feed_topic=f"feed-{tag}", **over)


def _send(broker, topic, items):
    p = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for item_id, vec in items:
        p.send(topic, key=item_id.encode(), value=encode_json(item_id, vec))
    p.flush()
    p.close()


def _start(services):
    threads = [threading.Thread(target=s.run, kwargs={"install_signals": False}, daemon=True) for s in services]
    for t in threads:
        t.start()
    return threads


def test_one_learner_three_predictors_label_everything_with_versions(broker, blobs, tmp_path):
    tag = "scale"
    ckpt = setup_stream(broker, blobs, tmp_path, tag, PARTITIONS)
    learner = LearnerService(_settings(broker, ckpt, tag, "learner"))
    preds = [build_service(_settings(broker, ckpt, tag, "predictor")) for _ in range(3)]
    assert all(isinstance(p, PredictorService) for p in preds)
    threads = _start([learner, *preds])
    # Every predictor loads the version the learner starts from before it joins the group.
    assert wait_for(lambda: all(p.snapshot is not None for p in preds), 60)
    assert {p.snapshot.version for p in preds} == {0}
    assert wait_for(lambda: sum(p.metrics.assigned._value.get() for p in preds) == PARTITIONS, 60)

    X = np.concatenate([blobs["X"], blobs["X_new"]])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    items = [(f"i-{j}", X[j]) for j in order[:1200]]
    for start in range(0, len(items), 200):  # the stream arrives over time: the learner makes versions meanwhile
        _send(broker, f"in-{tag}", items[start : start + 200])
    assert wait_for(lambda: sum(p.processed_batches for p in preds) > 0 and _labelled(preds) >= len(items), 90)
    # The learner learnt from the predictors' latents and published new versions; all predictors end on its last.
    assert wait_for(lambda: learner.model.version_ > 0 and all(p.snapshot.version == learner.model.version_ for p in preds), 60)
    last = int(learner.model.version_)
    with learner._lock:  # idle: the learner's model is the version every predictor holds
        reference = PredictSnapshot.from_model(learner.model)
    assert reference.version == last

    # The same embedding under keys that land on different predictors: the same id at the same version.
    probe = X[order[0]]
    owners = {}
    for j in range(200):
        key = f"probe-{j}"
        part = _partition_of(key)
        owner = next(i for i, p in enumerate(preds) if any(tp.partition == part for tp in p.consumer.assignment()))
        owners.setdefault(owner, key)
    assert len(owners) == 3
    _send(broker, f"in-{tag}", [(k, probe) for k in owners.values()])
    assert wait_for(lambda: _labelled(preds) >= len(items) + 3, 60)
    for p in preds:
        p.stop()
    learner.stop()
    for t in threads:
        t.join(timeout=60)

    out = _read_all(broker, f"out-{tag}")
    assign = [v for v in out if v["kind"] == "assignment"]
    ids = [v["id"] for v in assign]
    assert set(ids) >= {i for i, _ in items}  # every valid record labelled (at-least-once: maybe twice)
    assert all(isinstance(v["model_version"], int) and "root" in v for v in assign)
    by_partition = defaultdict(list)
    for v in assign:
        by_partition[v["partition"]].append((v["offset"], v["model_version"]))
    for rows in by_partition.values():
        versions = [ver for _, ver in sorted(rows)]
        assert versions == sorted(versions)  # versions never go down within a partition
    probes = [v for v in assign if v["id"].startswith("probe-")]
    assert len({(v["model_version"], v["cluster"]) for v in probes}) == 1
    assert probes[0]["model_version"] == last
    assert probes[0]["cluster"] == int(reference.predict(probe[None, :])[0])
    # Drift records come from the learner, one per version it made.
    drift = [v for v in out if v["kind"] == "drift"]
    assert drift and max(d["model_version"] for d in drift) == learner.model.version_


def _labelled(preds) -> int:
    return sum(int(p.metrics.records.labels("labelled")._value.get()) for p in preds)


def _partition_of(key: str) -> int:
    from stream_dec.io.partitioner import default_partitions

    return int(default_partitions([key.encode()], set(range(PARTITIONS)))[0])


def _read_all(broker, topic):
    return [json.loads(r.value) for r in read_topic(broker.bootstrap_servers, topic)]

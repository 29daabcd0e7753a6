"""``STREAM_DEC_UPDATE__MAX_STEPS=0`` through the running service: label only, learn nothing, lose nothing.

The model version does not advance when nothing is learnt, so checkpoints keep one
version while their offsets move on: a restart must still resume after what was
labelled, and the journal must not grow without bound.
"""

from __future__ import annotations

import json

import numpy as np
from kafka_helpers import consume, send_items, service_settings, setup_stream

from stream_dec import StreamDEC
from stream_dec.service import StreamService


def test_max_steps_0_labels_with_the_fitted_model_and_restarts_without_relabelling(broker, blobs, tmp_path):
    tag = "label-only"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    fitted = StreamDEC.load(ckpt)
    X = np.concatenate([blobs["X"][:150], blobs["X_new"][:90]])  # a novel blob too: still no new cluster
    first = [(f"a-{i}", X[i]) for i in range(160)]
    send_items(broker, f"in-{tag}", first)
    settings = service_settings(broker, ckpt, tag, update__max_steps=0)
    s1 = StreamService(settings)
    s1.run(max_idle_s=2.0, install_signals=False)
    assert s1.model.version_ == fitted.version_ and s1.model.n_clusters_ == fitted.n_clusters_
    second = [(f"b-{i}", X[160 + i]) for i in range(80)]
    send_items(broker, f"in-{tag}", second)
    s2 = StreamService(settings)
    assert s2.offsets == {0: 160}  # the checkpoint moved on although the version did not
    s2.run(max_idle_s=2.0, install_signals=False)

    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", 240)]
    assignments = {v["id"]: v for v in out if v["kind"] == "assignment"}
    assert len([v for v in out if v["kind"] == "assignment"]) == 240 == len(assignments)  # nothing twice, nothing lost
    expected = dict(zip([i for i, _ in first + second], fitted.predict(X).tolist()))
    assert {i: v["cluster"] for i, v in assignments.items()} == expected  # the fitted model's labels, unchanged
    assert {v["model_version"] for v in assignments.values()} == {fitted.version_}
    drift = [v for v in out if v["kind"] == "drift"]
    assert drift and all(d["plan"]["learn"] is False and d["new_cluster_ids"] == [] for d in drift)
    assert len((ckpt / "batches.jsonl").read_text().splitlines()) == 0  # every line covered by the final checkpoint

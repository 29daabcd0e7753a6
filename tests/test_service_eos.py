"""Exactly-once mode: outputs and offsets in one transaction; a fenced zombie cannot commit.

tansu does not hide aborted records from read_committed readers (docs/kafka-notes.md),
so these tests check what it can show: the group offset moves with each committed
transaction and not otherwise.
"""

from __future__ import annotations

import json
import threading
import time

from kafka import KafkaProducer
from kafka_helpers import committed, consume, send_items, service_settings, setup_stream

from stream_dec.service import StreamService


def test_outputs_and_offsets_commit_together(broker, blobs, tmp_path):
    tag = "eos"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    send_items(broker, f"in-{tag}", [(f"e-{i}", blobs["X"][i]) for i in range(256)])
    s = StreamService(service_settings(broker, ckpt, tag, kafka__processing_guarantee="exactly_once"))
    s.run(max_idle_s=2.0, install_signals=False)
    assert committed(broker, f"g-{tag}", f"in-{tag}") == 256
    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", 256)]
    assert sorted(v["id"] for v in out if v["kind"] == "assignment") == sorted(f"e-{i}" for i in range(256))


def test_a_fenced_zombie_cannot_commit_and_offsets_stay(broker, blobs, tmp_path):
    tag = "zombie"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    send_items(broker, f"in-{tag}", [(f"z-{i}", blobs["X"][i]) for i in range(128)])
    s = StreamService(service_settings(broker, ckpt, tag, kafka__processing_guarantee="exactly_once"))
    errors = []

    def run():
        try:
            s.run(install_signals=False)
        except Exception as exc:  # the fenced producer's error ends the run
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 45
    while s.offsets.get(0, 0) < 128 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert committed(broker, f"g-{tag}", f"in-{tag}") == 128
    # A newer instance with the same transactional id fences this one...
    newer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, transactional_id=s.transactional_id)
    newer.init_transactions()
    send_items(broker, f"in-{tag}", [(f"w-{i}", blobs["X"][i]) for i in range(64)])
    t.join(timeout=45)
    newer.close()
    assert errors, "the zombie kept committing after being fenced"
    # ...and its batch's offsets never moved.
    assert committed(broker, f"g-{tag}", f"in-{tag}") == 128

"""Two instances in one consumer group: one model owns the stream, the other stands by and takes over."""

from __future__ import annotations

import json
import threading

from kafka_helpers import consume, send_items, service_settings, setup_stream, wait_for

from stream_dec.service import StreamService


def test_second_instance_is_a_hot_standby_that_takes_over(broker, blobs, tmp_path):
    tag = "standby"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    a = StreamService(service_settings(broker, ckpt, tag))
    b = StreamService(service_settings(broker, ckpt, tag))
    threads = [threading.Thread(target=s.run, kwargs={"install_signals": False}, daemon=True) for s in (a, b)]
    for t in threads:
        t.start()
    assert wait_for(lambda: a.metrics.assigned._value.get() + b.metrics.assigned._value.get() == 1 and a._last_activity and b._last_activity)
    owner, standby = (a, b) if a.metrics.assigned._value.get() == 1 else (b, a)

    first = [(f"x-{i}", blobs["X"][i]) for i in range(300)]
    send_items(broker, f"in-{tag}", first)
    assert wait_for(lambda: owner.processed_batches > 0 and owner.offsets.get(0, 0) >= 300)
    assert standby.processed_batches == 0  # one model only: no conflicting ids

    owner.stop()  # the owner leaves: flush, checkpoint, commit, leave the group
    threads[0 if owner is a else 1].join(timeout=30)
    assert wait_for(lambda: standby.metrics.assigned._value.get() == 1)
    second = [(f"y-{i}", blobs["X"][300 + i]) for i in range(200)]
    send_items(broker, f"in-{tag}", second)
    assert wait_for(lambda: standby.offsets.get(0, 0) >= 500)
    # The standby resumed the owner's model (its versions continue) rather than its own stale copy.
    assert standby.model.version_ > owner.model.version_
    standby.stop()
    threads[1 if owner is a else 0].join(timeout=30)

    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", 500)]
    ids = [v["id"] for v in out if v["kind"] == "assignment"]
    assert sorted(ids) == sorted([i for i, _ in first] + [i for i, _ in second])  # each once, none lost
    versions = [v["model_version"] for v in out if v["kind"] == "assignment"]
    assert versions == sorted(versions)  # one lineage of models

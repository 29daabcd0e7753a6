"""Two instances in one consumer group: one model owns the stream, the other stands by and takes over."""

from __future__ import annotations

import json
import threading
import time

from conftest_kafka import consume

from stream_dec.service import StreamService
from tests.test_service import _send, _settings, _setup_stream


def _wait(cond, timeout_s=45):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_second_instance_is_a_hot_standby_that_takes_over(broker, blobs, tmp_path):
    tag = "standby"
    ckpt = _setup_stream(broker, blobs, tmp_path, tag)
    a = StreamService(_settings(broker, ckpt, tag))
    b = StreamService(_settings(broker, ckpt, tag))
    threads = [threading.Thread(target=s.run, kwargs={"install_signals": False}, daemon=True) for s in (a, b)]
    for t in threads:
        t.start()
    assert _wait(lambda: a.metrics.assigned._value.get() + b.metrics.assigned._value.get() == 1 and a._last_activity and b._last_activity)
    owner, standby = (a, b) if a.metrics.assigned._value.get() == 1 else (b, a)

    first = [(f"x-{i}", blobs["X"][i]) for i in range(300)]
    _send(broker, f"in-{tag}", first)
    assert _wait(lambda: owner.processed_batches > 0 and owner.offsets.get(0, 0) >= 300)
    assert standby.processed_batches == 0  # one model only: no conflicting ids

    owner.stop()  # the owner leaves: flush, checkpoint, commit, leave the group
    threads[0 if owner is a else 1].join(timeout=30)
    assert _wait(lambda: standby.metrics.assigned._value.get() == 1)
    second = [(f"y-{i}", blobs["X"][300 + i]) for i in range(200)]
    _send(broker, f"in-{tag}", second)
    assert _wait(lambda: standby.offsets.get(0, 0) >= 500)
    # The standby resumed the owner's model (its versions continue) rather than its own stale copy.
    assert standby.model.version_ > owner.model.version_
    standby.stop()
    threads[1 if owner is a else 0].join(timeout=30)

    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", 500)]
    ids = [v["id"] for v in out if v["kind"] == "assignment"]
    assert sorted(ids) == sorted([i for i, _ in first] + [i for i, _ in second])  # each once, none lost
    versions = [v["model_version"] for v in out if v["kind"] == "assignment"]
    assert versions == sorted(versions)  # one lineage of models

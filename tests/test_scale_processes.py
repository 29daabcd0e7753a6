"""Scale-out with real processes: kill -9 of a predictor or of the learner, SIGTERM of every role."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
from kafka_helpers import (
    free_port,
    metric,
    read_topic,
    run_env,
    send_items,
    setup_stream,
)

PARTITIONS = 8


class _Proc:
    """One ``stream-dec run --role ROLE`` subprocess with its metrics port and log file."""

    def __init__(self, broker, tag, ckpt, role, tmp_path, name, **env):
        self.port, self.name = free_port(), name
        self.log = tmp_path / f"{name}.log"
        e = run_env(broker, tag, ckpt, STREAM_DEC_ROLE=role, STREAM_DEC_METRICS__PORT=self.port,
                    STREAM_DEC_KAFKA__MODEL_TOPIC=f"model-{tag}", STREAM_DEC_KAFKA__FEED_TOPIC=f"feed-{tag}",
                    STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS=3000, STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS=500, **env)
        with open(self.log, "w") as fh:  # a file, not a pipe: nobody reads the log while it runs
            self.proc = subprocess.Popen([sys.executable, "-m", "stream_dec.cli", "run"], env=e, stdout=fh, stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float:
        try:
            return metric(self.port, name)
        except OSError:
            return float("nan")

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text()


def _until(cond, procs, what, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        dead = [p for p in procs if p.proc.poll() is not None]
        if dead:
            raise AssertionError(f"{dead[0].name} exited ({dead[0].proc.returncode}) while waiting for {what}:\n{dead[0].text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(f"--- {p.name}\n{p.text()[-1500:]}" for p in procs))


def _outputs(broker, tag) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(broker.bootstrap_servers, f"out-{tag}")]


def _labelled_ids(broker, tag) -> set[str]:
    return {v["id"] for v in _outputs(broker, tag) if v["kind"] == "assignment"}


def _snapshots(broker, tag) -> dict[int, list[str]]:
    """The sha256 of every publication of every version on the model topic, in order."""
    out: dict[int, list[str]] = defaultdict(list)
    for r in read_topic(broker.bootstrap_servers, f"model-{tag}"):
        h = dict(r.headers)
        if h["chunk"].startswith(b"0/"):
            out[int(h["model-version"])].append(h["sha256"].decode())
    return out


def _items(blobs, prefix, n, seed):
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    rows = np.random.default_rng(seed).choice(len(X), n, replace=False)
    return [(f"{prefix}-{i}", X[j]) for i, j in enumerate(rows)]


def test_a_killed_predictor_leaves_nothing_unlabelled(broker, blobs, tmp_path):
    tag = "kill-predictor"
    ckpt = setup_stream(broker, blobs, tmp_path, tag, PARTITIONS)
    learner = _Proc(broker, tag, ckpt, "learner", tmp_path, "learner")
    preds = [_Proc(broker, tag, ckpt, "predictor", tmp_path, f"predictor-{i}") for i in range(3)]
    procs = [learner, *preds]
    _until(lambda: sum(p.metric("stream_dec_assigned_partitions") for p in preds) == PARTITIONS, procs, "8 partitions assigned")
    first, second = _items(blobs, "a", 600, 1), _items(blobs, "b", 600, 2)
    send_items(broker, f"in-{tag}", first)
    _until(lambda: preds[0].metric("stream_dec_records_total") > 0, procs, "predictor-0 labelling")
    preds[0].stop(signal.SIGKILL)  # mid-stream: its partitions move to the others
    send_items(broker, f"in-{tag}", second)
    rest = preds[1:]
    _until(lambda: sum(p.metric("stream_dec_assigned_partitions") for p in rest) == PARTITIONS, [learner, *rest], "partitions moved")
    _until(lambda: _labelled_ids(broker, tag) >= {i for i, _ in first + second}, [learner, *rest], "every record labelled")
    # Every role exits 0 on SIGTERM.
    assert [p.stop() for p in rest] == [0, 0]
    assert learner.stop() == 0
    assign = [v for v in _outputs(broker, tag) if v["kind"] == "assignment"]
    assert all(isinstance(v["model_version"], int) for v in assign)


def test_a_killed_learners_standby_republishes_identical_versions(broker, blobs, tmp_path):
    tag = "kill-learner"
    ckpt = setup_stream(broker, blobs, tmp_path, tag, PARTITIONS)
    # No checkpoint after the start: the standby replays every batch from the journal.
    slow_ckpt = {"STREAM_DEC_CHECKPOINT__INTERVAL_BATCHES": 100_000}
    a = _Proc(broker, tag, ckpt, "learner", tmp_path, "learner-a", **slow_ckpt)
    pred = _Proc(broker, tag, ckpt, "predictor", tmp_path, "predictor")
    _until(lambda: a.metric("stream_dec_assigned_partitions") == 1 and pred.metric("stream_dec_assigned_partitions") == PARTITIONS,
           [a, pred], "learner and predictor assigned")
    b = _Proc(broker, tag, ckpt, "learner", tmp_path, "learner-b", **slow_ckpt)
    # The second member's join rebalances the group: either learner may own the feed after it.
    _until(lambda: "standby:" in a.text() + b.text(), [a, b, pred], "one learner standing by")
    _until(lambda: a.metric("stream_dec_assigned_partitions") + b.metric("stream_dec_assigned_partitions") == 1,
           [a, b, pred], "one learner owning the feed")
    owner, standby = (a, b) if a.metric("stream_dec_assigned_partitions") == 1 else (b, a)
    first = _items(blobs, "a", 900, 3)
    for k in range(0, len(first), 150):
        send_items(broker, f"in-{tag}", first[k : k + 150])
        time.sleep(0.3)
    _until(lambda: owner.metric("stream_dec_model_version") >= 3, [a, b, pred], "learner versions")
    _until(lambda: _labelled_ids(broker, tag) >= {i for i, _ in first}, [a, b, pred], "first part labelled")
    published_by_owner = max(_snapshots(broker, tag))
    owner.stop(signal.SIGKILL)
    _until(lambda: standby.metric("stream_dec_assigned_partitions") == 1, [standby, pred], "standby takes over")
    second = _items(blobs, "b", 300, 4)
    send_items(broker, f"in-{tag}", second)
    _until(lambda: _labelled_ids(broker, tag) >= {i for i, _ in second}, [standby, pred], "second part labelled")
    _until(lambda: standby.metric("stream_dec_model_version") > published_by_owner, [standby, pred], "standby makes new versions")
    _until(lambda: pred.metric("stream_dec_model_version") == standby.metric("stream_dec_model_version"), [standby, pred],
           "predictor follows")
    assert pred.stop() == 0 and standby.stop() == 0
    snaps = _snapshots(broker, tag)
    # The standby started from the checkpoint (version 0) and redid the killed learner's
    # updates from the journal: every version the learner had published appears again,
    # with the same bytes.
    assert all(len(snaps[v]) >= 2 for v in range(published_by_owner + 1)), {v: len(s) for v, s in snaps.items()}
    assert all(len(set(snaps[v])) == 1 for v in snaps), {v: s for v, s in snaps.items() if len(set(s)) > 1}
    versions = defaultdict(list)
    for v in _outputs(broker, tag):
        if v["kind"] == "assignment":
            versions[v["partition"]].append((v["offset"], v["model_version"]))
    for rows in versions.values():
        seq = [ver for _, ver in sorted(rows)]
        assert seq == sorted(seq)

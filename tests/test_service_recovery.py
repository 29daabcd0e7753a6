"""Crash and shutdown behaviour of `stream-dec run` as a real process against a real broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from kafka_helpers import (
    committed,
    consume,
    free_port,
    metric,
    published,
    read_topic,
    run_env,
    send_items,
    setup_stream,
)

from stream_dec import StreamDEC
from tests.conftest import FAST


def _env(broker, tag, ckpt):
    # Short sessions: a killed member's partitions free up sooner.
    return run_env(broker, tag, ckpt, STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS=3000, STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS=500)


def _start(env, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "stream_dec.cli", "run", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _assignments(broker, tag, n, timeout_s=60):
    out = consume(broker.bootstrap_servers, f"out-{tag}", n, timeout_s=timeout_s)
    return [json.loads(r.value) for r in out if json.loads(r.value)["kind"] == "assignment"]


def _read_all(broker, tag) -> list[dict]:
    """Every output record's value (transaction markers take offsets but hold no record)."""
    return [json.loads(r.value) for r in read_topic(broker.bootstrap_servers, f"out-{tag}")]


@pytest.fixture(scope="module")
def stream(blobs):
    rng = np.random.default_rng(5)
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    X = X[rng.permutation(len(X))][:1200]
    return [(f"r-{i}", X[i]) for i in range(len(X))]


def _ckpt(blobs, tmp_path):
    d = tmp_path / "ckpt"
    StreamDEC(n_clusters=5, random_state=0, **FAST).fit(blobs["X"]).save(d)
    return d


def test_kill_9_then_restart_labels_everything_and_replays_identically(broker, blobs, stream, tmp_path):
    tag = "kill"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    env = _env(broker, tag, ckpt)
    # No checkpoint during the run: the kill then always leaves journaled batches to
    # replay (with interval 4 it could land right after a checkpoint, replaying nothing).
    env["STREAM_DEC_CHECKPOINT__INTERVAL_BATCHES"] = "1000"
    send_items(broker, f"in-{tag}", stream)
    proc = _start(env)
    deadline = time.monotonic() + 90
    while published(broker.bootstrap_servers, f"out-{tag}") < 500 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert published(broker.bootstrap_servers, f"out-{tag}") < len(stream), "killed too late to test recovery"

    t0 = time.monotonic()
    restarted = _start(env, "--exit-when-idle", "3")
    # The restarted service must publish new labels quickly (group join included).
    first_new = None
    before = published(broker.bootstrap_servers, f"out-{tag}")
    while restarted.poll() is None and time.monotonic() - t0 < 90:
        if first_new is None and published(broker.bootstrap_servers, f"out-{tag}") > before:
            first_new = time.monotonic() - t0
        time.sleep(0.05)
    out, err = restarted.communicate(timeout=90)
    assert restarted.returncode == 0, err
    # The recovery target. Most of it is the group join: the killed member holds
    # the partitions until its session (3 s here) expires.
    assert first_new is not None and first_new < 10, first_new

    labels = _assignments(broker, tag, published(broker.bootstrap_servers, f"out-{tag}"))  # every output, not the first n
    by_id: dict[str, list[dict]] = {}
    for a in labels:
        by_id.setdefault(a["id"], []).append(a)
    assert set(by_id) == {i for i, _ in stream}  # no valid record unlabelled
    dupes = [v for v in by_id.values() if len(v) > 1]
    assert dupes, "a kill between checkpoints should replay some batches"
    for copies in dupes:  # replayed outputs are exact copies of the first ones
        first = copies[0]
        assert all((c["cluster"], c["confidence"], c["model_version"], c["offset"]) == (first["cluster"], first["confidence"], first["model_version"], first["offset"]) for c in copies)


def test_sigterm_finishes_checkpoints_commits_and_exits_0(broker, blobs, stream, tmp_path):
    tag = "term"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    env = _env(broker, tag, ckpt)
    send_items(broker, f"in-{tag}", stream)
    proc = _start(env)
    deadline = time.monotonic() + 90
    while published(broker.bootstrap_servers, f"out-{tag}") < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()
    model = StreamDEC.load(ckpt)
    done = model.checkpoint_extra_["offsets"][f"in-{tag}"]["0"]
    labelled = _assignments(broker, tag, published(broker.bootstrap_servers, f"out-{tag}"), timeout_s=10)
    assert len(labelled) == done  # the checkpoint is exactly where the outputs stop
    assert sorted(a["offset"] for a in labelled) == list(range(done))
    # A restart continues from there: every record once, none twice.
    restarted = _start(env, "--exit-when-idle", "3")
    assert restarted.wait(timeout=90) == 0
    labelled = _assignments(broker, tag, published(broker.bootstrap_servers, f"out-{tag}"))  # every output, not the first n
    assert sorted(a["offset"] for a in labelled) == list(range(len(stream)))


def test_corrupt_newest_checkpoint_falls_back(blobs, tmp_path):
    ckpt = _ckpt(blobs, tmp_path)
    m = StreamDEC.load(ckpt)
    m.partial_fit(blobs["X"][:100])
    m.save(ckpt, extra={"offsets": {"in": {"0": 100}}})
    newest = sorted(ckpt.glob("ckpt-*.sdec"))[-1]
    newest.write_bytes(newest.read_bytes()[:-50])
    from stream_dec.service import StreamService
    from stream_dec.settings import load_settings

    s = StreamService(load_settings(checkpoint__dir=str(ckpt), metrics__port=0))
    assert s.model.version_ == 0 and s.offsets == {}


def test_exactly_once_restart_relearns_committed_batches_without_publishing_them(broker, blobs, stream, tmp_path):
    def group_offset():
        return committed(broker, f"g-{tag}", f"in-{tag}") or 0

    tag = "eoskill"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    env = _env(broker, tag, ckpt)
    env["STREAM_DEC_KAFKA__PROCESSING_GUARANTEE"] = "exactly_once"
    env["STREAM_DEC_CHECKPOINT__INTERVAL_BATCHES"] = "1000"  # the kill leaves every batch after the checkpoint
    first, second = stream[:300], stream[300:400]
    send_items(broker, f"in-{tag}", first)
    proc = _start(env)
    deadline = time.monotonic() + 90
    while group_offset() < len(first) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # idle between transactions: nothing is left open
    proc.wait(timeout=10)
    before = [v for v in _read_all(broker, tag) if v["kind"] == "assignment"]
    assert sorted(a["id"] for a in before) == sorted(i for i, _ in first)

    send_items(broker, f"in-{tag}", second)
    restarted = _start(env, "--exit-when-idle", "3")
    out, err = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, err
    labels = [v for v in _read_all(broker, tag) if v["kind"] == "assignment"]
    ids = [a["id"] for a in labels]
    assert len(ids) == len(set(ids)) == len(first) + len(second)  # each id once
    # The committed batches were learnt again before the new ones were labelled: the
    # model's version continues where the killed instance left it.
    assert min(a["model_version"] for a in labels[len(first):]) > max(a["model_version"] for a in before)


def _block_checkpoints(ckpt, on: bool) -> None:
    """Make every checkpoint write fail (a directory where the next files would be renamed to), or stop it."""
    from stream_dec.checkpoint import checkpoint_files

    if on:
        newest = int(checkpoint_files(ckpt)[0].name[5:17])
        for v in range(newest + 1, newest + 3000):
            (ckpt / f"ckpt-{v:012d}.sdec").mkdir()
    else:
        for p in ckpt.glob("ckpt-*.sdec"):
            if p.is_dir():
                p.rmdir()


def test_a_failing_checkpoint_dir_loses_nothing_and_a_kill_then_replays_exactly(broker, blobs, tmp_path):
    """Checkpoint writes fail, then the whole directory is gone, then kill -9: no gap, exact duplicates.

    Updates are cut by a tiny time budget, so the replay is exact only because it redoes
    the journaled plans.
    """
    tag = "dirfail"
    broker.create_topics([f"in-{tag}", f"out-{tag}", f"dlq-{tag}"])
    ckpt = tmp_path / "ckpt"
    StreamDEC(n_clusters=5, random_state=0, centre_rule="dec", **FAST).fit(blobs["X"]).save(ckpt)
    port = free_port()
    env = _env(broker, tag, ckpt)
    env.update(STREAM_DEC_METRICS__PORT=str(port), STREAM_DEC_UPDATE__MAX_STEPS="100000", STREAM_DEC_UPDATE__MAX_MS="3")
    rng = np.random.default_rng(3)
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    items = [(f"d-{i}", X[i % len(X)] + 0.05 * rng.standard_normal(X.shape[1])) for i in range(3000)]
    # 100 records a second for 30 s: the phases below happen while records flow.
    sender = threading.Thread(target=lambda: [send_items(broker, f"in-{tag}", items[i:i + 50]) or time.sleep(0.5)
                                              for i in range(0, len(items), 50)], daemon=True)
    log = open(tmp_path / "service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "stream_dec.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        sender.start()
        _until(lambda: published(broker.bootstrap_servers, f"out-{tag}") >= 300, proc, "no outputs")
        # 1. Checkpoint writes fail; batches go on (the journal grows) and the write is retried.
        _block_checkpoints(ckpt, True)
        _until(lambda: metric(port, "stream_dec_checkpoint_failures_total") >= 2, proc, "no checkpoint failure counted")
        _block_checkpoints(ckpt, False)
        written = metric(port, "stream_dec_checkpoint_last_success_timestamp_seconds")
        _until(lambda: metric(port, "stream_dec_checkpoint_last_success_timestamp_seconds") > written, proc, "no checkpoint after the failure")
        # 2. The whole directory is gone: no journal line can be written, so nothing is published.
        away = tmp_path / "ckpt.away"
        failures = metric(port, "stream_dec_checkpoint_failures_total")
        ckpt.rename(away)
        ckpt.write_text("not a directory")
        _until(lambda: metric(port, "stream_dec_checkpoint_failures_total") >= failures + 2, proc, "no journal failure counted")
        held = published(broker.bootstrap_servers, f"out-{tag}")
        time.sleep(1.5)
        assert published(broker.bootstrap_servers, f"out-{tag}") == held  # held back, not published without a journal line
        ckpt.unlink()
        away.rename(ckpt)
        _until(lambda: published(broker.bootstrap_servers, f"out-{tag}") > held + 100, proc, "no outputs after the directory came back")
        # 3. Checkpoints fail again, then kill -9: the restart replays everything since the last good one.
        failures = metric(port, "stream_dec_checkpoint_failures_total")
        _block_checkpoints(ckpt, True)
        _until(lambda: metric(port, "stream_dec_checkpoint_failures_total") > failures, proc, "no second checkpoint failure")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert published(broker.bootstrap_servers, f"out-{tag}") < len(items), "killed too late to test recovery"
        _block_checkpoints(ckpt, False)
        from stream_dec.service.journal import JOURNAL, Journal

        plans = [line.fields.get("plan") for line in Journal(ckpt / JOURNAL, base=0).lines()]
        # A batch's plan is journaled when its update is collected, before the next batch's
        # line: only the last line may lack one (its update was running at the kill).
        assert len(plans) > 1 and all(plans[:-1]) and any(p["steps_cut"] for p in plans if p)  # the clock cut the updates to replay
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sender.join(timeout=60)
    restarted = _start(env, "--exit-when-idle", "3")
    _, err = restarted.communicate(timeout=180)
    assert restarted.returncode == 0, err[-3000:]

    labels = _assignments(broker, tag, published(broker.bootstrap_servers, f"out-{tag}"))
    by_id: dict[str, list[dict]] = {}
    for a in labels:
        by_id.setdefault(a["id"], []).append(a)
    assert set(by_id) == {i for i, _ in items}  # no gap
    assert sorted({a["offset"] for a in labels}) == list(range(len(items)))
    dupes = [v for v in by_id.values() if len(v) > 1]
    assert dupes, "the kill after failed checkpoints must leave journaled batches to replay"
    key = ("cluster", "confidence", "model_version", "offset")
    assert all(tuple(c[k] for k in key) == tuple(v[0][k] for k in key) for v in dupes for c in v)
    print(f"\ncheckpoint dir failures: {len(items)} records, {len(labels)} assignments, {len(dupes)} replayed ids, all exact copies")


def _until(cond, proc, what, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"{what}: the service exited"
        assert time.monotonic() < deadline, what
        time.sleep(0.1)

"""Split brain: an owner paused past its session must not write once a standby has taken over.

Two `stream-dec run` processes in one group share a checkpoint directory; records flow
while the owner is frozen (SIGSTOP) for longer than the session timeout, then thawed
(SIGCONT). The real broker, real processes, real files.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka_helpers import published, run_env, send_items, setup_stream

from stream_dec.checkpoint import checkpoint_files, read_verified

#: The session of the test group: the paused owner is frozen for 2.5 of them.
SESSION_MS = 6000
PAUSE_S = 15


def _env(broker, tag, ckpt):
    # Every checkpoint stays, to check whose lineage it is.
    return run_env(broker, tag, ckpt, STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS=SESSION_MS, STREAM_DEC_CHECKPOINT__KEEP=100000)


class _Instance:
    """One `stream-dec run` process, its log in a file."""

    def __init__(self, env, log_path, name):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream_dec.cli", "run"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log_path.read_text()

    def epochs(self) -> int:
        """Owner epochs claimed so far."""
        return self.text().count("owner epoch ")

    def last_epoch(self) -> int:
        """The owner epoch it claimed last (0: none)."""
        found = re.findall(r"owner epoch (\d+)", self.text())
        return int(found[-1]) if found else 0

    def owns(self) -> bool:
        """Whether its last assignment made it the owner."""
        t = self.text()
        return t.rfind("owner epoch ") > t.rfind("standby:")


def _read_all(broker, topic) -> list[dict]:
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=100)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek(tp, 0)
    out: list[dict] = []
    try:
        while True:
            for batch in c.poll(timeout_ms=200).values():
                out.extend(json.loads(r.value) for r in batch)
            hw = c.highwater(tp)
            if hw is not None and c.position(tp) >= hw:
                return out
    finally:
        c.close()


def _wait(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_paused_owner_is_fenced_and_every_duplicate_is_an_exact_copy(broker, blobs, tmp_path):
    tag = "split"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    env = _env(broker, tag, ckpt)
    rng = np.random.default_rng(11)
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    items = [(f"r-{i}", X[i % len(X)] + 0.05 * rng.standard_normal(X.shape[1])) for i in range(4500)]

    a = _Instance(env, tmp_path / "a.log", "a")
    try:
        _run_split_brain(broker, tag, ckpt, env, items, a, tmp_path)
    finally:
        for p in (a.proc, getattr(a, "peer", None)):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


def _run_split_brain(broker, tag, ckpt, env, items, a, tmp_path):
    _wait(lambda: a.epochs() >= 1, 60, "the first instance never owned the stream")
    b = _Instance(env, tmp_path / "b.log", "b")
    a.peer = b.proc
    _wait(lambda: "standby:" in a.text() + b.text() and (a.owns() != b.owns()), 60, "no single owner after the second joined")
    owner, standby = (a, b) if a.owns() else (b, a)

    # Records flow for about 30 s: before, during and after the pause.
    sender = threading.Thread(target=lambda: [send_items(broker, f"in-{tag}", items[i:i + 75]) or time.sleep(0.5)
                                              for i in range(0, len(items), 75)], daemon=True)
    sender.start()
    _wait(lambda: published(broker.bootstrap_servers, f"out-{tag}") >= 800, 60, "the owner published nothing")

    paused_epoch, standby_epochs = owner.last_epoch(), standby.epochs()
    owner.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    _wait(lambda: standby.epochs() > standby_epochs, 4 * SESSION_MS / 1000, "the standby never took over")
    took_over_s = time.monotonic() - stopped_at
    at_takeover = published(broker.bootstrap_servers, f"out-{tag}")
    _wait(lambda: published(broker.bootstrap_servers, f"out-{tag}") > at_takeover, 30, "the new owner published nothing")
    first_output_s = time.monotonic() - stopped_at
    time.sleep(max(0.0, PAUSE_S - (time.monotonic() - stopped_at)))
    owner.proc.send_signal(signal.SIGCONT)

    sender.join(timeout=120)
    ids = {i for i, _ in items}

    def everything_labelled() -> bool:
        return published(broker.bootstrap_servers, f"out-{tag}") >= len(items) and ids <= {v.get("id") for v in _read_all(broker, f"out-{tag}")}

    _wait(everything_labelled, 180, "not every record was labelled")
    for inst in (a, b):
        inst.proc.send_signal(signal.SIGTERM)
    for inst in (a, b):
        assert inst.proc.wait(timeout=60) == 0, inst.text()[-3000:]

    # The old owner noticed, said so, and stopped writing.
    old_log = owner.text()
    assert "FENCED" in old_log, old_log[-3000:]
    # Every valid record labelled; every duplicate an exact copy of the first publication.
    out = [v for v in _read_all(broker, f"out-{tag}") if v["kind"] == "assignment"]
    by_id: dict[str, list[dict]] = {}
    for v in out:
        by_id.setdefault(v["id"], []).append(v)
    assert set(by_id) == {i for i, _ in items}
    key = ("cluster", "confidence", "model_version", "offset")
    dupes = {i: v for i, v in by_id.items() if len(v) > 1}
    differing = [i for i, v in dupes.items() if any(tuple(c[k] for k in key) != tuple(v[0][k] for k in key) for c in v)]
    assert differing == [], f"{len(differing)} of {len(dupes)} duplicated ids differ, e.g. {dupes[differing[0]]}"
    # One lineage of checkpoints: owner epochs never go down as model versions go up.
    owners = [read_verified(p)["extra"].get("owner") for p in reversed(checkpoint_files(ckpt))]  # by version
    epochs = [o["epoch"] for o in owners if o]
    assert epochs == sorted(epochs)
    assert max(epochs) > paused_epoch  # the new owner's lineage continued the paused one's
    print(f"\nsplit brain: {len(items)} records, {len(out)} assignments, {len(dupes)} ids published more than once, "
          f"all exact copies; standby owned the stream {took_over_s:.1f}s after the SIGSTOP (session {SESSION_MS / 1000:.0f}s), "
          f"first new output after {first_output_s:.1f}s; checkpoints {len(owners)} from epochs {sorted(set(epochs))}; "
          f"old owner log: {old_log.count('FENCED')} FENCED line(s)")

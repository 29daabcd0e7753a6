"""Fencing and exact replays without a broker: owner leases, stale writers refused, plans journaled and replayed.

Real files, a real model, the service's own rooms (stream_dec/service/fencing.py,
journal.py, checkpointer.py, learner.py).
"""

from __future__ import annotations

import json
import multiprocessing
import threading

import numpy as np
import pytest

from stream_dec import StreamDEC
from stream_dec.checkpoint import checkpoint_files, read_verified
from stream_dec.service.checkpointer import Checkpointer, checkpoint_owner
from stream_dec.service.fencing import KEEP_LEASES, Fenced, OwnerLease, lease_path, newest_epoch
from stream_dec.service.journal import JOURNAL, Journal
from stream_dec.service.learner import Learner
from stream_dec.service.metrics import ServiceMetrics
from tests.conftest import FAST


@pytest.fixture
def model(blobs, tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    StreamDEC(n_clusters=5, random_state=0, **FAST).fit(blobs["X"]).save(d)
    return d


def test_epochs_are_claimed_in_order_and_only_the_newest_may_write(tmp_path):
    a, b = OwnerLease(tmp_path, "a"), OwnerLease(tmp_path, "b")
    assert newest_epoch(tmp_path) == 0
    ea = a.claim(generation=4, member_id="m-a")
    eb = b.claim(generation=5, member_id="m-b")
    assert (ea, eb) == (1, 2)
    assert json.loads(lease_path(tmp_path, 2).read_text())["instance"] == "b"
    written = []
    with b.guard(eb):
        written.append("b")
    with pytest.raises(Fenced) as refused:
        with a.guard(ea):
            written.append("a")  # never runs
    assert refused.value.reason == "lease" and written == ["b"]
    with pytest.raises(Fenced, match="not_owner"):
        with a.guard(None):
            pass


def test_concurrent_claims_get_distinct_epochs_and_old_leases_are_pruned(tmp_path):
    leases = [OwnerLease(tmp_path, f"i{i}") for i in range(4)]
    got: list[int] = []
    lock = threading.Lock()

    def claim(lease):
        for _ in range(5):
            e = lease.claim()
            with lock:
                got.append(e)

    threads = [threading.Thread(target=claim, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 21))  # each number once
    kept = sorted(p.name for p in tmp_path.glob("owner-*.lease"))
    assert len(kept) == KEEP_LEASES and kept[-1] == lease_path(tmp_path, 20).name


def _claim_in_child(directory, out):
    out.put(OwnerLease(directory, "child").claim())


def test_a_claim_in_another_process_fences_this_one(tmp_path):
    mine = OwnerLease(tmp_path, "parent")
    epoch = mine.claim()
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=_claim_in_child, args=(str(tmp_path), q))
    p.start()
    p.join(timeout=60)
    assert q.get(timeout=5) == epoch + 1
    with pytest.raises(Fenced):
        with mine.guard(epoch):
            pass


def test_a_stale_owner_writes_no_checkpoint_and_prunes_no_journal_line(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    m = StreamDEC.load(model)
    journal = Journal(ckpt / JOURNAL, base=0)
    old, new = OwnerLease(ckpt, "old"), OwnerLease(ckpt, "new")
    e_old = old.claim()
    refused: list[Fenced] = []
    cp = Checkpointer(ckpt, journal=journal, topic="in", version=0, lease=old, on_fenced=refused.append)
    journal.append({0: 64}, labelled_by=0, epoch=e_old)
    cp.take(m, {0: 64}, owner={"instance": "old", "epoch": e_old})
    assert cp.version == 0 and checkpoint_owner(StreamDEC.load(ckpt)) == {"instance": "old", "epoch": e_old}
    # The new owner claims; the old one, not knowing, learns a batch and checkpoints.
    e_new = new.claim()
    m.partial_fit(np.zeros((8, m.n_features_in_), dtype=np.float32))
    journal.append({0: 128}, labelled_by=1, epoch=e_old)  # (the service checks the lease first; here the file is forced)
    files = checkpoint_files(ckpt)
    cp.take(m, {0: 128}, owner={"instance": "old", "epoch": e_old})
    cp.close()
    assert checkpoint_files(ckpt) == files  # no file written
    assert [r.reason for r in refused] == ["lease"] and cp.version == 0
    # The journal keeps the batch the refused checkpoint would have covered; a line of
    # the new owner makes the stale writer's later lines invisible.
    journal.append({0: 192}, labelled_by=1, epoch=e_new)
    journal.append({0: 256}, labelled_by=2, epoch=e_old)
    assert [line.end for line in journal.following(0)] == [{0: 128}, {0: 192}]


def test_a_failed_checkpoint_is_retried_after_1_2_4_batches_then_at_the_interval(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    m = StreamDEC.load(model)
    metrics = ServiceMetrics()
    journal = Journal(ckpt / JOURNAL, base=0)
    cp = Checkpointer(ckpt, journal=journal, topic="in", version=0, interval=10, metrics=metrics)
    blocker = ckpt / f"ckpt-{int(m.version_):012d}.sdec"
    blocker.mkdir()  # the rename onto it fails: the write fails, the directory stays usable
    due_after = []
    for _ in range(4):
        cp.take(m, {0: 1})
        n = 1
        while not cp.batch_done():
            n += 1
        due_after.append(n)
    assert due_after == [1, 2, 4, 8] and metrics.ckpt_failures._value.get() == 4
    assert cp.version == 0
    blocker.rmdir()
    cp.take(m, {0: 1})
    cp.close()
    assert [cp.batch_done() for _ in range(10)][-2:] == [False, True]  # back to the interval
    assert read_verified(checkpoint_files(ckpt)[0])["extra"]["offsets"] == {"in": {"0": 1}}


def test_a_replay_with_the_journaled_plans_redoes_cut_updates_exactly(model, blobs, tmp_path):
    """Updates cut by a tiny time budget, replayed by a model with another budget: the same state and reports."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    X = np.concatenate([blobs["X"], blobs["X_new"]]).astype(np.float32)[::3]
    batches = [X[i:i + 60] for i in range(0, 360, 60)]
    # The rule that takes gradient steps: 100000 of them never fit in 3 ms.
    first = StreamDEC.load(model).set_params(centre_rule="dec", online_steps=100000, max_update_ms=3.0)
    journal = Journal(ckpt / JOURNAL, base=0)
    learner = Learner()
    reports, end = [], 0
    for xb in batches:  # what the service does: the end before the outputs, the plan once the update is done
        end += len(xb)
        journal.append({0: end}, labelled_by=int(first.version_), epoch=1)
        learner.start(first, xb, {0: (end - len(xb), end - 1)}, batch=({0: end}, int(first.version_)))
        update = learner.settle()
        b_end, labelled_by = update.batch
        journal.append(b_end, labelled_by=labelled_by, epoch=1, plan=update.report.plan)
        reports.append(update.report)
    assert any(r.plan["steps_cut"] for r in reports)  # the clock cut them: a replay without plans could differ

    lines = journal.following(0)
    assert [line.end for line in lines] == [{0: e} for e in range(60, 361, 60)]
    assert [line.fields["plan"] for line in lines] == [r.plan for r in reports]
    again = StreamDEC.load(model).set_params(centre_rule="dec", online_steps=5, max_update_ms=250.0)
    for line, xb, r in zip(lines, batches, reports):
        update = learner.learn_now(again, xb, plan=line.fields["plan"])
        assert update.replayed and update.report.steps == r.steps and update.report.model_version == r.model_version
        assert update.report.new_cluster_ids == r.new_cluster_ids and update.report.churn == r.churn
    learner.close()
    assert np.array_equal(again.predict(X), first.predict(X)) and again.version_ == first.version_
    again.set_params(online_steps=100000, max_update_ms=3.0)
    assert again.snapshot() == first.snapshot()  # every tensor and value of the state

"""Ownership decisions without a broker: rebalance events, owner epochs in real lease files, fencing, resume.

The events go through the real rebalance listener (stream_dec/service/clients.py) with
no consumer attached; the service side is a host that records what it was asked to do
(stream_dec/service/ownership.py, ``OwnerHost``).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from stream_dec.service.directory import DirectoryHealth
from stream_dec.service.fencing import Fenced, OwnerLease
from stream_dec.service.metrics import ServiceMetrics
from stream_dec.service.ownership import Ownership, keeps_model

PARTS = [TopicPartition("in", 0), TopicPartition("in", 1)]


class _Host:
    """The service's side of an ownership change, recorded."""

    def __init__(self, version=3, owner=None, learnt=False):
        self.offsets = {0: 10}
        self.model = _model(version, owner)
        self.learnt = learnt
        self.calls: list[str] = []

    def checkpoint(self):
        self.calls.append("checkpoint")

    def commit(self):
        self.calls.append("commit")

    def abandon(self):
        self.calls.append("abandon")
        return self.learnt

    def begin_assignment(self, partitions):
        self.calls.append(f"begin {len(partitions)}")

    def adopt(self, model):
        self.calls.append(f"adopt {model.version_}")
        self.model = model

    def resume(self, partitions):
        self.calls.append("resume")

    def assignment_done(self, partitions):
        self.calls.append(f"done {len(partitions)}")


class _Checkpointer:
    """The two things ownership reads of the checkpointer: the write in flight and its writer."""

    def __init__(self, written_by=None):
        self.written_by = written_by
        self.waited = 0

    def wait(self):
        self.waited += 1


def _model(version, owner=None):
    return SimpleNamespace(version_=version, checkpoint_extra_={"owner": owner} if owner else {})


def _ownership(tmp_path, host, *, newest=None, written_by=None, instance="me"):
    metrics = ServiceMetrics()
    own = Ownership(OwnerLease(tmp_path, instance), _Checkpointer(written_by), DirectoryHealth(tmp_path, metrics), metrics,
                    host, newest=lambda: newest, group="g")
    return own, own.listener(None), metrics


def _count(metrics, reason):
    return metrics.fenced.labels(reason)._value.get()


def test_an_assignment_claims_the_next_epoch_and_the_owner_may_write(tmp_path):
    OwnerLease(tmp_path, "earlier").claim()
    OwnerLease(tmp_path, "earlier").claim()
    host = _Host()
    own, listener, metrics = _ownership(tmp_path, host)
    assert own.fence_reason() == "not_owner" and own.owner() is None
    listener.on_partitions_assigned(PARTS)
    assert own.epoch is None  # the callback only records: the loop's thread acts
    own.handle_events()
    assert (own.epoch, own.owns, own.fence_reason()) == (3, True, None)
    assert own.owner() == {"instance": "me", "epoch": 3}
    assert host.calls == ["begin 2", "resume", "done 2"]  # no checkpoint on disk: the model in memory stays
    assert metrics.owner_epoch._value.get() == 3 and metrics.assigned._value.get() == 2
    with own.guard():
        pass


def test_an_empty_assignment_is_a_standby_that_claims_nothing(tmp_path):
    host = _Host()
    own, listener, _ = _ownership(tmp_path, host)
    listener.on_partitions_assigned([])
    own.handle_events()
    assert (own.epoch, own.owns, own.fence_reason()) == (None, False, "not_owner")
    assert host.calls == ["begin 0", "done 0"] and not list(tmp_path.glob("owner-*.lease"))


def test_a_newer_owner_fences_the_lease_guard_and_the_checkpoint_thread_refusal(tmp_path):
    own, listener, metrics = _ownership(tmp_path, _Host())
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    OwnerLease(tmp_path, "newer").claim()
    with pytest.raises(Fenced) as exc:
        with own.guard():
            pass
    assert exc.value.reason == "lease" and own.fence_reason() is None  # the guard reads the directory; the check does not
    own.checkpoint_fenced(Fenced("lease"))
    assert own.fence_reason() == "lease"
    with pytest.raises(Fenced):
        own.check()


def test_a_revocation_hands_over_while_the_owner_may_still_write(tmp_path):
    host = _Host()
    own, listener, metrics = _ownership(tmp_path, host)
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    host.calls.clear()
    listener.on_partitions_revoked(PARTS)
    own.handle_events()
    assert host.calls == ["checkpoint", "commit", "abandon"]
    assert (own.epoch, own.owns, own.dropped) == (None, False, False)
    assert _count(metrics, "lease") == _count(metrics, "lost") == 0 and metrics.owner_epoch._value.get() == 0


def test_a_revocation_after_a_newer_epoch_drops_without_writing(tmp_path):
    host = _Host()
    own, listener, metrics = _ownership(tmp_path, host)
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    own.checkpoint_fenced(Fenced("lease"))
    host.calls.clear()
    listener.on_partitions_revoked(PARTS)
    own.handle_events()
    assert host.calls == ["abandon"]  # no checkpoint, no commit
    assert (own.epoch, own.dropped, _count(metrics, "lease")) == (None, True, 1)


def test_lost_partitions_fence_at_once_and_are_never_handed_over(tmp_path):
    host = _Host()
    own, listener, metrics = _ownership(tmp_path, host)
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    host.calls.clear()
    listener.on_partitions_lost(PARTS)
    assert own.fence_reason() == "lost"  # seen mid-batch, before the loop handles the event
    own.handle_events()
    assert host.calls == ["abandon"] and (own.epoch, own.owns, own.dropped) == (None, False, True)
    assert _count(metrics, "lost") == 1
    own.drop(Fenced("lost"))  # a standby has nothing to drop: counted once
    assert _count(metrics, "lost") == 1


def test_a_revocation_of_a_standby_only_releases(tmp_path):
    host = _Host(learnt=True)
    own, listener, _ = _ownership(tmp_path, host)
    listener.on_partitions_revoked([])
    own.handle_events()
    assert host.calls == ["abandon"] and own.dropped  # the host said the model learnt something unjournaled


def test_reassigned_without_revocation_checkpoints_then_claims_a_new_epoch(tmp_path):
    host = _Host()
    own, listener, _ = _ownership(tmp_path, host)
    listener.on_partitions_assigned(PARTS)
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    assert own.epoch == 2
    assert host.calls == ["begin 2", "resume", "done 2", "begin 2", "checkpoint", "resume", "done 2"]


def test_resume_keeps_the_model_only_when_it_is_exactly_the_newest_checkpoint(tmp_path):
    mine = {"instance": "me", "epoch": 1}
    cases = [
        (_model(3, mine), mine, [], "the checkpoint this instance wrote last"),
        (_model(4, mine), mine, ["adopt 4"], "a newer version"),
        (_model(3, {"instance": "other", "epoch": 2}), mine, ["adopt 3"], "another lineage at the same version"),
    ]
    for newest, written_by, adopted, why in cases:
        host = _Host(version=3, owner=mine)
        ckpt = tmp_path / why.replace(" ", "_")
        ckpt.mkdir()
        own, listener, _ = _ownership(ckpt, host, newest=newest, written_by=written_by)
        listener.on_partitions_assigned(PARTS)
        own.handle_events()
        assert [c for c in host.calls if c.startswith("adopt")] == adopted, why
        assert own.checkpointer.waited == 1  # a write in flight lands before the newest is read


def test_a_dropped_model_is_replaced_even_by_its_own_checkpoint(tmp_path):
    mine = {"instance": "me", "epoch": 1}
    newest = _model(3, mine)
    assert keeps_model(newest, _model(3, mine), mine, dropped=False)
    assert not keeps_model(newest, _model(3, mine), mine, dropped=True)
    host = _Host(version=3, owner=mine, learnt=True)
    own, listener, _ = _ownership(tmp_path, host, newest=newest, written_by=mine)
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    listener.on_partitions_lost(PARTS)
    own.handle_events()
    assert own.dropped
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    assert "adopt 3" in host.calls and not own.dropped


def test_a_failed_claim_releases_and_is_retried_after_the_backoff(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.write_text("not a directory")  # the lease cannot be claimed
    host = _Host()
    own, listener, metrics = _ownership(ckpt, host)
    listener.on_partitions_assigned(PARTS)
    own.handle_events()
    assert (own.epoch, own.owns) == (None, False) and metrics.ckpt_failures._value.get() == 1
    assert host.calls == ["begin 2", "abandon"] and own.claim_at == own.directory.retry_at
    own.handle_events()  # before the backoff: the event waits
    assert host.calls == ["begin 2", "abandon"]
    ckpt.unlink()
    ckpt.mkdir()
    time.sleep(max(0.0, own.claim_at - time.monotonic()))
    own.handle_events()
    assert own.epoch == 1 and host.calls[-3:] == ["begin 2", "resume", "done 2"]

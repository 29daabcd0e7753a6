"""The checkpointer on real files, without a broker: writes, journal pruning, failed writes."""

from __future__ import annotations

import threading

import pytest

from stream_dec import StreamDEC
from stream_dec.service.checkpointer import Checkpointer, checkpoint_offsets
from stream_dec.service.journal import JOURNAL, Journal
from stream_dec.service.metrics import ServiceMetrics


@pytest.fixture
def model(fitted, tmp_path):
    """A private copy of the fitted model (version 0)."""
    fitted.save(tmp_path / "base.sdec")
    return StreamDEC.load(tmp_path / "base.sdec")


def _checkpointer(directory, journal, version, **kw):
    written = []
    cp = Checkpointer(directory, journal=journal, topic="in", version=version, keep=2, metrics=ServiceMetrics(),
                      on_written=lambda v, s: written.append((v, threading.current_thread().name)), **kw)
    return cp, written


def test_a_checkpoint_holds_the_model_and_offsets_and_prunes_the_journal(model, blobs, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    journal = Journal(d / JOURNAL, base=0)
    cp, written = _checkpointer(d, journal, 0)
    journal.append({0: 64}, labelled_by=0)
    model.partial_fit(blobs["X"][:64])
    cp.take(model, {0: 64}, wait=False)  # serialised here, written on the checkpoint thread
    journal.append({0: 128}, labelled_by=1)  # a batch processed while it is written
    cp.wait()
    cp.close()
    assert cp.version == journal.base == 1
    assert written == [(1, "stream-dec-checkpoint_0")]
    loaded = StreamDEC.load(d)
    assert loaded.version_ == 1 and checkpoint_offsets(loaded, "in") == {0: 64}
    assert checkpoint_offsets(loaded, "other") == {}
    # Only the batch after the checkpoint is left, now following it.
    assert [(line.base, line.end) for line in journal.lines()] == [(1, {0: 128})]
    assert cp.metrics.ckpt_failures._value.get() == 0


def test_a_failed_write_keeps_the_version_and_every_journal_line(model, blobs, tmp_path):
    d = tmp_path / "ckpt"
    d.write_text("a file where the checkpoint directory should be")
    journal = Journal(tmp_path / JOURNAL, base=0)
    cp, written = _checkpointer(d, journal, 0)
    journal.append({0: 64}, labelled_by=0)
    model.partial_fit(blobs["X"][:64])
    cp.take(model, {0: 64})
    journal.append({0: 128}, labelled_by=1)
    assert cp.version == 0 and journal.base == 0 and written == []
    assert cp.metrics.ckpt_failures._value.get() == 1
    # A restart from checkpoint 0 still finds both batches.
    assert [line.end for line in journal.following(0)] == [{0: 64}, {0: 128}]

    d.unlink()  # the disk recovers: the next checkpoint covers the first two batches
    model.partial_fit(blobs["X"][64:128])
    journal.append({0: 192}, labelled_by=2)
    model.partial_fit(blobs["X"][128:192])
    cp.take(model, {0: 128})
    cp.close()
    assert cp.version == journal.base == 3 and written == [(3, "stream-dec-checkpoint_0")]
    assert [(line.base, line.end) for line in journal.lines()] == [(3, {0: 192})]


def test_checkpoints_are_due_every_interval_batches(model, tmp_path):
    cp, _ = _checkpointer(tmp_path, Journal(tmp_path / JOURNAL, base=0), 0, interval=3)
    assert [cp.batch_done() for _ in range(3)] == [False, False, True]
    cp.take(model, {})
    assert [cp.batch_done() for _ in range(3)] == [False, False, True]
    cp.reset(7)
    assert cp.version == 7 and cp.journal.base == 7 and not cp.batch_done()
    cp.close()

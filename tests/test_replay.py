"""Crash and replay without a broker: a real model, journal and checkpoint files, records as polled.

The rooms of stream_dec/service/ together: a first run cuts batches, journals their
ends, checkpoints once and "crashes"; a restart from the checkpoint, reading the records
again in other poll chunks, cuts the same batches from the journal and publishes the
same labels (exact duplicates), then goes on by size.
"""

from __future__ import annotations

import numpy as np
import pytest
from kafka_helpers import consumer_record

from stream_dec import StreamDEC
from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, decode_batch, encode_float32
from stream_dec.service.batcher import Batcher
from stream_dec.service.checkpointer import Checkpointer, checkpoint_offsets
from stream_dec.service.journal import JOURNAL, Journal

HEADERS = [("content-type", CONTENT_TYPE_FLOAT32.encode())]


def _records(X: np.ndarray) -> dict[int, list]:
    """Rows of X spread over two partitions, as kafka-python's poll returns them."""
    parts: dict[int, list] = {0: [], 1: []}
    for i, x in enumerate(X):
        p = i % 3 % 2  # partition 0 gets two rows in three
        parts[p].append(consumer_record(p, len(parts[p]), key=f"id-{i}".encode(), value=encode_float32(x), headers=HEADERS))
    return parts


def _run(model, journal, parts, offsets, seed, max_batches=None, checkpoint_after=None, checkpointer=None):
    """Poll ``parts`` from ``offsets`` in random chunks, cut, journal, label and learn; the published batches.

    Each published batch: (ids, labels, confidences, model version).
    """
    rng = np.random.default_rng(seed)
    # No wait: every cut takes what is pending, so the batches follow the poll chunks.
    batcher = Batcher(40, 0)
    batcher.replay_from(journal.following(int(model.version_)))
    pos, offsets, published = dict(offsets), dict(offsets), []
    while max_batches is None or len(published) < max_batches:
        for p in parts:
            chunk = parts[p][pos.get(p, 0) : pos.get(p, 0) + int(rng.integers(1, 25))]
            pos[p] = pos.get(p, 0) + len(chunk)
            batcher.add(chunk)
        done = all(pos[p] >= len(parts[p]) for p in parts)
        while (max_batches is None or len(published) < max_batches) and (batch := batcher.cut(offsets, now=done)) is not None:
            decoded = decode_batch([(r.key, r.value, r.headers) for r in batch.records], dim=model.n_features_in_)
            version = int(model.version_)
            if batch.journaled is None:
                journal.append(batch.end, labelled_by=version)
            labels, conf = model.predict_with_confidence(decoded.X)
            model.partial_fit(decoded.X)
            offsets.update(batch.end)
            published.append((decoded.ids, labels.tolist(), conf.tolist(), version))
            if checkpoint_after is not None and len(published) == checkpoint_after:
                checkpointer.take(model, offsets)
        if done and not batcher.pending:
            break
    return published


@pytest.fixture
def ckpt_dir(fitted, tmp_path):
    d = tmp_path / "ckpt"
    fitted.save(d)
    return d


@pytest.mark.parametrize("torn", [False, True])
def test_a_restart_replays_the_journaled_batches_exactly(blobs, ckpt_dir, torn):
    X = np.concatenate([blobs["X"][:300], blobs["X_new"][:60]])
    X = X[np.random.default_rng(3).permutation(len(X))]
    parts = _records(X)
    model = StreamDEC.load(ckpt_dir)
    journal = Journal(ckpt_dir / JOURNAL, base=model.version_)
    cp = Checkpointer(ckpt_dir, journal=journal, topic="in", version=model.version_)
    first = _run(model, journal, parts, {}, seed=1, max_batches=9, checkpoint_after=3, checkpointer=cp)
    cp.close()  # then the crash: six batches published after the checkpoint
    assert cp.version == first[3][3] and len(journal.following(cp.version)) == 6
    if torn:  # the crash came in the middle of the last line
        path = ckpt_dir / JOURNAL
        path.write_bytes(path.read_bytes()[:-7])

    restarted = StreamDEC.load(ckpt_dir)
    offsets = checkpoint_offsets(restarted, "in")
    assert restarted.version_ == cp.version and sum(offsets.values()) == sum(len(b[0]) for b in first[:3])
    journal = Journal(ckpt_dir / JOURNAL, base=restarted.version_)
    journal.seal()
    again = _run(restarted, journal, parts, offsets, seed=2)
    exact = 5 if torn else 6
    assert again[:exact] == first[3 : 3 + exact]  # same batches, same labels, confidences, versions
    assert sorted(i for b in first[:3] + again for i in b[0]) == sorted(f"id-{i}" for i in range(len(X)))  # nothing lost

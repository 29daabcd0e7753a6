"""Predict-only snapshots label exactly as the model, and learning from latents equals learning from inputs."""

from __future__ import annotations

import numpy as np
import pytest

from stream_dec import StreamDEC
from stream_dec.online.snapshot import (
    PredictSnapshot,
    SnapshotError,
    encoder_fingerprint,
)


def _stream(blobs, n=12):
    return [np.concatenate([blobs["X"][t * 60 : t * 60 + 60], blobs["X_new"][t * 25 : t * 25 + 25]]) for t in range(n)]


def _clone(model, tmp_path, name="m"):
    return StreamDEC.load(model.save(tmp_path / name))


def test_snapshot_labels_like_the_model_at_every_version(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    X_all = np.concatenate([blobs["X"], blobs["X_new"]])
    for batch in [None, *_stream(blobs)]:
        if batch is not None:
            m.partial_fit(batch)
        s = PredictSnapshot.from_bytes(PredictSnapshot.from_model(m).to_bytes())
        ids, conf = s.predict_with_confidence(X_all)
        m_ids, m_conf = m.predict_with_confidence(X_all)
        assert s.version == m.version_
        np.testing.assert_array_equal(ids, m_ids)
        np.testing.assert_array_equal(conf, m_conf)
        np.testing.assert_array_equal(s.roots(ids), m.roots(ids))
        np.testing.assert_array_equal(s.cluster_ids_, m.cluster_ids_)
        np.testing.assert_array_equal(s.transform(X_all), m.transform(X_all))
    assert m.n_clusters_ > 5  # the stream made new ids, and the snapshot carried them


def test_bytes_are_deterministic_and_self_checking(fitted, tmp_path):
    a = PredictSnapshot.from_model(fitted).to_bytes()
    assert a == PredictSnapshot.from_model(_clone(fitted, tmp_path)).to_bytes()
    assert a == PredictSnapshot.from_bytes(a).to_bytes()
    damaged = bytearray(a)
    damaged[len(a) // 2] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum"):
        PredictSnapshot.from_bytes(bytes(damaged))
    with pytest.raises(SnapshotError, match="magic"):
        PredictSnapshot.from_bytes(b"not a snapshot at all, just bytes of text")
    with pytest.raises(SnapshotError):
        PredictSnapshot.from_bytes(a[:-10])


def test_snapshot_rejects_bad_input(fitted):
    s = PredictSnapshot.from_model(fitted)
    with pytest.raises(ValueError, match="features"):
        s.predict(np.zeros((3, fitted.n_features_in_ + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        s.predict(np.full((2, fitted.n_features_in_), np.nan, dtype=np.float32))


def test_partial_fit_latent_equals_partial_fit(fitted, blobs, tmp_path):
    a, b = _clone(fitted, tmp_path, "a"), _clone(fitted, tmp_path, "b")
    for batch in _stream(blobs):
        ra = a.partial_fit(batch)
        rb = b.partial_fit_latent(b.transform(batch))
        assert ra.plan == rb.plan and ra.new_cluster_ids == rb.new_cluster_ids and ra.churn == rb.churn
    np.testing.assert_array_equal(a.predict(blobs["X_new"]), b.predict(blobs["X_new"]))
    assert PredictSnapshot.from_model(a).to_bytes() == PredictSnapshot.from_model(b).to_bytes()
    with pytest.raises(ValueError, match="features"):
        b.partial_fit_latent(blobs["X"][:10])  # inputs, not latents


def test_encoder_fingerprint_names_the_fit_not_the_version(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    before = encoder_fingerprint(m)
    m.partial_fit(_stream(blobs)[0])
    assert encoder_fingerprint(m) == before == PredictSnapshot.from_model(m).encoder_id
    other = StreamDEC(n_clusters=5, random_state=1, hidden_dims=(32,), latent_dim=8, pretrain_epochs=2,
                      refine_max_iter=0, n_init=1).fit(blobs["X"])
    assert encoder_fingerprint(other) != before


def test_snapshot_size_at_200_ids_is_a_few_hundred_kb():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 384)).astype(np.float32)
    m = StreamDEC(n_clusters=200, random_state=0, pretrain_epochs=1, refine_max_iter=0, n_init=1).fit(X)
    size = len(PredictSnapshot.from_model(m).to_bytes())
    # The default linear 384 -> 128 encoder (197 KB) plus two 128-d prototypes per id.
    assert 300_000 < size < 600_000

"""Confidence: the folded-normal calibration of the margin, and what the estimator publishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_dec import StreamDEC
from stream_dec.online import gates
from stream_dec.online.confidence import Calibration, confidence, fit, fit_margins, margins, sample_rows

from conftest import FAST


def test_em_recovers_the_signed_margin_from_its_absolute_value_and_is_calibrated():
    """Signed margins s ~ N(3, 2²); only |s| is given. P(right | m) = sigmoid(β m) matches the share with s > 0."""
    rng = np.random.default_rng(0)
    s = rng.normal(3.0, 2.0, 200_000)
    cal = fit(np.abs(s))
    assert cal.mu == pytest.approx(3.0, rel=0.02) and cal.var == pytest.approx(4.0, rel=0.03)
    assert cal.slope == pytest.approx(2 * 3.0 / 4.0, rel=0.04)
    m = np.abs(s)
    p = 1.0 / (1.0 + np.exp(-cal.slope * m))
    for lo in (0.0, 0.5, 1.0, 2.0, 4.0):
        sel = (m >= lo) & (m < lo + 0.5)
        assert p[sel].mean() == pytest.approx((s[sel] > 0).mean(), abs=0.02), lo


def test_no_separation_gives_a_flat_slope_and_empty_input_is_safe():
    assert fit(np.zeros(0)) == Calibration() and Calibration().slope == 0.0
    # No sign more likely than the other: the fitted mean is a small share of the spread
    # (the folded normal's likelihood is flat near μ = 0, so EM stops short of it).
    half_normal = fit(np.abs(np.random.default_rng(1).normal(0.0, 1.0, 50_000)))
    assert half_normal.mu < 0.35 * half_normal.var**0.5
    assert Calibration.from_state(Calibration(2.0, 3.0).state()) == Calibration(2.0, 3.0)


def test_confidence_is_the_softmax_of_minus_slope_times_distance_at_the_winner():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(50, 4, generator=g) * 10
    cal = Calibration(mu=2.0, var=5.0)
    want = torch.softmax(-cal.slope * d, 1).max(1).values
    assert torch.allclose(confidence(d, cal), want, atol=1e-6)
    assert torch.allclose(confidence(d, Calibration()), torch.full((50,), 0.25))  # nothing separates: 1/K
    assert torch.equal(confidence(d[:, :1], cal), torch.ones(50))  # one id: certain
    assert torch.equal(margins(torch.tensor([[3.0, 1.0, 2.0]])), torch.tensor([1.0]))
    assert fit_margins(d[:, :1]) == Calibration()
    assert sample_rows(0).tolist() == [] and sample_rows(5, 3).tolist() == [0, 2, 4] and len(sample_rows(10_000)) == 256


def test_estimator_publishes_the_calibrated_confidence_of_its_labels(fitted, blobs):
    X = np.concatenate([blobs["X"][:200], blobs["X_new"][:50]])
    ids, conf = fitted.predict_with_confidence(X)
    assert np.array_equal(ids, fitted.predict(X))
    cal = fitted.confidence_calibration()
    d = gates.distances(fitted.clusters_, torch.from_numpy(fitted.transform(X)))[1]
    assert np.allclose(conf, confidence(d, cal).numpy(), atol=1e-7)
    assert cal.slope > 0 and (conf >= 1.0 / fitted.n_clusters_ - 1e-6).all() and (conf <= 1).all()


def test_confidence_is_calibrated_on_two_overlapping_groups():
    """Two Gaussian groups that overlap: the share right at each confidence follows the confidence."""
    rng = np.random.default_rng(5)
    centres = np.zeros((2, 4))
    centres[1, 0] = 3.0  # 1.5 standard deviations from the boundary each: about 7% cross it
    y = rng.integers(0, 2, 6000)
    X = (centres[y] + rng.standard_normal((6000, 4))).astype(np.float32)
    m = StreamDEC(n_clusters=2, random_state=0, **{**FAST, "latent_dim": 4}).fit(X[:3000])
    ids, conf = m.predict_with_confidence(X[3000:])
    truth = y[3000:]
    right = np.zeros(len(ids), dtype=bool)
    for c in (0, 1):
        right[truth == c] = ids[truth == c] == np.bincount(ids[truth == c]).argmax()
    assert abs(conf.mean() - right.mean()) < 0.03
    low, high = conf < 0.8, conf >= 0.95
    assert right[low].mean() < 0.8 < right[high].mean()
    assert abs(conf[low].mean() - right[low].mean()) < 0.05


def test_calibration_follows_the_model_and_survives_a_checkpoint(fitted, blobs, tmp_path):
    fitted.save(tmp_path / "m.sdec")
    m = StreamDEC.load(tmp_path / "m.sdec")
    X = np.concatenate([blobs["X"][:300], blobs["X_new"][:100]])
    before = m.confidence_calibration()
    assert before == fitted.confidence_calibration()
    m.partial_fit(X)
    assert m.confidence_calibration() is m.confidence_calibration()  # computed once per version
    assert m.confidence_calibration() != before
    m2 = StreamDEC.load(m.save(tmp_path / "m2.sdec"))
    a, b = m.predict_with_confidence(X), m2.predict_with_confidence(X)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    m.set_params(online_steps=0).partial_fit(X)  # label only: the model and its calibration stay
    assert m.confidence_calibration() == m2.confidence_calibration()

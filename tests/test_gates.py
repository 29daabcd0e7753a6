"""Gates: a moved prototype takes no remembered item of another id; a new cluster's gate bounds what it takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_dec import StreamDEC
from stream_dec.model import squared_distances
from stream_dec.online import gates


def _model(fitted, tmp_path) -> StreamDEC:
    fitted.save(tmp_path / "m.sdec")
    return StreamDEC.load(tmp_path / "m.sdec")


def _moved_into_cluster_1(fitted, tmp_path, weight: float):
    """A copy of ``fitted`` whose cluster 0 current prototype moved ``weight`` of the way onto
    cluster 1's memory prototype; returns ``(table, reservoir, reservoir rows before the move)``."""
    m = _model(fitted, tmp_path)
    t = m.clusters_
    res = torch.from_numpy(m.reservoir_.data)
    before = gates.assign(t, res)
    t.centres = t.centres.clone()
    t.centres[0] = weight * t.memory[1] + (1 - weight) * t.memory[0]
    return t, res, before


def test_moving_gate_keeps_a_moved_prototype_off_other_ids_items(fitted, tmp_path):
    t, res, before = _moved_into_cluster_1(fitted, tmp_path, 1.0)  # right onto cluster 1's memory prototype
    assert (gates.assign(t, res) != before).float().mean() > 0.05  # ungated, it steals cluster 1's items
    both = gates.calibrate_moving_gates(t, res, before, margin=0.1, churn=0.0)
    assert both.shape == (len(res), 2 * len(t))
    assert torch.equal(gates.assign(t, res), before)
    assert (t.gate_cur >= 1).all() and t.gate_cur[0] > 1


def test_new_cluster_gate_bounds_the_share_of_the_reservoir_it_takes(fitted, tmp_path):
    m = _model(fitted, tmp_path)
    t = m.clusters_
    res = torch.from_numpy(m.reservoir_.data)
    held = gates.held_distance(t, res, None)
    c = res[:50].mean(0)  # a centre inside the remembered data
    for churn in (0.0, 0.01, 0.2):
        gate = gates.new_cluster_gate(c, res, held, margin=0.1, churn=churn)
        taken = float((squared_distances(res, c[None, :]).squeeze(1) * gate < held).float().mean())
        assert gate >= 1.21 and taken <= churn
    assert gates.new_cluster_gate(c, res[:0], None, margin=0.5, churn=0.01) == 2.25  # nothing to calibrate on


def test_explain_and_assign_agree_with_predict(fitted, blobs):
    z = torch.from_numpy(fitted.transform(blobs["X"]))
    nearest, explained = gates.explain(fitted.clusters_, z)
    assert np.array_equal(fitted.cluster_ids_[nearest.numpy()], fitted.predict(blobs["X"]))
    assert torch.equal(nearest, gates.assign(fitted.clusters_, z))
    assert 0.85 < float(explained.float().mean()) < 1.0  # the radius is the 95% quantile of the fitted items


def test_moving_gate_margin_is_measured_on_held_out_remembered_items(fitted, tmp_path):
    t, res, before = _moved_into_cluster_1(fitted, tmp_path, 0.8)  # into cluster 1's items: its gate must exceed 1
    # A budget no held-out half can show (none) keeps the whole margin.
    gates.calibrate_moving_gates(t, res, before, margin=0.1, churn=0.0)
    fixed = t.gate_cur.clone()
    assert fixed[0] > 1.21
    # A generous one is shown at margin 0: the moved prototype's gate loses the (1.1)² factor.
    gates.calibrate_moving_gates(t, res, before, margin=0.1, churn=0.5)
    assert float(t.gate_cur[0]) == pytest.approx(float(fixed[0]) / 1.21, rel=1e-6)
    # Even without a margin, no remembered item changes id (at most the one at the gate's tie).
    assert int((gates.assign(t, res) != before).sum()) <= 1

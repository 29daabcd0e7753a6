"""The cluster table and the parts that keep per-cluster rows of their own (EWC, the DEC rule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_dec.online.clusters import FIELDS, ClusterTable, NewCluster
from stream_dec.online.ewc import OnlineEWC
from stream_dec.online.rules import DecRule, MeanRule, make_rule


def _table(k=3, d=4):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(k, d, generator=g)
    z = torch.randn(200, d, generator=g)
    t = ClusterTable.from_fit(centres, radius=torch.arange(1.0, k + 1), freq=torch.tensor([0.5, 0.3, 0.2]))
    ewc = OnlineEWC.from_fit(z, centres, counts=torch.tensor([100, 60, 40]), alpha=1.0)
    rule = DecRule(k, d)
    rule.m += 1.0  # moments of the fitted clusters, to see that they survive appends and drops
    t.parts = [ewc, rule]
    return t, ewc, rule


def test_append_and_drop_keep_every_column_and_part_in_step():
    t, ewc, rule = _table()
    t.begin_update()
    a = t.append(NewCluster(centre=torch.full((4,), 7.0), gate=2.0, radius=5.0, support=30))
    b = t.append(NewCluster(centre=torch.full((4,), 9.0), gate=3.0, radius=6.0, support=40))
    assert (a, b) == (3, 4) and t.ids.tolist() == [0, 1, 2, 3, 4] and t.next_id == 5
    # A new cluster starts at the mean frequency of the clusters the update started with.
    assert torch.allclose(t.freq[3:], torch.full((2,), 1 / 3))
    assert t.spawned.tolist() == [False, False, False, True, True] and t.gate_cur.tolist()[3:] == [2.0, 3.0]
    assert torch.equal(t.memory[4], torch.full((4,), 9.0)) and torch.equal(ewc.anchor[4], torch.full((4,), 9.0))
    # Under the default (Gaussian) likelihood a new cluster's Fisher is its founding item count.
    assert ewc.evidence.tolist() == [100, 60, 40, 30, 40] and torch.equal(ewc.fisher[3:], torch.tensor([[30.0] * 4, [40.0] * 4]))
    assert (rule.m[:3] == 1).all() and (rule.m[3:] == 0).all() and rule.t.shape == (5,)
    t.drop(a)
    assert t.ids.tolist() == [0, 1, 2, 4] and t.next_id == 5  # the dropped id is never reused
    assert t.radius.tolist() == [1.0, 2.0, 3.0, 6.0] and ewc.evidence.tolist() == [100, 60, 40, 40]
    assert torch.equal(ewc.anchor[3], torch.full((4,), 9.0)) and rule.m.shape == (4, 4) and rule.v.shape == (4, 4)
    assert all(len(getattr(t, f.name)) == 4 for f in FIELDS)


def test_published_clusters_are_never_dropped():
    t, _, _ = _table()
    t.begin_update()
    with pytest.raises(ValueError, match="never dropped"):
        t.drop(1)


def test_state_round_trip():
    t, ewc, rule = _table()
    t.begin_update()
    t.append(NewCluster(centre=torch.ones(4), gate=2.0, radius=5.0, support=30, parent=1, born=7))
    t2 = ClusterTable.from_state(t.state(), torch.device("cpu"))
    assert set(t.state()) == {"next_id"} | {f.name for f in FIELDS}
    assert t2.ids.dtype == np.int64 and np.array_equal(t2.ids, t.ids) and t2.next_id == t.next_id
    for f in FIELDS[1:]:
        same = np.array_equal if f.host else torch.equal
        assert same(getattr(t2, f.name), getattr(t, f.name)), f.name
    ewc2 = OnlineEWC.from_state(ewc.state(), torch.device("cpu"))
    assert torch.equal(ewc2.fisher, ewc.fisher) and torch.equal(ewc2.evidence, ewc.evidence)
    assert t2.parent_ids() == {0: None, 1: None, 2: None, 3: 1} and t2.born.tolist() == [0, 0, 0, 7]
    rule2 = DecRule(len(t), 4)
    rule2.load_state(rule.state())
    assert torch.equal(rule2.m, rule.m)
    with pytest.raises(ValueError, match="do not fit"):
        DecRule(2, 4).load_state(rule.state())
    with pytest.raises(ValueError, match="disagree"):
        ClusterTable({**{f.name: getattr(t, f.name) for f in FIELDS}, "radius": t.radius[:2]}, next_id=9)


def test_rules_by_name():
    assert isinstance(make_rule("mean", 3, 4, "cpu"), MeanRule) and make_rule("mean", 3, 4, "cpu").state() == {}
    assert isinstance(make_rule("dec", 3, 4, "cpu"), DecRule)
    with pytest.raises(ValueError, match="unknown centre rule"):
        make_rule("median", 3, 4, "cpu")


def test_mean_rule_is_the_precision_weighted_mean(fitted, blobs, tmp_path):
    """η_j = n_j / (n_j + λ e_j): with λ = 0 a centre jumps to the mean of its batch items."""
    from stream_dec import StreamDEC

    fitted.save(tmp_path / "m.sdec")
    X = blobs["X"][:300]
    for lam in (0.0, 0.5):
        m = StreamDEC.load(tmp_path / "m.sdec").set_params(ewc_lambda=lam, max_churn=1.0, max_total_churn=1.0)
        z, rows = torch.from_numpy(m.transform(X)), np.searchsorted(m.cluster_ids_, m.predict(X))
        c0, e0 = m.centres_.clone(), m.evidence_.clone()
        m.partial_fit(X)
        for j in range(len(c0)):
            n = int((rows == j).sum())
            eta = n / (n + lam * float(e0[j]))
            expect = c0[j] + eta * (z[rows == j].mean(0) - c0[j]) if n else c0[j]
            assert torch.allclose(m.centres_[j], expect, atol=1e-5), (lam, j)


def test_follow_nearest_moves_a_prototype_by_the_items_nearest_it_not_by_their_labels(fitted, blobs, tmp_path):
    """follow="nearest": the E-step over current prototypes; the labels stay the gates' business."""
    from stream_dec import StreamDEC
    from stream_dec.model import squared_distances
    from stream_dec.online import gates

    fitted.save(tmp_path / "m.sdec")
    X = blobs["X"][:300]
    moved = {}
    for follow in ("labels", "nearest"):
        m = StreamDEC.load(tmp_path / "m.sdec").set_params(ewc_lambda=0.0, max_churn=1.0, max_total_churn=1.0, follow=follow)
        t = m.clusters_
        res = torch.from_numpy(m.reservoir_.data)
        held = gates.assign(t, res)
        t.centres = t.centres.clone()
        t.centres[0] = 0.7 * t.memory[1] + 0.3 * t.memory[0]  # cluster 0's prototype drifted into cluster 1
        gates.calibrate_moving_gates(t, res, held, m.margin, m.new_cluster_churn)
        z, c0, anchor = torch.from_numpy(m.transform(X)), t.centres.clone(), m.ewc_.anchor.clone()
        labels = np.searchsorted(m.cluster_ids_, m.predict(X))
        nearest = squared_distances(z, c0).argmin(1).numpy()
        assert (labels != nearest).sum() > 10  # the two groupings differ here, so the rule is tested
        rows = nearest if follow == "nearest" else labels
        m.partial_fit(X)
        for j in range(len(c0)):
            expect = z[rows == j].mean(0) if (rows == j).any() else anchor[j]  # no items: back to the EWC anchor
            assert torch.allclose(m.centres_[j], expect, atol=1e-5), (follow, j)
        moved[follow] = m.centres_[: len(c0)].clone()
    assert not torch.allclose(moved["labels"], moved["nearest"])


def test_reservoir_mirror_follows_every_write():
    """The device mirror (tested on the CPU through its private path) equals the rows after any adds."""
    from stream_dec.online.reservoir import Reservoir

    rng = np.random.default_rng(0)
    r = Reservoir(capacity=50, dim=3)
    cpu = torch.device("cpu")
    for n in (20, 20, 25, 7, 60, 1):
        rows = rng.standard_normal((n, 3)).astype(np.float32)
        r.add(rows, ids=rng.integers(0, 9, n), rng=rng)
        mirror_rows, mirror_ids = r._mirrored(cpu)
        assert torch.equal(mirror_rows, torch.from_numpy(r.data)) and torch.equal(mirror_ids, torch.from_numpy(r.ids))
    rows, ids = r.tensors("cpu")
    assert rows.data_ptr() == torch.from_numpy(r.data).data_ptr()  # a view on the CPU, no copy

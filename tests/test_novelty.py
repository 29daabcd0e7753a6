"""Novelty window and proposal rules."""

from __future__ import annotations

import numpy as np
import torch

from stream_dec.model import squared_distances
from stream_dec.online.novelty import NoveltyBuffer, propose_anchored
from stream_dec.online.reservoir import Reservoir


def test_window_evicts_by_age_and_capacity_and_returns_what_left():
    buf = NoveltyBuffer(capacity=10, dim=2, ttl=3)
    for v in range(1, 5):
        out_z, out_ids = buf.add(np.full((4, 2), v, np.float32), np.full(4, v), np.zeros(4, bool), version=v)
        if v == 3:  # 12 rows > capacity 10: the two oldest rows leave
            assert len(out_z) == 2 and (out_ids == 1).all()
        if v == 4:  # batch 1 is now older than ttl=3 batches, and two more rows overflow
            assert sorted(out_ids.tolist()) == [1, 1, 2, 2]
    assert len(buf) == 10 and set(buf.born.tolist()) == {2, 3, 4}
    buf.remove(np.arange(3))
    assert len(buf) == 7 and len(buf.ids) == len(buf.born) == len(buf.unexplained) == 7
    restored = NoveltyBuffer.from_state(buf.state())
    assert np.array_equal(restored.z, buf.z) and np.array_equal(restored.ids, buf.ids)


def test_reservoir_is_a_uniform_sample_with_ids():
    rng = np.random.default_rng(0)
    res = Reservoir(capacity=500, dim=1)
    for start in range(0, 20000, 1000):
        rows = np.arange(start, start + 1000, dtype=np.float32)[:, None]
        slots = res.add(rows, rows[:, 0].astype(np.int64), rng)
        assert len(slots) <= 1000
    assert len(res) == 500 and res.n_seen == 20000
    assert np.array_equal(res.data[:, 0].astype(np.int64), res.ids)
    # A uniform sample of 0..19999 has mean ~10000 and covers early and late rows alike.
    assert abs(res.data.mean() - 10000) < 800
    assert (res.data < 5000).sum() > 80 and (res.data >= 15000).sum() > 80


def test_anchored_proposal_finds_the_dense_new_group_not_the_noise():
    g = torch.Generator().manual_seed(0)
    old = torch.tensor([[0.0] * 16, [10.0] + [0.0] * 15])
    new_centre = torch.tensor([0.0, 10.0] + [0.0] * 14)
    old_items = torch.cat([old[i] + torch.randn(300, 16, generator=g) for i in range(2)])
    new_items = new_centre + torch.randn(150, 16, generator=g)
    noise = torch.randn(60, 16, generator=g) * 12
    z = torch.cat([old_items, new_items, noise])
    d_old = squared_distances(z, old).min(1).values
    props = propose_anchored(z, d_old, min_support=40, max_new=4, generator=g, gate=1.21)
    assert 1 <= len(props) <= 2
    assert torch.norm(props[0] - new_centre) < 1.5

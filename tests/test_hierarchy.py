"""The id hierarchy in the model: a child refines its parent (announced, not churn), never another id beyond the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_dec import StreamDEC
from stream_dec.online import gates
from stream_dec.online.clusters import ClusterTable, NewCluster
from stream_dec.online.guard import churned

D = 8
FAST = dict(hidden_dims=(), pretrain_epochs=20, refine_max_iter=0, n_init=1, verbose=False, device="cpu", max_update_ms=1e6)


def _hierarchical_churn(ids0: np.ndarray, ids: np.ndarray, parents: dict) -> float:
    """Share of items whose id is neither their first id nor a descendant of it."""
    def lineage(i):
        out = [i]
        while parents.get(out[-1]) is not None:
            out.append(parents[out[-1]])
        return out

    return float(np.mean([a not in lineage(b) for a, b in zip(ids0.tolist(), ids.tolist())]))


class _Stream:
    """A broad fitted blob A holding a dense novel group N, a second blob B, and a far group F from batch 3 on."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.A, self.B, self.N, self.F = (np.zeros(D) for _ in range(4))
        self.B[0], self.N[1], self.F[2] = 40.0, 6.0, -40.0

    def blob(self, centre: np.ndarray, spread: float, n: int) -> np.ndarray:
        return (centre + spread * self.rng.normal(size=(n, D))).astype(np.float32)

    def fit_data(self) -> np.ndarray:
        return np.concatenate([self.blob(self.A, 3, 400), self.blob(self.B, 3, 400)])

    def ref(self) -> tuple[np.ndarray, np.ndarray]:
        return self.blob(self.A, 3, 200), self.blob(self.B, 3, 200)

    def batch(self, t: int) -> np.ndarray:
        far = self.blob(self.F, 1, 30 if t >= 3 else 0)
        return np.concatenate([self.blob(self.A, 3, 60), self.blob(self.B, 3, 60), self.blob(self.N, 0.8, 40), far])


def _run(refine_share: float, **params):
    s = _Stream()
    m = StreamDEC(n_clusters=2, random_state=0, refine_share=refine_share, **FAST, **params).fit(s.fit_data())
    ref_a, ref_b = s.ref()
    a0, b0 = m.predict(ref_a), m.predict(ref_b)
    events, reports, churn = [], [], []
    for t in range(10):
        r = m.partial_fit(s.batch(t))
        reports.append(r)
        events += r.lifecycle
        churn.append(_hierarchical_churn(np.concatenate([a0, b0]), m.predict(np.concatenate([ref_a, ref_b])), m.parent_ids_))
    return m, s, (ref_a, a0), (ref_b, b0), [e for e in events if e["event"] == "born"], reports, churn


@pytest.fixture(scope="module")
def refining():
    return _run(1.0, refine_budget=1.0)


def test_a_child_takes_its_parents_items_and_announces_it(refining):
    m, s, (ref_a, a0), (ref_b, b0), born, reports, churn = refining
    home = int(np.bincount(a0).argmax())
    kids = [e for e in born if e["parent"] == home]
    assert len(kids) == 1, born
    kid = kids[0]
    assert 0 < kid["founding_taken"] < 0.5 and kid["gate_ref"] <= kid["gate"]
    # The novel group inside A now goes to the child, not to A.
    n_ids = m.predict(s.blob(s.N, 0.8, 200))
    assert (n_ids == kid["cluster"]).mean() > 0.9
    # Some of A's remembered items moved, all into the child: refinement, reported apart from churn.
    moved = m.predict(ref_a) != a0
    assert moved.any() and set(m.predict(ref_a)[moved].tolist()) == {kid["cluster"]}
    assert max(r.refined for r in reports) > 0 and all(r.churn <= m.max_churn for r in reports)


def test_a_child_takes_no_item_of_another_id_and_churn_stays_in_budget(refining):
    m, s, (ref_a, a0), (ref_b, b0), born, reports, churn = refining
    assert np.array_equal(m.predict(ref_b), b0)
    assert max(churn) <= 0.01  # hierarchical churn after every update


def test_a_far_group_is_a_new_root(refining):
    m, s, _, _, born, _, _ = refining
    far = np.bincount(m.predict(s.blob(s.F, 1, 100))).argmax()
    assert int(far) in {e["cluster"] for e in born} and m.parent_ids_[int(far)] is None


def test_without_refinement_no_remembered_item_moves():
    m, s, (ref_a, a0), (ref_b, b0), born, reports, _ = _run(0.0)
    assert np.array_equal(m.predict(ref_a), a0) and np.array_equal(m.predict(ref_b), b0)
    assert all("gate_ref" not in e or e["gate_ref"] == e["gate"] for e in born)
    assert all(r.refined == 0 for r in reports)


def test_refine_budget_zero_refines_nothing():
    m, s, (ref_a, a0), _, born, reports, _ = _run(1.0, refine_budget=0.0)
    assert np.array_equal(m.predict(ref_a), a0) and all(r.refined == 0 for r in reports)


def test_save_and_load_keep_parents_and_refinement_gates(refining, tmp_path):
    m, s, (ref_a, _), _, _, _, _ = refining
    m.save(tmp_path / "m.sdec")
    back = StreamDEC.load(tmp_path / "m.sdec")
    assert back.parent_ids_ == m.parent_ids_
    assert torch.equal(back.clusters_.gate_ref, m.clusters_.gate_ref)
    X = np.concatenate([ref_a, s.blob(s.N, 0.8, 100)])
    assert np.array_equal(back.predict(X), m.predict(X))


def _table() -> ClusterTable:
    """Parent row 0 at the origin, root row 1 at (0, 3); children of row 0 appended by the tests."""
    t = ClusterTable.from_fit(torch.tensor([[0.0, 0.0], [0.0, 3.0]]), radius=torch.ones(2), freq=torch.full((2,), 0.5))
    t.begin_update()
    return t


def test_descent_takes_only_the_parents_items_behind_the_refinement_gate():
    t = _table()
    t.append(NewCluster(centre=torch.tensor([2.0, 0.0]), gate=4.0, radius=1.0, support=10, parent=0, gate_ref=0.5))
    z = torch.tensor([[0.8, 0.0], [1.2, 0.0], [0.0, 2.9], [1.5, 0.9]])
    # (0.8, 0): parent .64 < .5 x 1.44; (1.2, 0): .5 x .64 < 1.44, the child refines;
    # (0, 2.9) is root 1's; (1.5, .9): the parent wins at the top (3.06 < 4 x 1.06), the child by descent.
    assert gates.assign(t, z).tolist() == [0, 2, 1, 2]
    # With gate_ref = gate the child only wins where it beats everyone behind its full gate.
    t.gate_ref[2] = 4.0
    assert gates.assign(t, z).tolist() == [0, 0, 1, 0]


def test_an_older_sibling_keeps_what_it_refined():
    t = _table()
    t.append(NewCluster(centre=torch.tensor([2.0, 0.0]), gate=4.0, radius=1.0, support=10, parent=0, gate_ref=0.5))
    t.append(NewCluster(centre=torch.tensor([2.0, 0.0]), gate=4.0, radius=1.0, support=10, parent=0, gate_ref=0.1))
    assert gates.assign(t, torch.tensor([[1.2, 0.0]])).tolist() == [2]
    held, rows = gates.held_by(t, torch.tensor([[1.2, 0.0]]), None)
    assert rows.tolist() == [2] and torch.allclose(held, torch.tensor([0.5 * 0.64]))


def test_a_move_into_a_descendant_is_not_churn():
    t = _table()
    t.append(NewCluster(centre=torch.tensor([2.0, 0.0]), gate=4.0, radius=1.0, support=10, parent=0))
    t.append(NewCluster(centre=torch.tensor([3.0, 0.0]), gate=4.0, radius=1.0, support=10, parent=2))
    assert t.descends().tolist() == [
        [True, False, True, True], [False, True, False, False], [False, False, True, True], [False, False, False, True],
    ]
    before = torch.tensor([0, 0, 2, 1, 2])
    after = torch.tensor([2, 3, 0, 1, 2])
    # 0 -> 2 and 0 -> 3 refine; 2 -> 0 (back to the parent) is churn.
    assert churned(t, before, after).tolist() == [False, False, True, False, False]


def test_a_table_saved_without_refinement_gates_restores_them_as_its_gates():
    t = _table()
    t.append(NewCluster(centre=torch.tensor([2.0, 0.0]), gate=4.0, radius=1.0, support=10, parent=0, gate_ref=0.5))
    state = t.state()
    del state["gate_ref"]
    back = ClusterTable.from_state(state, torch.device("cpu"))
    assert torch.equal(back.gate_ref, back.gate)

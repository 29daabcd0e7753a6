"""StreamDEC behaviour: id stability, new clusters from evidence, guard, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_dec import DriftReport, StreamDEC
from stream_dec.online.estimator import SPAWN_RULES
from stream_dec.online import gates
from stream_dec.online.confidence import confidence
from stream_dec.evaluation import cluster_acc
from tests.conftest import FAST, make_blobs


def _clone(model: StreamDEC, tmp_path) -> StreamDEC:
    model.save(tmp_path / "clone.sdec")
    return StreamDEC.load(tmp_path / "clone.sdec")


def test_fit_finds_the_blobs(fitted, blobs):
    ids = fitted.predict(blobs["X"])
    assert ids.dtype == np.int64
    assert cluster_acc(blobs["y"], ids) > 0.98
    assert list(fitted.cluster_ids_) == [0, 1, 2, 3, 4]


def test_predict_proba_rows_and_columns(fitted, blobs):
    P = fitted.predict_proba(blobs["X"][:50])
    assert P.shape == (50, fitted.n_clusters_)
    assert np.allclose(P.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(fitted.cluster_ids_[P.argmax(1)], fitted.predict(blobs["X"][:50]))


@pytest.mark.parametrize("rule", SPAWN_RULES)
def test_old_ids_stay_while_new_blob_gets_new_id(fitted, blobs, tmp_path, rule):
    m = _clone(fitted, tmp_path).set_params(spawn_rule=rule)
    X_old, X_new = blobs["X"], blobs["X_new"]
    ref_ids = m.predict(X_old)
    rng = np.random.default_rng(1)
    reports = []
    for t in range(20):
        old_part = X_old[rng.choice(len(X_old), 100, replace=False)]
        new_part = X_new[rng.choice(len(X_new), 30, replace=False)] if t >= 3 else X_new[:0]
        reports.append(m.partial_fit(np.concatenate([old_part, new_part])))
        assert np.mean(m.predict(X_old) != ref_ids) <= 0.01, f"churn after update {t}"
    assert all(isinstance(r, DriftReport) for r in reports)
    assert [r.model_version for r in reports] == list(range(1, 21))
    new_ids = sorted({i for r in reports for i in r.new_cluster_ids})
    assert len(new_ids) >= 1 and min(new_ids) >= 5
    pred_new = m.predict(X_new)
    # The novel blob is labelled by a new id, one id for almost all of it.
    top_id, top_count = np.unique(pred_new, return_counts=True)
    assert top_id[top_count.argmax()] in new_ids
    assert top_count.max() / len(X_new) > 0.9
    assert m.n_clusters_ <= 7


def test_ids_are_never_reused(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    seen = set(m.cluster_ids_.tolist())
    for t in range(12):
        m.partial_fit(np.concatenate([blobs["X"][t * 50 : t * 50 + 50], blobs["X_new"][t * 25 : t * 25 + 25]]))
        ids = m.cluster_ids_.tolist()
        assert ids == sorted(ids) and len(ids) == len(set(ids))
        assert set(ids) >= seen  # append-only
        seen |= set(ids)
    assert m.next_id_ > max(seen)


def test_pure_noise_does_not_explode_clusters(fitted, tmp_path):
    m = _clone(fitted, tmp_path)
    rng = np.random.default_rng(3)
    scale = 8.0  # noise over the whole region the blobs span
    for _ in range(20):
        m.partial_fit((rng.standard_normal((200, m.n_features_in_)) * scale).astype(np.float32))
    assert m.n_clusters_ <= 6


def test_report_fields_and_fisher_after_update(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    fisher0 = m.fisher_.clone()
    r = m.partial_fit(blobs["X"][:256])
    assert r.n_items == 256 and r.steps == 1 and 0 <= r.churn <= 1  # the "mean" rule takes one closed-form step
    assert 0 <= r.novelty_rate <= 0.2 and r.centre_shift >= 0 and r.update_ms > 0
    assert r.n_clusters == 5 and r.new_cluster_ids == []
    assert (m.fisher_ >= 0).all() and m.fisher_.sum() > 0
    assert not torch.equal(m.fisher_, fisher0)
    d = r.to_dict()
    assert d["model_version"] == 1 and "churn" in d


def _same_model(a: StreamDEC, b: StreamDEC) -> bool:
    """Whether two models hold the same state (every tensor and value of their checkpoints)."""

    def same(x, y) -> bool:
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        return x == y

    return same(a._state(None), b._state(None))


def _stream(blobs, n=12):
    return [np.concatenate([blobs["X"][t * 60 : t * 60 + 60], blobs["X_new"][t * 25 : t * 25 + 25]]) for t in range(n)]


def test_step_and_time_budgets_bound_the_update(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path).set_params(centre_rule="dec")  # the rule that takes gradient steps
    m.online_steps = 3
    r = m.partial_fit(blobs["X"][:128])
    assert r.steps == 3 and r.plan == dict(learn=True, steps=3, steps_cut=False, spawn_skipped=False, proposals=None, guard_cut=False)
    assert not r.budget_exhausted
    # 100000 steps never fit in 30 ms: the clock, not the step budget, ends them, and the plan says so.
    m.online_steps, m.max_update_ms = 100000, 30.0
    r = m.partial_fit(blobs["X"][:128])
    assert r.budget_exhausted and r.plan["steps_cut"] and r.plan["steps"] == r.steps < 100000


@pytest.mark.parametrize("rule", ["mean", "dec"])
def test_zero_steps_labels_only_and_learns_nothing(fitted, blobs, tmp_path, rule):
    m = _clone(fitted, tmp_path).set_params(centre_rule=rule, online_steps=0)
    ref = _clone(fitted, tmp_path).set_params(centre_rule=rule, online_steps=0)
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    labels = m.predict(X)
    for batch in _stream(blobs):  # novel items too: nothing is spawned either
        r = m.partial_fit(batch)
        assert r.plan["learn"] is False and r.steps == 0 and r.model_version == 0 and r.new_cluster_ids == []
        assert r.novelty_rate > 0.2 and r.churn == 0.0 and not r.budget_exhausted
    assert _same_model(m, ref) and np.array_equal(m.predict(X), labels)
    assert m.version_ == 0 and m.n_seen_ == ref.n_seen_ and len(m.buffer_) == 0


@pytest.mark.parametrize("rule, budget_ms", [("dec", 1e-6), ("dec", 3.0), ("mean", 1e-6), ("mean", 3.0)])
def test_a_cut_update_replayed_with_its_plan_is_an_exact_copy(fitted, blobs, tmp_path, rule, budget_ms):
    """Whatever the clock cut, the same model, batch and plan give the same model and report."""
    m = _clone(fitted, tmp_path).set_params(centre_rule=rule, online_steps=100000, max_update_ms=budget_ms)
    plans = []
    for t, batch in enumerate(_stream(blobs)):
        path = m.save(tmp_path / f"pre-{t}.sdec")  # the model before the update, as a restarted service has it
        r = m.partial_fit(batch)
        copy = StreamDEC.load(path).set_params(online_steps=5, max_update_ms=250.0)  # other budgets: the plan rules
        r2 = copy.partial_fit(batch, plan=r.plan)
        assert {**r.to_dict(), "update_ms": 0} == {**r2.to_dict(), "update_ms": 0}, t
        assert _same_model(m, copy.set_params(online_steps=100000, max_update_ms=budget_ms)), t
        assert np.array_equal(m.predict(blobs["X_new"]), copy.predict(blobs["X_new"]))
        plans.append(r.plan)
    assert all(p["learn"] for p in plans)
    if rule == "dec" or budget_ms < 1e-3:  # 100000 DEC steps never fit in 3 ms; nothing fits in 1 ns
        assert all(p["steps_cut"] for p in plans)
    if budget_ms < 1e-3:  # no centre step, and every due spawn search waits
        assert all(p["steps"] == 0 for p in plans) and any(p["spawn_skipped"] for p in plans)
        assert m.n_clusters_ == 5 and m.buffer_.added_since_try >= len(m.buffer_) // 4
        # Given time (a plan without cuts), the search that waited runs at the next batch.
        r = m.partial_fit(blobs["X_new"][:40], plan=dict(steps=1))
        assert r.new_cluster_ids and r.plan["proposals"] is None


def test_a_guard_out_of_time_rolls_the_update_back(blobs):
    """A loose spawn gate next to an old blob makes the guard work; cut, it restores the old clusters."""
    rng = np.random.default_rng(11)
    X_old, y_old = blobs["X"], blobs["y"]
    anchor = X_old[y_old == 2].mean(0)
    direction = rng.standard_normal(anchor.shape).astype(np.float32)
    near = anchor + 1.2 * direction / np.linalg.norm(direction) + 0.5 * rng.standard_normal((400, anchor.shape[0])).astype(np.float32)
    m = StreamDEC(n_clusters=5, new_cluster_churn=0.5, margin=0.0, max_churn=0.0, max_total_churn=0.0, random_state=0, **FAST).fit(X_old)
    ref_ids = m.predict(X_old)
    rolled = 0
    for t in range(10):
        batch = np.concatenate([X_old[t * 60 : t * 60 + 60], near[t * 40 : t * 40 + 40]])
        table = m.clusters_.state()
        r = m.partial_fit(batch, plan=dict(steps=1, guard_cut=True))
        assert r.guard_action == "rolled_back" and r.plan["guard_cut"] and r.budget_exhausted
        assert r.churn == 0.0 and r.new_cluster_ids == [] and r.model_version == t + 1
        # The clusters are as before the update: ids, prototypes, gates, radii. (Running
        # statistics still count the batch; an id given and taken back is not reused.)
        for k, v in m.clusters_.state().items():
            assert k in ("next_id", "freq") or torch.equal(v, table[k]), k
        rolled += m.buffer_.added_since_try > 0
    assert np.array_equal(m.predict(X_old), ref_ids)
    assert len(m.buffer_) > 0 and rolled  # the batches wait in the window for a later update
    assert m.next_id_ > 5 and m.n_clusters_ == 5  # clusters were spawned, and taken back


def test_a_bad_plan_is_rejected_and_the_model_unchanged(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    for bad in ({"step": 1}, {"steps": -1}, {"steps": 1.5}, {"learn": "yes"}, [1, 2]):
        with pytest.raises(ValueError, match="plan"):
            m.partial_fit(blobs["X"][:50], plan=bad)
    assert m.version_ == 0 and _same_model(m, _clone(fitted, tmp_path))


@pytest.mark.parametrize(
    "params",
    [
        dict(centre_rule="mean", ewc_lambda=0.0),  # no prior: follow the batch mean at once
        dict(centre_rule="dec", online_lr=0.5, online_steps=20, ewc_lambda=0.0, distill_weight=0.0),
    ],
)
def test_moving_prototypes_do_not_take_remembered_items(fitted, blobs, tmp_path, params):
    """Cluster 0's items walk into cluster 1; id 0's current prototype follows them,
    but its gate keeps it from relabelling cluster 1's old items."""
    m = _clone(fitted, tmp_path).set_params(**params)
    X, y = blobs["X"], blobs["y"]
    ref_ids = m.predict(X)
    src, dst = np.bincount(ref_ids[y == 0]).argmax(), np.bincount(ref_ids[y == 1]).argmax()
    c_src, c_dst = X[ref_ids == src].mean(0), X[ref_ids == dst].mean(0)
    centre0 = m.centres_[src].clone()
    for t in range(1, 16):
        m.partial_fit(X[ref_ids == src][:150] + (t / 15) * 0.6 * (c_dst - c_src))
    assert (m.centres_[src] - centre0).norm() > 1e-3  # it did move
    assert m.gate_cur_[src] >= 1.0
    ids = m.predict(X)
    moved = ids != ref_ids
    # Moves into a child of the old id are refinement (bounded by refine_budget); any other move is churn.
    into_child = np.array([m.parent_ids_.get(int(i)) == int(r) for i, r in zip(ids[moved], ref_ids[moved])], dtype=bool)
    assert np.mean(moved) <= 0.01 + m.refine_budget and moved.sum() - into_child.sum() <= 0.01 * len(X)


def test_churn_guard_drops_a_new_cluster_that_relabels_old_items(blobs):
    """A new group right next to an old one; a permissive spawn gate would let the new
    cluster take many old items. The guard must drop it; without the guard it stays."""
    rng = np.random.default_rng(11)
    X_old, y_old = blobs["X"], blobs["y"]
    anchor = X_old[y_old == 2].mean(0)
    direction = rng.standard_normal(anchor.shape).astype(np.float32)
    near = anchor + 1.2 * direction / np.linalg.norm(direction) + 0.5 * rng.standard_normal((400, anchor.shape[0])).astype(np.float32)
    loose = dict(new_cluster_churn=0.5, margin=0.0, random_state=0, **FAST)
    outcomes = {}
    # The new group's items came in under blob 2's id: it is that id's child, so the old
    # items it takes are refinement, bounded by refine_budget; refine_share=0 gives it no
    # refinement gate, so it takes them behind the loose new-cluster gate.
    for name, guard in (("guarded", dict(max_churn=0.002, refine_share=0.0, refine_budget=0.0)),
                        ("unguarded", dict(max_churn=1.0, max_total_churn=1.0, refine_share=0.0, refine_budget=1.0))):
        m = StreamDEC(n_clusters=5, **loose, **guard).fit(X_old)
        ref_ids = m.predict(X_old)
        reports = [m.partial_fit(np.concatenate([X_old[t * 60 : t * 60 + 60], near[t * 40 : t * 40 + 40]])) for t in range(10)]
        outcomes[name] = (reports, np.mean(m.predict(X_old) != ref_ids))
    reports, total = outcomes["unguarded"]
    assert total > 0.02 and any(r.new_cluster_ids for r in reports)
    reports, total = outcomes["guarded"]
    assert all(r.churn <= 0.002 for r in reports)
    assert any(r.guard_action == "dropped_new" for r in reports)
    assert total <= 0.01


def test_same_seed_same_outputs(blobs):
    outs = []
    for _ in range(2):
        m = StreamDEC(n_clusters=5, random_state=11, **FAST).fit(blobs["X"])
        reps = [m.partial_fit(np.concatenate([blobs["X"][i * 60 : i * 60 + 60], blobs["X_new"][i * 30 : i * 30 + 30]])) for i in range(8)]
        outs.append((m.predict(blobs["X"]), m.predict(blobs["X_new"]), m.centres_.clone(), [r.new_cluster_ids for r in reps]))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])
    assert outs[0][3] == outs[1][3]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 24), np.float32), "empty"),
        (np.zeros(24, np.float32), "2-D"),
        (np.zeros((3, 4, 24), np.float32), "2-D"),
        (np.zeros((5, 23), np.float32), "23 features"),
        (np.array([[np.nan] * 24]), "NaN"),
        (np.array([[np.inf] * 24]), "NaN or infinite"),
        (np.array([["a"] * 24]), "numeric"),
    ],
)
def test_bad_input_is_rejected_and_model_unchanged(fitted, blobs, tmp_path, bad, message):
    m = _clone(fitted, tmp_path)
    before = (m.centres_.clone(), m.version_, m.cluster_ids_.copy(), len(m.reservoir_), m.reservoir_.n_seen)
    for call in (m.partial_fit, m.predict, m.predict_proba):
        with pytest.raises(ValueError, match=message):
            call(bad)
    assert torch.equal(before[0], m.centres_) and before[1] == m.version_
    assert np.array_equal(before[2], m.cluster_ids_) and before[3:] == (len(m.reservoir_), m.reservoir_.n_seen)


def test_fit_rejects_bad_input_and_bad_parameters(blobs):
    with pytest.raises(ValueError, match="NaN"):
        StreamDEC(n_clusters=2, **FAST).fit(np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="fewer than n_clusters"):
        StreamDEC(n_clusters=10, **FAST).fit(blobs["X"][:5])
    with pytest.raises(ValueError, match="n_clusters"):
        StreamDEC(n_clusters=0, **FAST).fit(blobs["X"])
    with pytest.raises(ValueError, match="novelty_quantile"):
        StreamDEC(n_clusters=3, novelty_quantile=1.5, **FAST).fit(blobs["X"])
    with pytest.raises(ValueError, match="not fitted"):
        StreamDEC(n_clusters=3).predict(blobs["X"])


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(n_clusters=2.0), "n_clusters must be an int >= 1, got 2.0"),
        (dict(hidden_dims=(32, 0)), "hidden_dims must be a list or tuple, each an int >= 1"),
        (dict(alpha=0), "alpha must be a number > 0"),
        (dict(centre_rule="median"), "centre_rule must be one of 'mean', 'dec', got 'median'"),
        (dict(spawn_rule="x"), "spawn_rule must be one of 'refit', 'anchored', 'outliers'"),
        (dict(max_clusters=2), "max_clusters must be None or an int >= n_clusters, got 2"),
        (dict(freq_decay=1.0), r"freq_decay must be a number in \[0, 1\)"),
        (dict(min_support=1), "min_support must be None or an int >= 2"),
        (dict(online_steps=-1), "online_steps must be an int >= 0"),
        (dict(random_state=-3), "random_state must be None or an int >= 0"),
    ],
)
def test_every_hyper_parameter_is_checked_against_the_constraints_table(blobs, params, message):
    StreamDEC()._check_params()  # every parameter has a constraint, and the defaults meet them
    with pytest.raises(ValueError, match="invalid hyper-parameter: " + message):
        StreamDEC(**{"n_clusters": 3, **FAST, **params}).fit(blobs["X"])


def test_cluster_cap_is_respected(blobs):
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((12, 24)) * 5.0
    X, y = make_blobs(150, centres, 0.4, rng)
    m = StreamDEC(n_clusters=3, max_clusters=5, random_state=0, **FAST).fit(X[y < 3])
    for t in range(15):
        m.partial_fit(X[y >= 3][t * 80 : t * 80 + 80])
    assert m.n_clusters_ <= 5


def test_predict_with_confidence_matches_predict_and_proba(fitted, blobs):
    X = blobs["X"][:200]
    ids, conf = fitted.predict_with_confidence(X)
    P = fitted.predict_proba(X)
    assert np.array_equal(ids, fitted.predict(X))
    assert P.shape == (len(X), fitted.n_clusters_) and np.allclose(P.sum(1), 1.0, atol=1e-5)
    # The published confidence is the calibrated one (stream_dec/online/confidence.py).
    d = gates.distances(fitted.clusters_, torch.from_numpy(fitted.transform(X)))[1]
    assert np.allclose(conf, confidence(d, fitted.confidence_calibration()).numpy(), atol=1e-7)


def _stream_with_blob_inside(seed: int = 3):
    """Three fitted blobs, one of them wide; the novel blob sits inside the wide one's region."""

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 16)) * 6.0
    wide = np.concatenate([centres[0] + 2.0 * rng.standard_normal((400, 16)), centres[1:].repeat(200, 0)
                           + 0.6 * rng.standard_normal((400, 16))]).astype(np.float32)
    inner = centres[0] + 7.0 * np.eye(16)[0]  # within the wide blob's typical radius (2.0 * sqrt(16))
    def batch(n_new: int):
        old = np.concatenate([centres[0] + 2.0 * rng.standard_normal((60, 16)), centres[1 + rng.integers(0, 2, 60)]
                              + 0.6 * rng.standard_normal((60, 16))])
        return np.concatenate([old, inner + 0.3 * rng.standard_normal((n_new, 16))]).astype(np.float32)

    return wide, batch, inner


def test_a_spawn_from_one_ids_items_is_born_its_child(blobs, tmp_path):
    """The captured items came in under one id: that id is the new cluster's parent, announced by a born event."""
    fit_X, batch, inner = _stream_with_blob_inside()
    m = StreamDEC(n_clusters=3, random_state=0, **FAST).fit(fit_X)
    home = int(np.bincount(m.predict(inner[None, :] + 0.3 * np.random.default_rng(9).standard_normal((200, 16)).astype(np.float32))).argmax())
    events, reports = [], []
    for _ in range(8):
        r = m.partial_fit(batch(40))
        reports.append(r)
        events += r.lifecycle
    new = [i for r in reports for i in r.new_cluster_ids]
    assert new, "the inner blob must get an id"
    assert [e["cluster"] for e in events] == new and {e["event"] for e in events} == {"born"}
    child = events[0]
    assert child["parent"] == home and child["root"] == m.root_of(child["cluster"]) == home
    assert child["source_share"] > 0.5 and child["support"] >= m.min_support_ and 0 < child["cohesion"] <= 1
    assert 0 <= child["founding_taken"] <= 1 and child["window"] >= child["support"] and child["gate"] >= 1
    assert m.parent_ids_ == {**{i: None for i in range(3)}, **{e["cluster"]: e["parent"] for e in events}}
    # predict still gives the finest id; roots() maps it up the hierarchy.
    ids = m.predict(inner[None, :] + 0.3 * np.random.default_rng(10).standard_normal((100, 16)).astype(np.float32))
    assert child["cluster"] in set(ids.tolist())
    assert set(m.roots(ids).tolist()) <= {home} | {e["cluster"] for e in events if e["parent"] is None}
    tree = m.summary()["tree"]
    assert [n["id"] for n in tree] == [i for i, p in m.parent_ids_.items() if p is None]
    node = next(n for n in tree if n["id"] == home)
    assert child["cluster"] in [c["id"] for c in node["children"]]
    kid = next(c for c in node["children"] if c["id"] == child["cluster"])
    assert (kid["born"], kid["support"]) == (child["model_version"], child["support"])

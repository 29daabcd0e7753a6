"""Online EWC: the default rule's step is the argmin of NLL + EWC term, and its Fisher is the checkpointed one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_dec import StreamDEC
from stream_dec import checkpoint as ckpt
from stream_dec.model.ewc import ewc_penalty, gaussian_map
from stream_dec.online import gates
from stream_dec.online.ewc import OnlineEWC


def _problem(seed=0, n=60, k=3, d=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * 2
    anchor = torch.randn(k, d, generator=g)
    assigned = torch.randint(0, k - 1, (n,), generator=g)  # the last cluster gets no item
    fisher = torch.rand(k, d, generator=g) * 30
    fisher[-1, :2] = 0.0  # neither items nor Fisher in two dimensions: the centre stays put there
    return z, anchor, assigned, fisher


@pytest.mark.parametrize("likelihood", ["gaussian", "student_t"])
def test_penalty_gradient_matches_autograd(likelihood):
    z, anchor, assigned, _ = _problem()
    ewc = OnlineEWC.from_fit(z, anchor, torch.bincount(assigned, minlength=3), alpha=1.0, likelihood=likelihood)
    mu = (anchor + torch.randn(anchor.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    (g,) = torch.autograd.grad(ewc.penalty(mu, 0.3), mu)
    assert torch.allclose(ewc.gradient(mu.detach(), 0.3), g, rtol=1e-5, atol=1e-6)
    assert float(ewc.penalty(anchor, 0.3)) == 0.0 and float(ewc.penalty(mu.detach(), 0.3)) > 0


@pytest.mark.parametrize("strength", [0.0, 0.1, 2.0])
def test_gaussian_map_is_the_argmin_of_nll_plus_ewc_term(strength):
    """The closed form equals the minimiser gradient descent finds on the penalised objective."""
    z, anchor, assigned, fisher = (t.double() if t.is_floating_point() else t for t in _problem())
    k = anchor.shape[0]
    counts = torch.bincount(assigned, minlength=k).double()
    sums = torch.zeros_like(anchor).index_add_(0, assigned, z)
    closed = gaussian_map(anchor, fisher, sums, counts, strength)

    def objective(mu):
        nll = 0.5 * ((z - mu[assigned]) ** 2).sum()
        return nll + strength * ewc_penalty(mu, anchor, fisher)

    mu = anchor.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([mu], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(mu)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(closed, mu.detach(), atol=1e-6), (closed - mu.detach()).abs().max()
    # The gradient of the objective vanishes at the closed form.
    at = closed.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(at), at)
    assert g.abs().max() < 1e-9
    assert torch.equal(closed[-1, :2], anchor[-1, :2])  # no item, no Fisher: stays at the anchor


def test_gaussian_fisher_is_the_decayed_item_count():
    z, anchor, assigned, _ = _problem()
    counts = torch.bincount(assigned, minlength=3)
    ewc = OnlineEWC.from_fit(z, anchor, counts, alpha=1.0)
    assert ewc.likelihood == "gaussian" and torch.equal(ewc.fisher, counts.float()[:, None].expand(3, 4))
    ewc.consolidate(None, anchor + 1, torch.tensor([4, 0, 2]), alpha=1.0, decay=0.5)
    assert torch.equal(ewc.evidence, counts.float() * 0.5 + torch.tensor([4.0, 0.0, 2.0]))
    assert torch.equal(ewc.anchor, anchor + 1)
    with pytest.raises(ValueError, match="Gaussian Fisher"):
        OnlineEWC.from_fit(z, anchor, counts, alpha=1.0, likelihood="student_t").gaussian_step(anchor, counts.float(), 0.1)


def _clone(fitted, tmp_path, **params) -> StreamDEC:
    fitted.save(tmp_path / "m.sdec")
    return StreamDEC.load(tmp_path / "m.sdec").set_params(max_churn=1.0, max_total_churn=1.0, **params)


def test_default_rule_step_is_the_closed_form_with_the_stored_fisher(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    X = blobs["X"][:300]
    z, rows = torch.from_numpy(m.transform(X)), torch.from_numpy(np.searchsorted(m.cluster_ids_, m.predict(X)))
    counts = torch.bincount(rows, minlength=m.n_clusters_).float()
    sums = torch.zeros_like(m.centres_).index_add_(0, rows, z)
    expect = gaussian_map(m.ewc_anchor_, m.fisher_, sums, counts, m.ewc_lambda)
    f0 = m.fisher_.clone()
    m.partial_fit(X)
    assert torch.allclose(m.centres_, expect, atol=1e-5)
    assert torch.equal(m.fisher_, m.fisher_decay * f0 + counts[:, None])  # consolidated: decayed, plus the batch's items
    assert torch.equal(m.ewc_anchor_, m.centres_)


def test_checkpoint_round_trips_the_fisher_and_the_next_update_uses_it(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    m.partial_fit(blobs["X"][:200])
    state = m._state(None)
    assert state["ewc"]["likelihood"] == "gaussian" and set(state["ewc"]) == {"likelihood", "fisher", "anchor"}
    a = StreamDEC.load(m.save(tmp_path / "a.sdec"))
    assert torch.equal(a.fisher_, m.fisher_) and torch.equal(a.ewc_anchor_, m.ewc_anchor_)
    # The same checkpoint with a ten times larger Fisher: the next step moves the centres less.
    state["ewc"]["fisher"] = state["ewc"]["fisher"] * 10
    ckpt.write_atomic(tmp_path / "b.sdec", state)
    b = StreamDEC.load(tmp_path / "b.sdec")
    assert torch.equal(b.fisher_, a.fisher_ * 10)
    batch = blobs["X"][200:500]
    c0 = a.centres_.clone()
    z, rows = torch.from_numpy(b.transform(batch)), torch.from_numpy(np.searchsorted(b.cluster_ids_, b.predict(batch)))
    a.partial_fit(batch)
    b.partial_fit(batch)
    moved_a, moved_b = (a.centres_ - c0).norm(dim=1), (b.centres_ - c0).norm(dim=1)
    assert (moved_b < moved_a).all() and (moved_b > 0).all()
    counts = torch.bincount(rows, minlength=len(c0)).float()
    sums = torch.zeros_like(c0).index_add_(0, rows, z)
    assert torch.allclose(b.centres_, gaussian_map(c0, state["ewc"]["fisher"], sums, counts, b.ewc_lambda), atol=1e-5)


def test_a_state_written_before_the_fisher_followed_the_rule_keeps_the_one_the_rule_needs(fitted, blobs, tmp_path):
    """Older checkpoints held the Student-t Fisher and the item counts (``evidence``) under every rule."""
    for rule in ("mean", "dec"):
        m = _clone(fitted, tmp_path, centre_rule=rule)
        m.partial_fit(blobs["X"][:200])
        state = m._state(None)
        res = torch.from_numpy(m.reservoir_.data)
        t_fisher = OnlineEWC.from_fit(res, m.centres_, torch.ones(m.n_clusters_), alpha=1.0, likelihood="student_t").fisher
        counts = torch.arange(1.0, m.n_clusters_ + 1)
        state["ewc"] = {"fisher": t_fisher, "anchor": state["ewc"]["anchor"], "evidence": counts}
        ckpt.write_atomic(tmp_path / "old.sdec", state)
        old = StreamDEC.load(tmp_path / "old.sdec")
        assert old.ewc_.likelihood is None
        old._rule()
        if rule == "mean":
            assert old.ewc_.likelihood == "gaussian" and torch.equal(old.fisher_, counts[:, None].expand_as(old.centres_))
        else:
            assert old.ewc_.likelihood == "student_t" and torch.equal(old.fisher_, t_fisher)
        assert old._state(None)["ewc"]["likelihood"] == old.ewc_.likelihood


def test_changing_the_rule_estimates_its_fisher_on_the_reservoir(fitted, blobs, tmp_path):
    m = _clone(fitted, tmp_path)
    m.set_params(centre_rule="dec")
    m.partial_fit(blobs["X"][:200])
    assert m.ewc_.likelihood == "student_t" and m._state(None)["ewc"]["likelihood"] == "student_t"
    assert (m.fisher_ >= 0).all() and m.fisher_.sum() > 0
    m.set_params(centre_rule="mean")
    m._rule()
    res = torch.from_numpy(m.reservoir_.data)
    counts = torch.bincount(gates.assign(m.clusters_, res), minlength=m.n_clusters_).float()
    assert m.ewc_.likelihood == "gaussian" and torch.equal(m.evidence_, counts)

"""DEC math: soft assignment, target distribution, KL, Fisher and EWC."""

import torch

from stream_dec.model import (
    ewc_penalty,
    fisher_diagonal,
    kl_clustering_loss,
    soft_assignment,
    squared_distances,
    target_distribution,
)


def _data(seed=0, n=200, k=5, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2, torch.randn(k, d, generator=g) * 2


def test_squared_distances_match_cdist():
    z, mu = _data()
    assert torch.allclose(squared_distances(z, mu), torch.cdist(z, mu) ** 2, atol=1e-4)


def test_q_rows_sum_to_one_and_survive_far_points():
    z, mu = _data()
    q = soft_assignment(squared_distances(z * 1e4, mu))
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(len(z)), atol=1e-5)
    assert (q >= 0).all()


def test_target_sharpens_assignments():
    z, mu = _data()
    q = soft_assignment(squared_distances(z, mu))
    p = target_distribution(q)
    assert torch.allclose(p.sum(1), torch.ones(len(z)), atol=1e-5)
    ent = lambda r: -(r * torch.log(r + 1e-12)).sum(1)  # noqa: E731
    assert ent(p).mean() < 0.9 * ent(q).mean()
    # With equal frequencies, squaring sharpens every single row.
    p_eq = target_distribution(q, torch.ones(mu.shape[0]))
    assert (ent(p_eq) < ent(q)).all()
    assert torch.equal(p_eq.argmax(1), q.argmax(1))


def test_target_uses_running_frequencies_when_given():
    z, mu = _data()
    q = soft_assignment(squared_distances(z, mu))
    freq = torch.ones(mu.shape[0])
    freq[0] = 100.0  # a cluster that was very frequent in the past is damped
    assert (target_distribution(q, freq)[:, 0] < target_distribution(q)[:, 0]).all()


def test_kl_is_zero_for_identical_and_positive_otherwise():
    z, mu = _data()
    q = soft_assignment(squared_distances(z, mu))
    assert kl_clustering_loss(q, q).item() < 1e-6
    assert kl_clustering_loss(target_distribution(q), q).item() > 0


def test_fisher_matches_autograd_expectation():
    z, mu = _data(n=50, k=4, d=3)
    fisher = fisher_diagonal(z, mu)
    # True Fisher of p(c|z)=q: E_i sum_c q_ic (d log q_ic / d mu)^2, by autograd.
    ref = torch.zeros_like(mu)
    for i in range(len(z)):
        m = mu.clone().requires_grad_(True)
        logq = torch.log(soft_assignment(squared_distances(z[i : i + 1], m)))[0]
        qi = logq.exp().detach()
        for c in range(len(mu)):
            (g,) = torch.autograd.grad(logq[c], m, retain_graph=True)
            ref += qi[c] * g**2
    ref /= len(z)
    assert torch.allclose(fisher, ref, rtol=1e-3, atol=1e-7)
    assert (fisher >= 0).all() and fisher.sum() > 0


def test_ewc_penalty_grows_with_shift():
    z, mu = _data()
    fisher = fisher_diagonal(z, mu)
    direction = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    pens = [ewc_penalty(mu + s * direction, mu, fisher).item() for s in (0.0, 0.1, 0.5, 1.0)]
    assert pens[0] == 0.0
    assert pens[1] < pens[2] < pens[3]


def test_closed_form_centre_gradient_matches_autograd():
    from stream_dec.model import kl_centre_gradient

    z, mu = _data(n=80, k=5, d=4)
    for alpha in (1.0, 0.5, 3.0):
        p = target_distribution(soft_assignment(squared_distances(z, mu), alpha))
        m = mu.clone().requires_grad_(True)
        kl_clustering_loss(p, soft_assignment(squared_distances(z, m), alpha)).backward()
        assert torch.allclose(kl_centre_gradient(z, mu, p, alpha), m.grad, rtol=1e-3, atol=1e-6)


def test_torch_kmeans_and_silhouette_agree_with_sklearn():
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    from stream_dec.model.kmeans import kmeans_pp, silhouette

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 6)) * 5
    X = np.concatenate([c + rng.standard_normal((100, 6)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(4), 100)
    labels, found = kmeans_pp(torch.from_numpy(X), 4, torch.Generator().manual_seed(0))
    assert found.shape == (4, 6)
    assert adjusted_rand_score(y, labels.numpy()) > 0.99
    for lab in (labels.numpy(), rng.integers(0, 3, size=len(X))):
        ours = silhouette(torch.from_numpy(X), torch.from_numpy(lab))
        assert abs(ours - silhouette_score(X, lab)) < 1e-4

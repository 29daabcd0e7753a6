"""Elastic weight consolidation on cluster centres (diagonal Fisher, online EWC).

The EWC term is ``0.5 Σ F ⊙ (μ - μ*)²`` (:func:`ewc_penalty`). Under the k-means
(Gaussian) likelihood N(z; μ_j, I) its penalised MAP has a closed form
(:func:`gaussian_map`); under DEC's Student-t kernel the centre rule takes gradient steps.

The Student-t Fisher is that of the model's own categorical likelihood p(c | z) = q_zc, taken in
expectation over c ~ q (the true Fisher, not the squared gradient of the most likely
cluster's log-probability, which vanishes for confidently assigned items).
For the Student-t kernel it has a closed form per centre j and dimension:

    F_j = mean_i  q_ij (1 - q_ij) g_ij²,   g_ij = (α+1)/α · (z_i - μ_j) / (1 + d_ij/α)

which the tests check against autograd.
"""

from __future__ import annotations

import torch

from stream_dec.model.dec import soft_assignment, squared_distances


@torch.no_grad()
def fisher_diagonal(z: torch.Tensor, centres: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Diagonal Fisher information ``[k, d]`` of the centres, averaged over the rows of ``z``."""
    if z.shape[0] == 0:
        return torch.zeros_like(centres)
    d2 = squared_distances(z, centres)
    q = soft_assignment(d2, alpha)
    w = q * (1.0 - q) * ((alpha + 1.0) / alpha / (1.0 + d2 / alpha)) ** 2  # [n, k]
    diff2_sum = w.T @ (z * z) - 2.0 * (w.T @ z) * centres + w.sum(0)[:, None] * centres * centres
    return (diff2_sum / z.shape[0]).clamp_min_(0.0)


def ewc_penalty(centres: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """0.5 · Σ F ⊙ (μ - μ*)²: the quadratic cost of moving centres away from the anchor."""
    return 0.5 * (fisher * (centres - anchor) ** 2).sum()


@torch.no_grad()
def gaussian_map(anchor: torch.Tensor, fisher: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, strength: float) -> torch.Tensor:
    """Centres minimising Σ_i ½‖z_i - μ_j(i)‖² + ``strength`` · ½ Σ F ⊙ (μ - μ*)².

    ``sums`` ``[K, d]`` and ``counts`` ``[K]`` are the sum and number of the items given to
    each cluster, ``anchor`` μ* and ``fisher`` F ``[K, d]``. Setting the gradient
    n (μ - m) + λ F (μ - μ*) to zero (m: the items' mean) gives, per cluster and
    dimension, μ = μ* + η (m - μ*) with η = n / (n + λ F): a precision-weighted mean of
    the anchor and the batch. A cluster with neither items nor Fisher stays at μ*.

    >>> mu = gaussian_map(torch.zeros(1, 2), torch.full((1, 2), 3.0), torch.tensor([[4.0, 8.0]]), torch.tensor([2.0]), 1.0)
    >>> mu.tolist()  # m = (2, 4), η = 2 / (2 + 3)
    [[0.800000011920929, 1.600000023841858]]
    """
    n = counts.to(anchor.dtype)[:, None]
    eta = n / (n + strength * fisher).clamp_min(1e-12)
    target = sums / n.clamp_min(1)
    return anchor + eta * (target - anchor)

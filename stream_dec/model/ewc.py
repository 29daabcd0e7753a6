"""Elastic weight consolidation on cluster centres (diagonal Fisher, online EWC).

The Fisher is that of the model's own categorical likelihood p(c | z) = q_zc, taken in
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

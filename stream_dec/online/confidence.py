"""Confidence of an assignment: the probability that the id given is the one its group gets.

An item goes to the id with the smallest gated squared distance d₁; the margin to the
runner-up is m = d₂ - d₁ ≥ 0. For two Gaussian groups with a shared covariance the
*signed* margin s = d_other - d_own of a member of a group is linear in the item, so it
is Gaussian, N(μ, σ²), and the item is given the wrong id exactly when s < 0. Without
labels only |s| = m is seen: margins follow a folded normal. Fitting it by EM (the sign
is the missing variable) estimates μ and σ² without labels, and the share of items at
margin m that sit on their group's side is

    P(right | m) = φ(m - μ) / (φ(m - μ) + φ(m + μ)) = sigmoid(β m),  β = 2μ / σ².

Each other id l near the item adds its own odds exp(-β (d_l - d₁)), so the confidence
is ``1 / Σ_l exp(-β (d_l - d₁))``: the softmax of -β·d at the winner. It is 1/K
where nothing separates the ids (β = 0) and near 1 for items far inside one id.

The estimator fits the :class:`Calibration` (μ, σ², hence β) on the margins of what the
model remembers labelling and of the recent window, under its current clusters, so it
follows the stream. :func:`confidence` is the one function that turns gated distances
into confidences; :func:`stream_dec.online.gates.label` calls it.

>>> import torch
>>> d = torch.tensor([[1.0, 3.0, 9.0], [4.0, 4.0, 9.0]])
>>> [round(c, 3) for c in confidence(d, Calibration(mu=1.0, var=1.0)).tolist()]  # β = 2
[0.982, 0.5]
>>> cal = fit(torch.tensor([0.1, 2.9, 3.2, 2.7, 3.1, 0.4, 3.0]))
>>> round(cal.mu, 2), round(cal.slope, 2)
(2.15, 2.46)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EM_ITERS = 200  # EM steps at most; the slope moves by less than EM_TOL relative well before on real margins
EM_TOL = 1e-6


@dataclass(frozen=True)
class Calibration:
    """Mean ``mu`` and variance ``var`` of the signed margin; ``slope`` β = 2 μ / σ²."""

    mu: float = 0.0
    var: float = 1.0

    @property
    def slope(self) -> float:
        """β: the log-odds of being right per unit of margin (0 when nothing separates the ids)."""
        return 2.0 * max(self.mu, 0.0) / max(self.var, 1e-30)

    def state(self) -> dict:
        """Plain data (two floats) for checkpoints and snapshots."""
        return {"mu": float(self.mu), "var": float(self.var)}

    @classmethod
    def from_state(cls, state: dict) -> "Calibration":
        """Rebuild from :meth:`state`."""
        return cls(mu=float(state["mu"]), var=float(state["var"]))


@torch.no_grad()
def margins(d: torch.Tensor) -> torch.Tensor:
    """Gap ``[n]`` between the second-smallest and the smallest of each row of ``d`` ``[n, K]`` (K ≥ 2)."""
    two = torch.topk(d, 2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


def fit(m: torch.Tensor | np.ndarray) -> Calibration:
    """The folded normal's μ and σ² fitted by EM to the margins ``m`` (no margins: β = 0).

    E-step: the probability p_i = sigmoid(β m_i) that margin i is a positive signed
    margin; M-step: μ = mean(m (2p - 1)), σ² = mean(m²) - μ². Started from the unfolded
    estimate (mean and variance of m). Float64 on the host: the same margins give the
    same calibration everywhere.
    """
    m = np.asarray(m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m, dtype=np.float64)
    m = m[np.isfinite(m)]
    if m.size == 0:
        return Calibration()
    second = float(np.mean(m * m))
    mu, var = float(m.mean()), max(float(m.var()), 1e-12 * second, 1e-30)
    slope = 2.0 * mu / var
    for _ in range(EM_ITERS):
        p = 0.5 * (1.0 + np.tanh(0.5 * slope * m))  # sigmoid, without overflow
        mu = float(np.mean(m * (2.0 * p - 1.0)))
        var = max(second - mu * mu, 1e-12 * second, 1e-30)
        new = 2.0 * mu / var
        done = abs(new - slope) <= EM_TOL * max(abs(slope), 1e-30)
        slope = new
        if done:
            break
    return Calibration(mu=mu, var=var)


@torch.no_grad()
def confidence(d: torch.Tensor, calibration: Calibration) -> torch.Tensor:
    """Confidence ``[n]`` of the winner (smallest entry) of each row of gated distances ``d`` ``[n, K]``.

    ``1 / Σ_l exp(-β (d_l - d_min))`` with β = ``calibration.slope``.
    """
    if d.shape[0] == 0:
        return d.new_zeros(0)
    gap = d - d.min(1, keepdim=True).values
    return 1.0 / torch.exp(-calibration.slope * gap).sum(1)


CALIBRATION_ROWS = 256  # rows taken from each calibration source (reservoir, recent window)


def sample_rows(n: int, k: int = CALIBRATION_ROWS) -> np.ndarray:
    """``min(n, k)`` evenly spaced row indices of ``n`` rows: a fixed sample that draws no random numbers."""
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).astype(np.int64)) if n else np.zeros(0, dtype=np.int64)


def fit_margins(d: torch.Tensor) -> Calibration:
    """:func:`fit` on the :func:`margins` of gated distances ``d`` ``[n, K]`` (β = 0 with fewer than two ids)."""
    return fit(margins(d)) if d.shape[1] >= 2 else Calibration()

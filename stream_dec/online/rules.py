"""Centre rules: how the current prototypes follow the data, as plugins that own their state.

A rule is chosen by ``StreamDEC(centre_rule=...)`` and has ``step(est, u)`` (move
``est.clusters_.centres`` for the update ``u``, at most ``u.step_budget`` steps and
none once ``u.out_of_step_time()``; returns ``(steps taken, whether the clock cut them)``),
``state()`` / ``load_state()`` (what a checkpoint stores for it) and ``on_append`` /
``on_drop`` (kept in step with the cluster table), and ``likelihood``: the Fisher it
weighs moves by, which ``est.ewc_`` (:class:`stream_dec.online.ewc.OnlineEWC`) keeps.

* :class:`MeanRule` (``"mean"``): the closed-form online-EWC MAP step of a k-means
  likelihood; it has no state of its own (its Fisher is the EWC object's).
* :class:`DecRule` (``"dec"``): DEC KL gradient steps under the diagonal-Fisher EWC
  penalty and distillation on the reservoir, with Adam moments kept across updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from stream_dec.model import (
    kl_centre_gradient,
    soft_assignment,
    squared_distances,
    target_distribution,
)
from stream_dec.model.kmeans import cluster_sums
from stream_dec.online.clusters import NewCluster
from stream_dec.online.context import UpdateContext

if TYPE_CHECKING:  # pragma: no cover
    from stream_dec.online.estimator import StreamDEC

STEP_ROWS = 256  # rows per online gradient step (a fresh slice of the batch each step)


class MeanRule:
    """Online EWC of a k-means (Gaussian) likelihood: a precision-weighted mean.

    The step minimises the batch's Gaussian negative log-likelihood plus the EWC term
    (λ/2) Σ F ⊙ (μ - μ*)², with F the Gaussian Fisher of ``est.ewc_`` (the decayed count
    of items each id was given) and μ* its anchor (the centres after the last update).
    Its closed form (:func:`stream_dec.model.ewc.gaussian_map`) is
    μ_j = μ*_j + η_j (m_j - μ*_j), η_j = n_j / (n_j + ewc_lambda · F_j), where m_j is the
    mean of the n_j batch items given to id j. A drifting class is followed within a
    few batches; a few stray items barely move a centre. One closed-form step, so
    ``online_steps`` only switches it off (0); it is not taken when the update's time
    is already spent.
    """

    name = "mean"
    likelihood = "gaussian"  # the Fisher it needs from est.ewc_

    @torch.no_grad()
    def step(self, est: StreamDEC, u: UpdateContext) -> tuple[int, bool]:
        """Move every current prototype toward the mean of its batch items (``est.follow`` says which); returns ``(steps, cut)``."""
        if u.step_budget == 0:
            return 0, False
        if u.out_of_step_time():
            return 0, True
        t = est.clusters_
        # "nearest": the k-means E-step over the current prototypes, so a prototype
        # follows its group even where the gates label the group with another id.
        near = squared_distances(u.z, t.centres).argmin(1) if est.follow == "nearest" else u.nearest
        u.given = near  # the Gaussian Fisher counts the items the step gave each prototype
        counts = torch.bincount(near, minlength=t.centres.shape[0]).to(u.z.dtype)
        sums = cluster_sums(u.z, near, t.centres.shape[0])
        t.centres = est.ewc_.gaussian_step(sums, counts, est.ewc_lambda)
        return 1, False

    def state(self) -> dict:
        """Nothing to store."""
        return {}

    def load_state(self, state: dict) -> None:
        """Nothing to restore."""

    def on_append(self, new: NewCluster) -> None:
        """No per-cluster state."""

    def on_drop(self, keep: torch.Tensor) -> None:
        """No per-cluster state."""


class DecRule:
    """DEC steps on the current prototypes under EWC and distillation.

    The target P is fixed for the whole update (DEC recomputes it only every
    ``update_interval`` steps too) and built with the running cluster frequencies.
    Gradients are closed-form (:func:`stream_dec.model.kl_centre_gradient`). The
    optimiser is Adam with moments kept across updates (and in checkpoints): a fresh
    Adam would take full-size steps on pure gradient noise at every batch, so centres
    would jitter.
    """

    name = "dec"
    likelihood = "student_t"  # the Fisher it needs from est.ewc_
    _BETAS, _EPS = (0.9, 0.999), 1e-8

    def __init__(self, k: int, dim: int, device: torch.device | str = "cpu"):
        self.m = torch.zeros(k, dim, device=device)
        self.v = torch.zeros(k, dim, device=device)
        self.t = torch.zeros(k, device=device)  # steps taken per cluster (bias correction)

    @torch.no_grad()
    def step(self, est: StreamDEC, u: UpdateContext) -> tuple[int, bool]:
        """Up to ``u.step_budget`` Adam steps, checking the clock before each; returns ``(steps, cut)``.

        The target and the rehearsal sample are drawn whenever the batch has explained
        items, even if no step then fits: a replay of a plan with 0 steps draws the same.
        """
        z_in, res, rng, tbl = u.z_in, u.res, u.rng, est.clusters_
        if z_in.shape[0] == 0:
            return 0, False
        p = target_distribution(soft_assignment(squared_distances(z_in, tbl.centres), est.alpha), tbl.freq)
        rehearse = res[torch.from_numpy(rng.choice(len(res), size=min(len(res), 256), replace=False)).to(res.device)]
        q_old = soft_assignment(squared_distances(rehearse, tbl.centres), est.alpha)
        mu = tbl.centres.clone()
        lr, (b1, b2) = est.online_lr * est.latent_scale_, self._BETAS
        steps, exhausted = 0, False
        order = torch.from_numpy(rng.permutation(z_in.shape[0])).to(z_in.device)
        for step in range(u.step_budget):
            if u.out_of_step_time():
                exhausted = True
                break
            rows = order[torch.arange(step * STEP_ROWS, (step + 1) * STEP_ROWS, device=z_in.device) % len(order)]
            grad = kl_centre_gradient(z_in[rows], mu, p[rows], est.alpha)
            grad += est.ewc_.gradient(mu, est.ewc_lambda)
            if est.distill_weight > 0 and len(rehearse):
                grad += est.distill_weight * kl_centre_gradient(rehearse, mu, q_old, est.alpha)
            self.t += 1
            self.m.mul_(b1).add_(grad, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            m_hat = self.m / (1 - b1 ** self.t)[:, None]
            v_hat = self.v / (1 - b2 ** self.t)[:, None]
            mu -= lr * m_hat / (v_hat.sqrt() + self._EPS)
            steps += 1
        tbl.centres = mu
        return steps, exhausted

    def state(self) -> dict:
        """The Adam moments (CPU tensors)."""
        return {"adam_m": self.m.detach().cpu().clone(), "adam_v": self.v.detach().cpu().clone(), "adam_t": self.t.detach().cpu().clone()}

    def load_state(self, state: dict) -> None:
        """Restore the Adam moments (on the device they were created on)."""
        dev = self.m.device
        m, v, t = state["adam_m"].to(dev), state["adam_v"].to(dev), state["adam_t"].to(dev)
        if m.shape != self.m.shape or v.shape != self.v.shape or t.shape != self.t.shape:
            raise ValueError(f"Adam moments of shape {tuple(m.shape)} do not fit {tuple(self.m.shape)} centres")
        self.m, self.v, self.t = m, v, t

    def on_append(self, new: NewCluster) -> None:
        """A new cluster starts with zero moments."""
        self.m = torch.cat([self.m, torch.zeros(1, self.m.shape[1], device=self.m.device)])
        self.v = torch.cat([self.v, torch.zeros(1, self.v.shape[1], device=self.v.device)])
        self.t = torch.cat([self.t, torch.zeros(1, device=self.t.device)])

    def on_drop(self, keep: torch.Tensor) -> None:
        """Forget dropped clusters' moments."""
        self.m, self.v, self.t = self.m[keep], self.v[keep], self.t[keep]


def make_rule(name: str, k: int, dim: int, device: torch.device | str) -> MeanRule | DecRule:
    """A fresh rule of kind ``name`` for ``k`` clusters of dimension ``dim``."""
    if name == "dec":
        return DecRule(k, dim, device)
    if name == "mean":
        return MeanRule()
    raise ValueError(f"unknown centre rule {name!r}; expected one of ('mean', 'dec')")

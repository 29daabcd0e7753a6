"""Online elastic weight consolidation of the cluster centres, in one object.

:class:`OnlineEWC` owns what consolidation needs per cluster, grows and shrinks it
with the cluster table, and is updated after every batch:

* ``fisher`` ``[K, d]``: the running diagonal Fisher of each centre under the DEC
  (Student-t) likelihood (:func:`stream_dec.model.fisher_diagonal`), decayed by
  ``fisher_decay``; the ``"dec"`` centre rule's penalty weighs moves by it;
* ``anchor`` ``[K, d]``: the centres the penalty pulls toward (those after the last
  update);
* ``evidence`` ``[K]``: the Fisher of each centre under the k-means (Gaussian)
  likelihood, the running count of items given to it, decayed by ``fisher_decay``;
  the ``"mean"`` centre rule's prior weighs the old centre by it.

>>> import torch
>>> z, mu = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 2)
>>> ewc = OnlineEWC.from_fit(z, mu, counts=torch.tensor([30.0, 20.0]), alpha=1.0)
>>> ewc.gradient(mu + 1.0, strength=0.0).abs().sum().item()
0.0
>>> ewc.consolidate(z, mu + 1.0, torch.tensor([5.0, 5.0]), alpha=1.0, decay=0.5)
>>> ewc.evidence.tolist(), bool((ewc.anchor == 1.0).all())
([20.0, 15.0], True)
"""

from __future__ import annotations

import torch

from stream_dec.model import fisher_diagonal
from stream_dec.online.clusters import NewCluster


class OnlineEWC:
    """Per-cluster Fisher (DEC and k-means likelihoods) and the anchor of the EWC penalty."""

    def __init__(self, fisher: torch.Tensor, anchor: torch.Tensor, evidence: torch.Tensor):
        self.fisher = fisher
        self.anchor = anchor
        self.evidence = evidence
        if not fisher.shape == anchor.shape or evidence.shape != fisher.shape[:1]:
            raise ValueError("EWC arrays disagree in shape")

    @classmethod
    def from_fit(cls, z: torch.Tensor, centres: torch.Tensor, counts: torch.Tensor, alpha: float) -> "OnlineEWC":
        """Consolidate the fitted centres on the fit data ``z`` (``counts``: items per cluster)."""
        return cls(fisher_diagonal(z, centres, alpha), centres.clone(), counts.to(centres.dtype))

    def gradient(self, centres: torch.Tensor, strength: float) -> torch.Tensor:
        """Gradient of ``strength`` · 0.5 Σ F ⊙ (μ - μ*)² at ``centres``."""
        return strength * self.fisher * (centres - self.anchor)

    @torch.no_grad()
    def consolidate(self, sample: torch.Tensor | None, centres: torch.Tensor, counts: torch.Tensor, *, alpha: float, decay: float) -> None:
        """After a batch: decay and add the Fisher of ``sample`` (None: no items to estimate it
        from), re-anchor at ``centres``, and add ``counts`` (items given to each cluster) to
        the evidence."""
        if sample is not None:
            self.fisher = decay * self.fisher + fisher_diagonal(sample, centres, alpha)
        self.anchor = centres.clone()
        self.evidence = decay * self.evidence + counts.to(self.evidence.dtype)

    def on_append(self, new: NewCluster) -> None:
        """A new cluster: no Fisher yet, anchored at its centre, its captured items as evidence."""
        dev = self.fisher.device
        c = new.centre.reshape(1, -1).to(dev)
        self.fisher = torch.cat([self.fisher, torch.zeros_like(c)])
        self.anchor = torch.cat([self.anchor, c.clone()])
        self.evidence = torch.cat([self.evidence, torch.tensor([float(new.support)], device=dev)])

    def on_drop(self, keep: torch.Tensor) -> None:
        """Forget dropped clusters."""
        self.fisher, self.anchor, self.evidence = self.fisher[keep], self.anchor[keep], self.evidence[keep]

    def state(self) -> dict:
        """Plain-data state for checkpoints (CPU tensors)."""
        return {k: getattr(self, k).detach().cpu().clone() for k in ("fisher", "anchor", "evidence")}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "OnlineEWC":
        """Rebuild from :meth:`state` on ``device``."""
        return cls(state["fisher"].to(device), state["anchor"].to(device), state["evidence"].to(device))

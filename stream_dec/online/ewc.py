"""Online elastic weight consolidation of the cluster centres, in one object.

Both centre rules move the current prototypes by minimising the batch's negative
log-likelihood plus the EWC term ``(λ/2) Σ F ⊙ (μ - μ*)²`` (λ: ``ewc_lambda``). The
Fisher ``F`` is that of the likelihood the rule uses, so the Fisher a checkpoint
stores is exactly the one the next update weighs moves by:

* ``"gaussian"`` (the ``"mean"`` rule): the k-means likelihood N(z; μ_j, I). One item
  gives Fisher I, so F_j is the decayed count of items given to cluster j, the same in
  every dimension (a variance shared by the likelihood and the prior would scale both
  and cancel in the step, so the latent's unit is used). The minimiser has a closed
  form (:func:`stream_dec.model.ewc.gaussian_map`): a precision-weighted mean.
* ``"student_t"`` (the ``"dec"`` rule): the diagonal Fisher of DEC's p(c | z) = q
  (:func:`stream_dec.model.fisher_diagonal`), the penalty's gradient added to each
  KL gradient step.

:class:`OnlineEWC` holds ``fisher`` ``[K, d]`` (decayed by ``fisher_decay`` after each
batch, then the batch's Fisher added) and ``anchor`` ``[K, d]`` (μ*: the centres after
the last update), and grows and shrinks them with the cluster table.

>>> import torch
>>> z, mu = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 2)
>>> ewc = OnlineEWC.from_fit(z, mu, counts=torch.tensor([30.0, 20.0]), alpha=1.0)
>>> ewc.fisher.tolist(), ewc.evidence.tolist()
([[30.0, 30.0], [20.0, 20.0]], [30.0, 20.0])
>>> ewc.consolidate(z, mu + 1.0, torch.tensor([5.0, 5.0]), alpha=1.0, decay=0.5)
>>> ewc.evidence.tolist(), bool((ewc.anchor == 1.0).all())
([20.0, 15.0], True)
>>> ewc.gradient(mu + 1.0, strength=0.1).abs().sum().item()  # at the anchor: no pull
0.0
"""

from __future__ import annotations

import torch

from stream_dec.model import fisher_diagonal
from stream_dec.model.ewc import ewc_penalty, gaussian_map
from stream_dec.online.clusters import NewCluster

LIKELIHOODS = ("gaussian", "student_t")


class OnlineEWC:
    """Per-cluster Fisher of the centre rule's likelihood and the anchor of the EWC term.

    ``likelihood`` is None only for a state read from a checkpoint written before the
    Fisher followed the rule: it held the Student-t Fisher and, as ``counts``, the
    decayed item counts (the Gaussian Fisher); :meth:`use` keeps the one the rule needs.
    """

    def __init__(self, fisher: torch.Tensor, anchor: torch.Tensor, likelihood: str | None, counts: torch.Tensor | None = None):
        if likelihood is not None and likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
        if fisher.shape != anchor.shape or (counts is not None and counts.shape != fisher.shape[:1]):
            raise ValueError("EWC arrays disagree in shape")
        self.fisher, self.anchor, self.likelihood, self._counts = fisher, anchor, likelihood, counts

    @classmethod
    def from_fit(cls, z: torch.Tensor, centres: torch.Tensor, counts: torch.Tensor, alpha: float, likelihood: str = "gaussian") -> "OnlineEWC":
        """Consolidate the fitted centres on the fit data ``z`` (``counts``: items per cluster)."""
        return cls(_fisher(likelihood, z, centres, counts, alpha), centres.clone(), likelihood)

    @property
    def evidence(self) -> torch.Tensor:
        """Decayed count of items given to each cluster ``[K]``: the Gaussian Fisher per dimension."""
        if self.likelihood == "gaussian":
            return self.fisher[:, 0]
        if self._counts is not None:
            return self._counts
        raise AttributeError("the Student-t likelihood keeps no item counts")

    def penalty(self, centres: torch.Tensor, strength: float) -> torch.Tensor:
        """The EWC term ``strength`` · 0.5 Σ F ⊙ (μ - μ*)² at ``centres``."""
        return strength * ewc_penalty(centres, self.anchor, self.fisher)

    def gradient(self, centres: torch.Tensor, strength: float) -> torch.Tensor:
        """Gradient of :meth:`penalty` at ``centres``."""
        return strength * self.fisher * (centres - self.anchor)

    @torch.no_grad()
    def gaussian_step(self, sums: torch.Tensor, counts: torch.Tensor, strength: float) -> torch.Tensor:
        """Centres minimising the batch's Gaussian NLL plus the EWC term (``sums``, ``counts``:
        per-cluster sum and count of the batch items given to each cluster)."""
        if self.likelihood != "gaussian":
            raise ValueError(f"the Gaussian step needs the Gaussian Fisher, not {self.likelihood!r}")
        return gaussian_map(self.anchor, self.fisher, sums, counts, strength)

    @torch.no_grad()
    def use(self, likelihood: str, memory: torch.Tensor, assigned: torch.Tensor, alpha: float) -> None:
        """Keep the Fisher of ``likelihood`` (the centre rule's); no-op when it already is.

        A checkpoint written before the Fisher followed the rule holds both Fishers and
        keeps the one asked for. Otherwise (the centre rule was changed on a fitted
        model) the new likelihood's Fisher is estimated afresh on ``memory`` (the
        reservoir latents, ``assigned``: the row each is given).
        """
        if likelihood == self.likelihood:
            return
        k = self.anchor.shape[0]
        if likelihood == "gaussian" and self._counts is not None:
            self.fisher = self._counts[:, None].expand_as(self.anchor).clone()
        elif not (likelihood == "student_t" and self.likelihood is None):
            counts = torch.bincount(assigned, minlength=k).to(self.anchor.dtype)
            self.fisher = _fisher(likelihood, memory, self.anchor, counts, alpha)
        self.likelihood, self._counts = likelihood, None

    @torch.no_grad()
    def consolidate(self, sample: torch.Tensor | None, centres: torch.Tensor, counts: torch.Tensor, *, alpha: float, decay: float) -> None:
        """After a batch: decay the Fisher and add the batch's, then re-anchor at ``centres``.

        ``counts``: items given to each cluster (the Gaussian Fisher); ``sample``: explained
        items to estimate the Student-t Fisher from (None: none; it then only decays).
        """
        if self.likelihood == "gaussian":
            self.fisher = decay * self.fisher + counts.to(self.fisher.dtype)[:, None]
        elif sample is not None:
            self.fisher = decay * self.fisher + fisher_diagonal(sample, centres, alpha)
        self.anchor = centres.clone()

    def on_append(self, new: NewCluster) -> None:
        """A new cluster: anchored at its centre, its captured items as Gaussian evidence (no Student-t Fisher yet)."""
        dev = self.fisher.device
        c = new.centre.reshape(1, -1).to(dev)
        row = torch.full_like(c, float(new.support)) if self.likelihood == "gaussian" else torch.zeros_like(c)
        self.fisher = torch.cat([self.fisher, row])
        self.anchor = torch.cat([self.anchor, c.clone()])
        if self._counts is not None:
            self._counts = torch.cat([self._counts, torch.tensor([float(new.support)], device=dev)])

    def on_drop(self, keep: torch.Tensor) -> None:
        """Forget dropped clusters."""
        self.fisher, self.anchor = self.fisher[keep], self.anchor[keep]
        if self._counts is not None:
            self._counts = self._counts[keep]

    def state(self) -> dict:
        """Plain-data state for checkpoints (CPU tensors): ``likelihood``, ``fisher``, ``anchor``."""
        if self.likelihood is None:
            raise ValueError("call use() with the centre rule's likelihood before saving")
        return {"likelihood": self.likelihood, **{k: getattr(self, k).detach().cpu().clone() for k in ("fisher", "anchor")}}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "OnlineEWC":
        """Rebuild from :meth:`state` on ``device``; a state without ``likelihood`` (written
        before the Fisher followed the rule) keeps its ``evidence`` until :meth:`use`."""
        fisher, anchor = state["fisher"].to(device), state["anchor"].to(device)
        if "likelihood" in state:
            return cls(fisher, anchor, state["likelihood"])
        return cls(fisher, anchor, None, counts=state["evidence"].to(device))


def _fisher(likelihood: str, z: torch.Tensor, centres: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fisher ``[K, d]`` of ``likelihood`` from the items ``z`` (``counts`` per cluster)."""
    if likelihood == "gaussian":
        return counts.to(centres.dtype)[:, None].expand_as(centres).clone()
    if likelihood == "student_t":
        return fisher_diagonal(z, centres, alpha)
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")

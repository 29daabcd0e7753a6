"""``StreamDEC``: a DEC model that keeps learning from micro-batches without moving its ids.

How one online update protects what downstream systems already store:

* **ids are append-only** (``cluster_ids_``): a cluster keeps its id for life, new
  clusters get fresh ids, nothing is ever renumbered or reused;
* **two prototypes per id**: the *memory* prototype stays where the id was born (its
  old items keep their id); the *current* prototype follows the data (``centre_rule``:
  an online-EWC MAP step of a k-means likelihood, or DEC KL gradient steps under the
  diagonal-Fisher EWC penalty and distillation on the reservoir);
* **gates**: every prototype that did not exist when an item was labelled (a new
  cluster, a moved current prototype) has its squared distance inflated by a factor
  calibrated on the reservoir of remembered items, so it cannot take them;
* **new clusters need evidence** (:mod:`stream_dec.online.novelty`): a dense group in a
  window of recent items that the old centres do not explain, with minimum support,
  persistence over batches and cohesion;
* **ids form a hierarchy** (``parent_ids_``): a new cluster whose birth items came in
  mostly (more than half) under one id is recorded as that id's child, otherwise it is
  a new root; each birth, and each id that stops or starts being used again, is
  announced in the report's ``lifecycle`` events (:mod:`~stream_dec.online.lifecycle`).
  A child refines its parent: it may take the parent's items behind a lower gate
  (``refine_share``, ``refine_budget``; a move into a descendant is announced, not churn),
  other ids' items only within the churn budget; ``predict`` returns the finest id;
* a **churn guard** measures how many remembered items an update would relabel and
  shrinks the centre step or drops new clusters until it is within budget.

The encoder is trained by ``fit`` (reconstruction pretraining, then DEC refinement) and
frozen online, so an item's latent never changes after ``fit``.

The estimator is thin: the work is done by the parts it holds, one module each:
the cluster table (:mod:`~stream_dec.online.clusters`), the centre rule
(:mod:`~stream_dec.online.rules`) with online EWC (:mod:`~stream_dec.online.ewc`),
gates and assignment (:mod:`~stream_dec.online.gates`), spawning
(:mod:`~stream_dec.online.spawn`), the churn guard (:mod:`~stream_dec.online.guard`)
and the checkpoint state (:mod:`~stream_dec.online.persistence`).
"""

from __future__ import annotations

import sys
import time
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans

from stream_dec import checkpoint as ckpt
from stream_dec._validation import Each, InstanceOf, Interval, NoneOr, Options, check_embeddings, check_params, resolve_device
from stream_dec.model import Autoencoder, pretrain_autoencoder, refine_dec, soft_assignment, squared_distances
from stream_dec.online import gates, lifecycle, persistence
from stream_dec.online.clusters import NO_PARENT, ClusterTable
from stream_dec.online.confidence import Calibration, fit_margins, sample_rows
from stream_dec.online.context import UpdateContext
from stream_dec.online.ewc import OnlineEWC
from stream_dec.online.guard import churn_guard, refined_share
from stream_dec.online.novelty import NoveltyBuffer
from stream_dec.online.report import DriftReport, UpdatePlan
from stream_dec.online.reservoir import Reservoir
from stream_dec.online.rules import STEP_ROWS, make_rule
from stream_dec.online.spawn import SPAWN_RULES, maybe_spawn

FORMAT_VERSION = persistence.FORMAT_VERSION
CENTRE_RULES = ("mean", "dec")
_POSITIVE = Interval(Real, 0, closed="neither")
_SHARE = Interval(Real, 0, 1)


class _Column:
    """Read-only view of a column of one of the fitted parts (e.g. ``centres_``)."""

    def __init__(self, part: str, name: str, doc: str):
        self.part, self.name, self.__doc__ = part, name, doc

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        part = obj.__dict__.get(self.part)
        if part is None:
            raise AttributeError(f"{type(obj).__name__} has no {self.attr} before it is fitted")
        return getattr(part, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.attr} is read-only (it is {self.part}.{self.name})")


class StreamDEC(ClusterMixin, BaseEstimator):
    """Deep Embedded Clustering with bounded, id-stable online updates.

    Parameters
    ----------
    n_clusters : clusters made by ``fit``.
    hidden_dims, latent_dim : autoencoder layout (input dim comes from the data);
        ``latent_dim=None`` means min(128, input dim). The default is a linear
        autoencoder into a wide latent: measured on the stream protocol, narrow or
        DEC-refined latents fold unseen classes onto the fitted ones (docs/experiments.md).
    alpha : degrees of freedom of the Student-t kernel.
    pretrain_epochs, batch_size, pretrain_lr : reconstruction pretraining.
    refine_max_iter, refine_lr, update_interval, tol : DEC refinement; it stops when
        fewer than ``tol`` of the items change cluster between target updates.
    refine_encoder : also train the encoder during refinement (classic DEC) rather than
        only the centres. Off by default: it sharpens the fitted clusters but folds
        classes the model has not seen onto them.
    n_init : k-means restarts for the centre initialisation.
    online_steps : step budget of one ``partial_fit``: at most this many centre-rule
        steps (the "mean" rule takes one closed-form step). 0 means label only: the
        update changes nothing (no centre step, novelty window, spawning, statistics
        or version), its report says so (``plan["learn"]`` False).
    max_update_ms : wall-clock budget of one ``partial_fit``, spawn search and churn
        guard included. The clock is checked between units of work (a centre step, the
        spawn search, each proposal, each guard iteration); centre steps stop at half
        the budget, leaving the rest to spawning and the guard. What does not fit waits
        for a later batch: remaining steps are dropped, the spawn search is retried at
        the next batch, and a guard out of time rolls the centre step and new clusters
        back (within the churn budgets by construction). One unit (e.g. generating the
        spawn proposals) can overrun the budget. The report's ``plan`` records the cuts,
        and ``partial_fit(X, plan=...)`` redoes them exactly, ignoring the clock.
    online_lr : online step size in units of the within-cluster spread.
    ewc_lambda, fisher_decay : online-EWC strength and the decay of the running Fisher
        (stream_dec/online/ewc.py: under "mean" the decayed count of items given to each
        id, the Fisher of its Gaussian likelihood; under "dec" the Student-t Fisher).
    distill_weight : weight of KL(q_old || q_new) on reservoir latents.
    freq_decay : decay of the running cluster frequencies used by the target.
    reservoir_size : latents remembered for rehearsal and the churn guard.
    novelty_quantile : an item is unexplained when it lies beyond this quantile of its
        nearest cluster's squared distances.
    min_support : items a new cluster needs (None: derived from the fitted cluster sizes).
    margin : a spawned cluster takes an item only when it is at least this much closer
        (relative distance) than the best older cluster. A moved current prototype's
        gate carries at most this margin: less where the reservoir's held-out half
        shows less is safe (``gates.calibrate_moving_gates``).
    new_cluster_churn : share of remembered items a new cluster may take at birth; its
        gate (how much closer it must be) is calibrated on the reservoir to that share.
    refine_share : largest share of its parent's remembered items a new child may take
        at birth. A new cluster whose captured items mostly held one id is that id's
        child, and refines it: against the parent's items its gate is set where the
        parent's recent items differ most from its remembered ones (a move into a
        descendant keeps a stored id valid, so it is announced, not churn), against
        other ids' items it keeps the ``new_cluster_churn`` budget. 0: no refinement.
    refine_budget : largest share of the remembered items that may sit in a strict
        descendant of their first id (each such item is an item of the parent's kind
        that a child took: the cost of refinement on old items).
    max_clusters : hard cap on the cluster count (None: 2 x n_clusters).
    spawn_rule : how new clusters are proposed: "anchored" (k-means over the recent
        window with the old centres fixed) or "outliers" (k-means over the items beyond
        every cluster's radius); see :mod:`stream_dec.online.novelty`.
    centre_rule : how current prototypes move: "mean" (online-EWC MAP step of a k-means
        likelihood: toward the batch mean of their items, damped by their running
        evidence) or "dec" (DEC KL gradient steps under the diagonal-Fisher EWC penalty
        and distillation on the reservoir). Changing it on a fitted model starts the
        new rule's own state afresh (zero Adam moments for "dec").
    follow : which batch items move a current prototype under the "mean" rule:
        "labels" (the items labelled with its id) or "nearest" (the items nearest to it
        among the current prototypes, the k-means E-step). "nearest" follows drifting
        groups that the gates label with another id's remembered region (root tracking
        .75-.91 of its start on the benchmark sets, against .63-.85), but lets novel
        items inside an id drag its prototype before a new cluster takes them: it finds
        fewer (ACC all .950 → .835 on banking77's 4-class draw) and, with few
        remembered items, can pass 1% churn when new groups arrive. For streams that
        drift more than they grow; README "Quality" and docs/experiments.md §17.
    remember : what the reservoir (the memory the churn guard and gates protect) takes:
        "founding" (the fitted items and each new cluster's items at birth) or
        "settled" (also every item that ages out of the novelty window under its id).
    spawn_refine_iters : gated Lloyd iterations that move a proposed centre to the core
        of what it captures.
    max_churn : largest share of the reservoir one update may relabel.
    max_total_churn : largest share of the reservoir whose id may differ from the id it
        was first given; an update may not push the share past it.
    buffer_size, buffer_ttl : bounds of the window of recent latents (items, batches).
    device : "auto" (CUDA when available), "cpu", "cuda", ...
    random_state : seed; the same seed and inputs give the same model and outputs.
    verbose : print training progress to stderr.

    Examples
    --------
    Fit on three blobs, then stream batches in which a fourth blob appears: the old
    ids stay where they were and the new blob gets the next fresh id (ids are append-only;
    ``parent_ids_`` records the id most of its items came in under, if one held more
    than half of them, and ``predict`` keeps returning the finest id).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(4, 8)) * 8
    >>> def blobs(k, n):
    ...     return (centres[rng.integers(0, k, n)] + rng.normal(size=(n, 8))).astype(np.float32)
    >>> m = StreamDEC(n_clusters=3, hidden_dims=(), pretrain_epochs=5, refine_max_iter=0, n_init=1,
    ...               random_state=0, verbose=False, device="cpu").fit(blobs(3, 300))
    >>> m.cluster_ids_.tolist()
    [0, 1, 2]
    >>> X_old = blobs(3, 200)
    >>> before = m.predict(X_old)
    >>> for t in range(6):
    ...     report = m.partial_fit(np.concatenate([blobs(3, 60), centres[3] + rng.normal(size=(30, 8)).astype(np.float32)]))
    >>> m.cluster_ids_.tolist(), report.model_version
    ([0, 1, 2, 3], 6)
    >>> bool((m.predict(X_old) == before).all())
    True
    >>> np.unique(m.predict(centres[3:] + rng.normal(size=(50, 8)).astype(np.float32))).tolist()
    [3]
    """

    _parameter_constraints: dict[str, Any] = {
        "n_clusters": Interval(Integral, 1),
        "hidden_dims": Each(Interval(Integral, 1)),
        "latent_dim": NoneOr(Interval(Integral, 1)),
        "alpha": _POSITIVE,
        "pretrain_epochs": Interval(Integral, 0),
        "batch_size": Interval(Integral, 1),
        "pretrain_lr": _POSITIVE,
        "refine_max_iter": Interval(Integral, 0),
        "refine_lr": _POSITIVE,
        "update_interval": Interval(Integral, 1),
        "tol": _SHARE,
        "refine_encoder": InstanceOf(bool, "a bool"),
        "n_init": Interval(Integral, 1),
        "online_steps": Interval(Integral, 0),
        "online_lr": Interval(Real, 0),
        "max_update_ms": _POSITIVE,
        "ewc_lambda": Interval(Real, 0),
        "fisher_decay": _SHARE,
        "distill_weight": Interval(Real, 0),
        "freq_decay": Interval(Real, 0, 1, closed="left"),
        "reservoir_size": Interval(Integral, 1),
        "novelty_quantile": Interval(Real, 0, 1, closed="neither"),
        "min_support": NoneOr(Interval(Integral, 2)),
        "margin": Interval(Real, 0),
        "max_clusters": NoneOr(Interval(Integral, "n_clusters")),
        "spawn_rule": Options(SPAWN_RULES),
        "centre_rule": Options(CENTRE_RULES),
        "follow": Options(("labels", "nearest")),
        "remember": Options(("founding", "settled")),
        "spawn_refine_iters": Interval(Integral, 0),
        "new_cluster_churn": Interval(Real, 0, 1, closed="left"),
        "refine_share": _SHARE,
        "refine_budget": _SHARE,
        "max_churn": _SHARE,
        "max_total_churn": _SHARE,
        "buffer_size": Interval(Integral, 1),
        "buffer_ttl": Interval(Integral, 1),
        "device": InstanceOf(str, "a str"),
        "random_state": NoneOr(Interval(Integral, 0)),
        "verbose": InstanceOf((bool, Integral), "a bool"),
    }

    # Fitted per-cluster state, read-only views of the parts that own it.
    cluster_ids_ = _Column("clusters_", "ids", "Cluster id of every row of the per-cluster arrays (int64, append-only).")
    centres_ = _Column("clusters_", "centres", "Current prototypes ``[K, d]`` (they follow the data).")
    memory_ = _Column("clusters_", "memory", "Memory prototypes ``[K, d]`` (where each id was born).")
    spawned_ = _Column("clusters_", "spawned", "Whether each cluster was created online.")
    gate_ = _Column("clusters_", "gate", "Gate of each memory prototype.")
    gate_cur_ = _Column("clusters_", "gate_cur", "Gate of each current prototype.")
    radius_ = _Column("clusters_", "radius", "Squared distance within which each cluster explains an item.")
    freq_ = _Column("clusters_", "freq", "Running soft cluster frequencies.")
    next_id_ = _Column("clusters_", "next_id", "The id the next new cluster gets.")
    fisher_ = _Column("ewc_", "fisher", "Running diagonal Fisher ``[K, d]`` of the centres under the centre rule's likelihood.")
    ewc_anchor_ = _Column("ewc_", "anchor", "Centres the EWC penalty pulls toward ``[K, d]``.")
    evidence_ = _Column("ewc_", "evidence", "Running count of items given to each cluster (the \"mean\" rule's Fisher per dimension).")

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        hidden_dims: tuple[int, ...] = (),
        latent_dim: int | None = None,
        alpha: float = 1.0,
        pretrain_epochs: int = 30,
        batch_size: int = 256,
        pretrain_lr: float = 1e-3,
        refine_max_iter: int = 600,
        refine_lr: float = 1e-4,
        update_interval: int = 100,
        tol: float = 1e-3,
        refine_encoder: bool = False,
        n_init: int = 5,
        online_steps: int = 5,
        online_lr: float = 0.02,
        max_update_ms: float = 250.0,
        ewc_lambda: float = 0.1,
        fisher_decay: float = 0.9,
        distill_weight: float = 1.0,
        freq_decay: float = 0.9,
        reservoir_size: int = 4096,
        novelty_quantile: float = 0.95,
        min_support: int | None = None,
        margin: float = 0.1,
        max_clusters: int | None = None,
        spawn_rule: str = "anchored",
        centre_rule: str = "mean",
        follow: str = "labels",
        remember: str = "founding",
        spawn_refine_iters: int = 5,
        new_cluster_churn: float = 0.002,
        refine_share: float = 1.0,
        refine_budget: float = 0.02,
        max_churn: float = 0.005,
        max_total_churn: float = 0.005,
        buffer_size: int = 4096,
        buffer_ttl: int = 10,
        device: str = "auto",
        random_state: int | None = None,
        verbose: bool = True,
    ):
        # scikit-learn estimators store every parameter as given, one line each.
        self.n_clusters = n_clusters
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.alpha = alpha
        self.pretrain_epochs = pretrain_epochs
        self.batch_size = batch_size
        self.pretrain_lr = pretrain_lr
        self.refine_max_iter = refine_max_iter
        self.refine_lr = refine_lr
        self.update_interval = update_interval
        self.tol = tol
        self.refine_encoder = refine_encoder
        self.n_init = n_init
        self.online_steps = online_steps
        self.online_lr = online_lr
        self.max_update_ms = max_update_ms
        self.ewc_lambda = ewc_lambda
        self.fisher_decay = fisher_decay
        self.distill_weight = distill_weight
        self.freq_decay = freq_decay
        self.reservoir_size = reservoir_size
        self.novelty_quantile = novelty_quantile
        self.min_support = min_support
        self.margin = margin
        self.max_clusters = max_clusters
        self.spawn_rule = spawn_rule
        self.centre_rule = centre_rule
        self.follow = follow
        self.remember = remember
        self.spawn_refine_iters = spawn_refine_iters
        self.new_cluster_churn = new_cluster_churn
        self.refine_share = refine_share
        self.refine_budget = refine_budget
        self.max_churn = max_churn
        self.max_total_churn = max_total_churn
        self.buffer_size = buffer_size
        self.buffer_ttl = buffer_ttl
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"[stream_dec] {msg}", file=sys.stderr, flush=True)

    def _check_params(self, names: tuple[str, ...] | None = None) -> None:
        """Check all hyper-parameters, or only ``names``, against the constraints table."""
        if names is None:
            check_params(self.get_params(), self._parameter_constraints)
        else:
            check_params({n: getattr(self, n) for n in names}, {n: self._parameter_constraints[n] for n in names})

    def _check_fitted(self) -> None:
        if "clusters_" not in self.__dict__:
            raise ValueError("this StreamDEC instance is not fitted yet: call fit(X) or StreamDEC.load(path) first")

    def _resolve_device(self) -> torch.device:
        return resolve_device(self.device)

    def _prepare(self, X) -> torch.Tensor:
        X = check_embeddings(X, n_features=self.n_features_in_)
        return (torch.from_numpy(X).to(self.device_) - self.mean_) / self.scale_

    @torch.no_grad()
    def _encode(self, Xn: torch.Tensor) -> torch.Tensor:
        enc, chunk = self.autoencoder_.encoder, gates.PREDICT_CHUNK
        return torch.cat([enc(Xn[i : i + chunk]) for i in range(0, Xn.shape[0], chunk)])

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None) -> "StreamDEC":
        """Train the autoencoder and the clustering layer on ``X`` (no labels used)."""
        self._check_params()
        X = check_embeddings(X)
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"X has {X.shape[0]} samples, fewer than n_clusters={self.n_clusters}")
        dev = self._resolve_device()
        seed = int(self.random_state) if self.random_state is not None else int(np.random.SeedSequence().entropy % (2**31))
        t0 = time.perf_counter()
        Xt = torch.from_numpy(X).to(dev)
        mean = Xt.mean(0)
        # One global scale (not per feature) keeps the geometry of the embeddings intact.
        scale = float(torch.sqrt(((Xt - mean) ** 2).mean())) or 1.0
        Xn = (Xt - mean) / scale
        gen = torch.Generator().manual_seed(seed)
        latent_dim = int(self.latent_dim) if self.latent_dim is not None else min(128, X.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae = Autoencoder(X.shape[1], self.hidden_dims, latent_dim).to(dev)
        self._say(f"fit: {X.shape[0]} x {X.shape[1]} on {dev}, autoencoder {ae.dims}")
        pretrain_autoencoder(
            ae, Xn, epochs=self.pretrain_epochs, batch_size=self.batch_size, lr=self.pretrain_lr, generator=gen,
            on_epoch=lambda e, loss: self._say(f"pretrain epoch {e + 1}/{self.pretrain_epochs} loss {loss:.4f}")
            if (e + 1) % 5 == 0 or e + 1 == self.pretrain_epochs else None,
        )
        with torch.no_grad():
            z = torch.cat([ae.encoder(Xn[i : i + gates.PREDICT_CHUNK]) for i in range(0, Xn.shape[0], gates.PREDICT_CHUNK)])
        km = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=seed).fit(z.cpu().numpy())
        centres = torch.nn.Parameter(torch.from_numpy(km.cluster_centers_.astype(np.float32)).to(dev))
        self._say(f"k-means init: inertia {km.inertia_:.3g}")
        if self.refine_max_iter > 0:
            iters = refine_dec(
                ae.encoder, centres, Xn, alpha=self.alpha, lr=self.refine_lr, batch_size=self.batch_size,
                max_iter=self.refine_max_iter, update_interval=self.update_interval, tol=self.tol,
                generator=gen, train_encoder=self.refine_encoder,
                on_update=lambda it, delta, loss: self._say(f"refine iter {it}: label change {delta:.4f}, KL {loss:.4f}"),
            )
            self._say(f"refinement stopped after {iters} iterations")
        ae.eval()
        for p in ae.parameters():
            p.requires_grad_(False)
        self.device_, self.seed_, self.n_features_in_ = dev, seed, X.shape[1]
        self.mean_, self.scale_, self.autoencoder_ = mean, scale, ae
        self._init_online_state(self._encode(Xn), centres.detach().clone())
        self.fit_seconds_ = time.perf_counter() - t0
        self._say(f"fit done in {self.fit_seconds_:.1f}s: {self.n_clusters} clusters")
        return self

    @torch.no_grad()
    def _init_online_state(self, z: torch.Tensor, centres: torch.Tensor) -> None:
        """The parts of the online model, from the fitted centres and the fit data's latents ``z``."""
        k = centres.shape[0]
        lab, counts, radius, spread = _fitted_geometry(z, centres, self.novelty_quantile)
        self.clusters_ = ClusterTable.from_fit(
            centres, radius=radius, freq=(counts.float() / counts.sum()).clamp_min(1e-6), support=counts.cpu().numpy()
        )
        self.rule_ = make_rule(self.centre_rule, k, centres.shape[1], centres.device)
        self.ewc_ = OnlineEWC.from_fit(z, centres, counts, self.alpha, likelihood=self.rule_.likelihood)
        self.clusters_.parts = [self.ewc_, self.rule_]
        self.version_ = 0
        # Data-relative scales: the typical within-cluster mean squared distance sets the
        # online step size and the cohesion a new cluster must show.
        spread_med = float(torch.nanmedian(spread))
        self.cohesion_ = float(torch.nanquantile(spread, 0.9))
        c2 = squared_distances(centres, centres).fill_diagonal_(float("inf"))
        self.separation_ = float(torch.quantile(c2.min(1).values, 0.1)) if k > 1 else spread_med
        self.latent_scale_ = float(np.sqrt(max(spread_med, 1e-12) / z.shape[1]))
        sizes = counts[counts > 0].float()
        self.min_support_ = int(self.min_support) if self.min_support is not None else int(np.clip(0.2 * float(sizes.median()), 10, 50))
        self.max_clusters_ = int(self.max_clusters) if self.max_clusters is not None else 2 * k
        rng = np.random.default_rng([self.seed_, 0])
        self.reservoir_ = Reservoir(self.reservoir_size, z.shape[1])
        order = torch.from_numpy(rng.permutation(z.shape[0])).to(z.device)
        self.reservoir_.add(z[order].cpu().numpy(), self.clusters_.ids[lab[order].cpu().numpy()], rng)
        self.buffer_ = NoveltyBuffer(self.buffer_size, z.shape[1], self.buffer_ttl)
        self.n_seen_ = int(z.shape[0])
        self._calibration = None  # confidence calibration of the current version (derived, not saved)

    # ------------------------------------------------------------------ predict
    def predict(self, X) -> np.ndarray:
        """Cluster id (int64, stable across updates) of every row of ``X``."""
        self._check_fitted()
        idx = gates.assign(self.clusters_, self._encode(self._prepare(X)))
        return self.clusters_.ids[idx.cpu().numpy()]

    def predict_proba(self, X) -> np.ndarray:
        """Soft assignments ``[n, K]``; columns follow ``cluster_ids_``."""
        self._check_fitted()
        z, chunk = self._encode(self._prepare(X)), gates.PREDICT_CHUNK
        out = [soft_assignment(gates.distances(self.clusters_, z[i : i + chunk])[1], self.alpha) for i in range(0, z.shape[0], chunk)]
        return torch.cat(out).cpu().numpy()

    def predict_with_confidence(self, X) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, confidence)`` in one pass: the id of every row and the probability that it is
        the id the item's group gets (stream_dec/online/confidence.py)."""
        self._check_fitted()
        rows, conf = gates.label(self.clusters_, self._encode(self._prepare(X)), self.confidence_calibration())
        return self.clusters_.ids[rows.cpu().numpy()], conf.cpu().numpy()

    @torch.no_grad()
    def confidence_calibration(self) -> Calibration:
        """The calibration of ``predict_with_confidence`` for the current model version.

        Fitted on the gated-distance margins, under the current clusters, of a fixed
        sample of the items the model remembers labelling (the reservoir) and of the
        recent window: what it labelled and what it labels now. Derived from
        checkpointed state, so a loaded model gives the same confidences; computed once
        per version.
        """
        self._check_fitted()
        cached = self.__dict__.get("_calibration")
        if cached is None or cached[0] != self.version_:
            parts = [a[sample_rows(len(a))] for a in (self.reservoir_.data, self.buffer_.z)]
            z = torch.from_numpy(np.concatenate(parts)).to(self.device_)
            cached = self._calibration = (self.version_, fit_margins(gates.distances(self.clusters_, z)[1]))
        return cached[1]

    def transform(self, X) -> np.ndarray:
        """Latent codes of ``X``."""
        self._check_fitted()
        return self._encode(self._prepare(X)).cpu().numpy()

    @property
    def parent_ids_(self) -> dict[int, int | None]:
        """Every id of ``cluster_ids_`` and the id it refines (None for a root: fitted or a new top-level group)."""
        self._check_fitted()
        return self.clusters_.parent_ids()

    def root_of(self, cluster_id: int) -> int:
        """The root (top ancestor) of ``cluster_id``; a root is its own."""
        self._check_fitted()
        if int(cluster_id) not in set(self.clusters_.ids.tolist()):
            raise KeyError(f"no cluster {cluster_id}")
        return int(self.clusters_.roots(np.array([cluster_id]))[0])

    def roots(self, ids) -> np.ndarray:
        """The root of every id in ``ids`` (ids from ``predict``), as an int64 array."""
        self._check_fitted()
        return self.clusters_.roots(np.asarray(ids, dtype=np.int64))

    @property
    def n_clusters_(self) -> int:
        """Current number of clusters (grows as new groups are found)."""
        self._check_fitted()
        return len(self.clusters_)

    # ------------------------------------------------------------------ online update
    def partial_fit(self, X, y=None, *, plan: UpdatePlan | dict | None = None) -> DriftReport:
        """One bounded online update on the micro-batch ``X``; returns its drift report.

        ``plan`` (the ``plan`` of an earlier report, e.g. from a journal) redoes that
        update exactly, ignoring the clock, ``online_steps`` and ``max_update_ms``: the
        same model, batch and plan give the same model and report. A rejected input
        (``ValueError``) leaves the model unchanged.
        """
        self._check_fitted()
        t0 = time.perf_counter()
        self._check_params(("online_steps", "max_update_ms"))  # the budgets are set after fit (the service does)
        return self._partial_fit_z(self._encode(self._prepare(X)), t0, plan)

    def partial_fit_latent(self, Z, *, plan: UpdatePlan | dict | None = None) -> DriftReport:
        """:meth:`partial_fit` on latent codes ``Z`` (from :meth:`transform` or a snapshot's).

        The encoder is frozen after ``fit``, so ``partial_fit_latent(transform(X))`` is
        ``partial_fit(X)``: a learner can learn from latents that predictors computed.
        """
        self._check_fitted()
        t0 = time.perf_counter()
        self._check_params(("online_steps", "max_update_ms"))
        z = torch.from_numpy(check_embeddings(Z, n_features=self.clusters_.centres.shape[1], name="Z")).to(self.device_)
        return self._partial_fit_z(z, t0, plan)

    def _partial_fit_z(self, z: torch.Tensor, t0: float, plan: UpdatePlan | dict | None) -> DriftReport:
        replay = None if plan is None else UpdatePlan.from_dict(plan)
        if not (replay.learn if replay is not None else self.online_steps > 0):
            return self._label_only(z, t0)
        u = self._begin_update(z, t0, replay)
        u.steps, cut = self._rule().step(self, u)
        u.steps_cut = replay.steps_cut if replay is not None else cut
        res_both = gates.calibrate_moving_gates(self.clusters_, u.res, u.before, self.margin, self.new_cluster_churn) if u.steps else None
        window_before = lifecycle.Window.of(self.buffer_)
        aged_z, aged_ids = self.buffer_.add(
            z.cpu().numpy(), self.clusters_.ids[u.nearest.cpu().numpy()], (~u.explained).cpu().numpy(), u.version
        )
        spawned = maybe_spawn(self, u, res_both)
        churn, action, after = churn_guard(self, u, res_both, spawned)
        refined = refined_share(self.clusters_, u.published, after)
        events = lifecycle.born(self.clusters_, u, after)
        # Statistics draw from the update's generator before the reservoir does.
        self._update_statistics(u)
        self._res_ids = self._remember(u, aged_z, aged_ids, spawned, after)
        events += lifecycle.turnover(self.clusters_, u, window_before, lifecycle.Window.of(self.buffer_), after, self._res_ids)
        self.version_ = u.version
        self.n_seen_ += int(z.shape[0])
        return self._report(u, churn, action, events, refined)

    def _rule(self):
        """The centre rule object for ``centre_rule`` (a fresh one if the parameter changed),
        with ``ewc_`` holding the Fisher of its likelihood."""
        t = self.clusters_
        if self.rule_.name != self.centre_rule:
            self.rule_ = make_rule(self.centre_rule, len(t), t.centres.shape[1], t.device)
            t.parts = [self.ewc_, self.rule_]
        if self.ewc_.likelihood != self.rule_.likelihood:
            res = self.reservoir_.tensors(t.device)[0]
            self.ewc_.use(self.rule_.likelihood, res, gates.assign(t, res), self.alpha)
        return self.rule_

    def _begin_update(self, z: torch.Tensor, t0: float, replay: UpdatePlan | None) -> UpdateContext:
        """Explain the batch with the current clusters and snapshot what the update must protect."""
        t, dev = self.clusters_, z.device
        t.begin_update()
        nearest, explained = gates.explain(t, z)
        res = self.reservoir_.tensors(dev)[0]
        version = self.version_ + 1
        return UpdateContext(
            version=version, rng=np.random.default_rng([self.seed_, version]), t0=t0,
            deadline=t0 + self.max_update_ms / 1000.0, replay=replay,
            step_budget=replay.steps if replay is not None else int(self.online_steps),
            z=z, z_in=z[explained], nearest=nearest, explained=explained,
            res=res, published=self.reservoir_.tensors(dev)[1], before=self._reservoir_assignment(res),
            k_old=len(t), old_centres=t.centres.clone(), old_gate_cur=t.gate_cur.clone(),
        )

    def _reservoir_assignment(self, res: torch.Tensor) -> torch.Tensor:
        """Current assignment of the reservoir, cached between updates (derived state, not saved)."""
        cached = getattr(self, "_res_ids", None)
        if cached is None or len(cached) != len(res):
            cached = gates.assign(self.clusters_, res)
        return cached

    @torch.no_grad()
    def _update_statistics(self, u: UpdateContext) -> None:
        """Running frequencies and EWC consolidation, from a fixed-size sample of the explained items."""
        t, sample = self.clusters_, None
        if u.z_in.shape[0]:
            # Both are expectations over the batch: a fixed-size sample estimates them.
            sample = u.z_in[torch.from_numpy(u.rng.permutation(u.z_in.shape[0])[:STEP_ROWS]).to(u.z.device)]
            q = soft_assignment(squared_distances(sample, t.centres), self.alpha)
            t.freq = self.freq_decay * t.freq + (1 - self.freq_decay) * q.mean(0)
        counts = torch.bincount(u.nearest if u.given is None else u.given, minlength=len(t))
        self.ewc_.consolidate(sample, t.centres, counts, alpha=self.alpha, decay=self.fisher_decay)

    @torch.no_grad()
    def _remember(self, u: UpdateContext, aged_z: np.ndarray, aged_ids: np.ndarray, spawned: list[np.ndarray], after: torch.Tensor) -> torch.Tensor:
        """Add the items whose id is now settled to the reservoir; returns its assignment after the update.

        The reservoir remembers what each id was founded on: the fitted items, and the
        items a new cluster captured at birth. Items that merely aged out of the window
        under an old id are added only under ``remember="settled"``: a class the model
        has not found yet sits there under some old id, and would then block its own
        new cluster. Items enter once their id is settled (after their stay in the
        window), so a class still being discovered does not count as old knowledge that
        its own new cluster would "steal".
        """
        t, buf = self.clusters_, self.buffer_
        settled_z, settled_ids = np.zeros((0, u.z.shape[1]), dtype=np.float32), np.zeros(0, dtype=np.int64)
        if self.remember == "settled":
            settled_z, settled_ids = aged_z, aged_ids
        if spawned:
            for j, rows in enumerate(spawned):
                settled_z = np.concatenate([settled_z, buf.z[rows]])
                settled_ids = np.concatenate([settled_ids, np.full(len(rows), t.ids[u.k_old + j])])
            buf.remove(np.concatenate(spawned))
        if len(settled_z):
            slots = torch.from_numpy(self.reservoir_.add(settled_z, settled_ids, u.rng)).to(u.z.device)
            res = self.reservoir_.tensors(u.z.device)[0]
            after = torch.cat([after, after.new_zeros(len(res) - len(after))])
            after[slots] = gates.assign(t, res[slots])
        return after

    def _report(self, u: UpdateContext, churn: float, action: str, events: list[dict], refined: float = 0.0) -> DriftReport:
        t, k_old, plan = self.clusters_, u.k_old, u.plan()
        shift = float((t.centres[:k_old] - u.old_centres).norm(dim=1).mean() / torch.sqrt(t.radius[:k_old]).mean())
        return DriftReport(
            model_version=u.version,
            n_items=int(u.z.shape[0]),
            steps=u.steps,
            update_ms=(time.perf_counter() - u.t0) * 1000.0,
            churn=churn,
            centre_shift=shift,
            novelty_rate=float((~u.explained).float().mean()),
            new_cluster_ids=[int(i) for i in t.ids[k_old:]],
            n_clusters=len(t),
            buffer_size=len(self.buffer_),
            budget_exhausted=plan.cut,
            guard_action=action,
            plan=plan.to_dict(),
            lifecycle=events,
            refined=refined,
        )

    def _label_only(self, z: torch.Tensor, t0: float) -> DriftReport:
        """The report of an update that learns nothing (``online_steps=0``): the model is unchanged."""
        explained = gates.explain(self.clusters_, z)[1]
        return DriftReport(
            model_version=int(self.version_), n_items=int(z.shape[0]), steps=0, update_ms=(time.perf_counter() - t0) * 1000.0,
            churn=0.0, centre_shift=0.0, novelty_rate=float((~explained).float().mean()), n_clusters=len(self.clusters_),
            buffer_size=len(self.buffer_), plan=UpdatePlan(learn=False).to_dict(),
        )

    # ------------------------------------------------------------------ persistence
    def _state(self, extra: dict | None) -> dict:
        self._check_fitted()
        self._rule()
        return persistence.model_state(self, extra)

    def save(self, path: str | Path, *, extra: dict | None = None, keep: int = 3) -> Path:
        """Write a checkpoint atomically; returns the file written.

        ``path`` is a directory when it exists as one or has no file suffix: then
        ``ckpt-<version>.sdec`` is written in it and the newest ``keep`` are kept.
        Otherwise (e.g. ``model.sdec``) it is the file to write.
        ``extra`` is stored verbatim (plain data only), e.g. consumer offsets.
        """
        state = self._state(extra)
        p = Path(path)
        if p.is_dir() or not p.suffix:
            return ckpt.save_to_directory(p, state, seq=self.version_, keep=keep)
        return ckpt.write_atomic(p, state)

    def snapshot(self, *, extra: dict | None = None) -> bytes:
        """The checkpoint file's bytes for the current state (write them with ``checkpoint.save_to_directory``).

        Serialising is the only part that must not overlap a ``partial_fit``; the write
        (fsync included) can then run on another thread.
        """
        return ckpt.encode(self._state(extra))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "StreamDEC":
        """Load a checkpoint file, or the newest valid one of a directory (any supported format).

        Raises :class:`stream_dec.checkpoint.CheckpointError` (a ``ValueError``) when no
        usable checkpoint exists; never returns a half-loaded model.
        """
        state, source = ckpt.load_any(path)
        try:
            return persistence.model_from_state(cls, state, device, source)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, ckpt.CheckpointError):
                raise
            raise ckpt.CheckpointError(f"{source} is incomplete or inconsistent: {exc}") from None

    def summary(self) -> dict[str, Any]:
        """Plain-data description of the fitted model (used by ``stream-dec inspect``)."""
        self._check_fitted()
        t = self.clusters_
        return {
            "model_version": int(self.version_),
            "n_features_in": int(self.n_features_in_),
            "latent_dim": int(self.autoencoder_.dims[-1]),
            "autoencoder": list(self.autoencoder_.dims),
            "n_clusters": self.n_clusters_,
            "cluster_ids": [int(i) for i in t.ids],
            "spawned_ids": [int(i) for i, s in zip(t.ids, t.spawned.cpu().numpy()) if s],
            "parent_ids": t.parent_ids(),
            "tree": _tree(t),
            "next_id": int(t.next_id),
            "max_clusters": int(self.max_clusters_),
            "min_support": int(self.min_support_),
            "items_seen": int(self.n_seen_),
            "reservoir": len(self.reservoir_),
            "novelty_buffer": len(self.buffer_),
            "fisher_mean": float(self.ewc_.fisher.mean()),
            "seed": int(self.seed_),
            "device": str(self.device_),
        }


def _tree(t: ClusterTable) -> list[dict]:
    """The ids as a forest: ``[{"id", "born", "support", "children": [...]}]``, roots and children in id order.

    ``born`` is the model version of the id's birth (0: fitted), ``support`` the items it
    was founded on; either is None where the checkpoint it came from did not record it.
    """
    nodes = {
        int(i): {"id": int(i), "born": None if b < 0 else int(b), "support": None if n < 0 else int(n), "children": []}
        for i, b, n in zip(t.ids, t.born, t.support)
    }
    forest = []
    for i, p in zip(t.ids, t.parent):
        (forest if p == NO_PARENT else nodes[int(p)]["children"]).append(nodes[int(i)])
    return forest


@torch.no_grad()
def _fitted_geometry(z: torch.Tensor, centres: torch.Tensor, quantile: float) -> tuple[torch.Tensor, ...]:
    """``(labels, counts, radius, spread)`` of the fitted clusters on their items ``z``.

    ``radius`` is the ``quantile`` of each cluster's squared distances (the median
    radius where a cluster has fewer than two items); ``spread`` their mean (NaN there).
    """
    k = centres.shape[0]
    d2 = squared_distances(z, centres)
    lab = d2.argmin(1)
    own = d2.gather(1, lab[:, None]).squeeze(1)
    counts = torch.bincount(lab, minlength=k)
    radius = torch.full((k,), float("nan"), device=centres.device)
    spread = torch.full((k,), float("nan"), device=centres.device)
    for j in range(k):
        m = own[lab == j]
        if m.numel() >= 2:
            radius[j] = torch.quantile(m, quantile)
            spread[j] = m.mean()
    return lab, counts, torch.where(torch.isnan(radius), torch.nanmedian(radius), radius), spread

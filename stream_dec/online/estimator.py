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
* a **churn guard** measures how many remembered items an update would relabel and
  shrinks the centre step or drops new clusters until it is within budget.

The encoder is trained by ``fit`` (reconstruction pretraining, then DEC refinement) and
frozen online, so an item's latent never changes after ``fit``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans

from stream_dec import checkpoint as ckpt
from stream_dec._validation import check_embeddings
from stream_dec.model import (
    Autoencoder,
    fisher_diagonal,
    kl_centre_gradient,
    pretrain_autoencoder,
    refine_dec,
    soft_assignment,
    squared_distances,
    target_distribution,
)
from stream_dec.online.novelty import NoveltyBuffer, find_new_clusters, propose_anchored, propose_refit
from stream_dec.online.report import DriftReport
from stream_dec.online.reservoir import Reservoir

FORMAT_VERSION = 1
_PREDICT_CHUNK = 65536
SPAWN_RULES = ("refit", "anchored", "outliers")
_PROPOSAL_SAMPLE = 2048
_STEP_ROWS = 256  # rows per online gradient step (a fresh slice of the batch each step)
# Fitted tensors that, with the autoencoder, reservoir and buffer, make up the model.
_TENSOR_STATE = (
    "mean_", "centres_", "memory_", "spawned_", "gate_", "gate_cur_", "radius_", "freq_", "fisher_", "ewc_anchor_",
    "adam_m_", "adam_v_", "adam_t_", "evidence_",
)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


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
    online_steps, max_update_ms : the step and wall-clock budget of one ``partial_fit``.
    online_lr : online step size in units of the within-cluster spread.
    ewc_lambda, fisher_decay : online-EWC strength and the decay of the running Fisher
        (and of the running evidence counts of the "mean" rule).
    distill_weight : weight of KL(q_old || q_new) on reservoir latents.
    freq_decay : decay of the running cluster frequencies used by the target.
    reservoir_size : latents remembered for rehearsal and the churn guard.
    novelty_quantile : an item is unexplained when it lies beyond this quantile of its
        nearest cluster's squared distances.
    min_support : items a new cluster needs (None: derived from the fitted cluster sizes).
    margin : a spawned cluster takes an item only when it is at least this much closer
        (relative distance) than the best older cluster.
    new_cluster_churn : share of remembered items a new cluster may take at birth; its
        gate (how much closer it must be) is calibrated on the reservoir to that share.
    max_clusters : hard cap on the cluster count (None: 2 x n_clusters).
    spawn_rule : how new clusters are proposed: "anchored" (k-means over the recent
        window with the old centres fixed) or "outliers" (k-means over the items beyond
        every cluster's radius); see :mod:`stream_dec.online.novelty`.
    centre_rule : how current prototypes move: "mean" (online-EWC MAP step of a k-means
        likelihood: toward the batch mean of their items, damped by their running
        evidence) or "dec" (DEC KL gradient steps under the diagonal-Fisher EWC penalty
        and distillation on the reservoir).
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
    """

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
        remember: str = "founding",
        spawn_refine_iters: int = 5,
        new_cluster_churn: float = 0.002,
        max_churn: float = 0.005,
        max_total_churn: float = 0.005,
        buffer_size: int = 4096,
        buffer_ttl: int = 10,
        device: str = "auto",
        random_state: int | None = None,
        verbose: bool = True,
    ):
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
        self.remember = remember
        self.spawn_refine_iters = spawn_refine_iters
        self.new_cluster_churn = new_cluster_churn
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

    def _check_params(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"invalid hyper-parameter: {what}")

        need(isinstance(self.n_clusters, (int, np.integer)) and self.n_clusters >= 1, f"n_clusters must be an int >= 1, got {self.n_clusters!r}")
        need(all(int(h) >= 1 for h in self.hidden_dims), f"hidden_dims must be positive, got {self.hidden_dims!r}")
        need(self.latent_dim is None or int(self.latent_dim) >= 1, f"latent_dim must be None or >= 1, got {self.latent_dim!r}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        need(self.pretrain_epochs >= 0 and self.refine_max_iter >= 0, "pretrain_epochs and refine_max_iter must be >= 0")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(self.online_steps >= 0, f"online_steps must be >= 0, got {self.online_steps!r}")
        need(self.max_update_ms > 0, f"max_update_ms must be > 0, got {self.max_update_ms!r}")
        need(0 < self.novelty_quantile < 1, f"novelty_quantile must be in (0, 1), got {self.novelty_quantile!r}")
        need(0 <= self.max_churn <= 1, f"max_churn must be in [0, 1], got {self.max_churn!r}")
        need(0 <= self.max_total_churn <= 1, f"max_total_churn must be in [0, 1], got {self.max_total_churn!r}")
        need(self.remember in ("founding", "settled"), f"remember must be 'founding' or 'settled', got {self.remember!r}")
        need(self.centre_rule in ("dec", "mean"), f"centre_rule must be 'dec' or 'mean', got {self.centre_rule!r}")
        need(self.spawn_rule in SPAWN_RULES, f"spawn_rule must be one of {SPAWN_RULES}, got {self.spawn_rule!r}")
        need(self.margin >= 0, f"margin must be >= 0, got {self.margin!r}")
        need(0 <= self.new_cluster_churn < 1, f"new_cluster_churn must be in [0, 1), got {self.new_cluster_churn!r}")
        need(0 <= self.fisher_decay <= 1 and 0 <= self.freq_decay < 1, "fisher_decay must be in [0, 1] and freq_decay in [0, 1)")
        need(self.reservoir_size >= 1 and self.buffer_size >= 1 and self.buffer_ttl >= 1, "reservoir_size, buffer_size and buffer_ttl must be >= 1")
        need(self.min_support is None or self.min_support >= 2, f"min_support must be None or >= 2, got {self.min_support!r}")
        need(self.max_clusters is None or self.max_clusters >= self.n_clusters, f"max_clusters must be >= n_clusters, got {self.max_clusters!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "centres_"):
            raise ValueError("this StreamDEC instance is not fitted yet: call fit(X) or StreamDEC.load(path) first")

    def _prepare(self, X) -> torch.Tensor:
        X = check_embeddings(X, n_features=self.n_features_in_)
        return (torch.from_numpy(X).to(self.device_) - self.mean_) / self.scale_

    @torch.no_grad()
    def _encode(self, Xn: torch.Tensor) -> torch.Tensor:
        enc = self.autoencoder_.encoder
        return torch.cat([enc(Xn[i : i + _PREDICT_CHUNK]) for i in range(0, Xn.shape[0], _PREDICT_CHUNK)])

    @torch.no_grad()
    def _distances(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``[n, K]`` squared distance to the nearer prototype of each id, and the gated one.

        Gates inflate the distance of prototypes that did not exist when remembered items
        were labelled: ``gate_`` for a spawned cluster's birth prototype, ``gate_cur_``
        for every current (moving) prototype; an original memory prototype has gate 1.
        """
        k = self.centres_.shape[0]
        both = squared_distances(z, torch.cat([self.centres_, self.memory_]))
        return torch.minimum(both[:, :k], both[:, k:]), self._gated(both[:, :k], both[:, k:])

    def _gated(self, cur: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """Gated ``[n, K]`` distance per id from squared distances to current and memory prototypes."""
        return torch.minimum(cur * self.gate_cur_[None, :], mem * self.gate_[None, :])

    @torch.no_grad()
    def _assign(self, z: torch.Tensor) -> torch.Tensor:
        """Row index (into ``cluster_ids_``) of the winning cluster of every latent."""
        out = [self._distances(z[i : i + _PREDICT_CHUNK])[1].argmin(1) for i in range(0, z.shape[0], _PREDICT_CHUNK)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None) -> "StreamDEC":
        """Train the autoencoder and the clustering layer on ``X`` (no labels used)."""
        self._check_params()
        X = check_embeddings(X)
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"X has {X.shape[0]} samples, fewer than n_clusters={self.n_clusters}")
        dev = _resolve_device(self.device)
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
            z = torch.cat([ae.encoder(Xn[i : i + _PREDICT_CHUNK]) for i in range(0, Xn.shape[0], _PREDICT_CHUNK)])
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
        self.device_ = dev
        self.seed_ = seed
        self.n_features_in_ = X.shape[1]
        self.mean_ = mean
        self.scale_ = scale
        self.autoencoder_ = ae
        with torch.no_grad():
            z = self._encode(Xn)
        self._init_online_state(z, centres.detach().clone())
        self.fit_seconds_ = time.perf_counter() - t0
        self._say(f"fit done in {self.fit_seconds_:.1f}s: {self.n_clusters} clusters")
        return self

    @torch.no_grad()
    def _init_online_state(self, z: torch.Tensor, centres: torch.Tensor) -> None:
        k, dev = centres.shape[0], centres.device
        self.centres_ = centres
        self.memory_ = centres.clone()
        self.spawned_ = torch.zeros(k, dtype=torch.bool, device=dev)
        self.gate_ = torch.ones(k, device=dev)
        self.gate_cur_ = torch.ones(k, device=dev)
        self.adam_m_ = torch.zeros_like(centres)
        self.adam_v_ = torch.zeros_like(centres)
        self.adam_t_ = torch.zeros(k, device=dev)
        self.cluster_ids_ = np.arange(k, dtype=np.int64)
        self.next_id_ = k
        self.version_ = 0
        d2 = squared_distances(z, centres)
        lab = d2.argmin(1)
        own = d2.gather(1, lab[:, None]).squeeze(1)
        counts = torch.bincount(lab, minlength=k)
        self.evidence_ = counts.to(centres.dtype)
        radius = torch.full((k,), float("nan"), device=dev)
        spread = torch.full((k,), float("nan"), device=dev)
        for j in range(k):
            m = own[lab == j]
            if m.numel() >= 2:
                radius[j] = torch.quantile(m, self.novelty_quantile)
                spread[j] = m.mean()
        radius = torch.where(torch.isnan(radius), torch.nanmedian(radius), radius)
        self.radius_ = radius
        self.freq_ = (counts.float() / counts.sum()).clamp_min(1e-6)
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
        self.fisher_ = fisher_diagonal(z, centres, self.alpha)
        self.ewc_anchor_ = centres.clone()
        rng = np.random.default_rng([self.seed_, 0])
        self.reservoir_ = Reservoir(self.reservoir_size, z.shape[1])
        order = torch.from_numpy(rng.permutation(z.shape[0])).to(dev)
        self.reservoir_.add(z[order].cpu().numpy(), self.cluster_ids_[lab[order].cpu().numpy()], rng)
        self.buffer_ = NoveltyBuffer(self.buffer_size, z.shape[1], self.buffer_ttl)
        self.n_seen_ = int(z.shape[0])

    # ------------------------------------------------------------------ predict
    def predict(self, X) -> np.ndarray:
        """Cluster id (int64, stable across updates) of every row of ``X``."""
        self._check_fitted()
        idx = self._assign(self._encode(self._prepare(X)))
        return self.cluster_ids_[idx.cpu().numpy()]

    def predict_proba(self, X) -> np.ndarray:
        """Soft assignments ``[n, K]``; columns follow ``cluster_ids_``."""
        self._check_fitted()
        z = self._encode(self._prepare(X))
        out = [soft_assignment(self._distances(z[i : i + _PREDICT_CHUNK])[1], self.alpha) for i in range(0, z.shape[0], _PREDICT_CHUNK)]
        return torch.cat(out).cpu().numpy()

    def predict_with_confidence(self, X) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, confidence)`` in one pass: the id of every row and its soft-assignment weight."""
        self._check_fitted()
        z = self._encode(self._prepare(X))
        ids, conf = [], []
        for i in range(0, z.shape[0], _PREDICT_CHUNK):
            d = self._distances(z[i : i + _PREDICT_CHUNK])[1]
            q = soft_assignment(d, self.alpha)
            best = d.argmin(1)
            ids.append(best)
            conf.append(q.gather(1, best[:, None]).squeeze(1))
        return self.cluster_ids_[torch.cat(ids).cpu().numpy()], torch.cat(conf).cpu().numpy()

    def transform(self, X) -> np.ndarray:
        """Latent codes of ``X``."""
        self._check_fitted()
        return self._encode(self._prepare(X)).cpu().numpy()

    @property
    def n_clusters_(self) -> int:
        """Current number of clusters (grows as new groups are found)."""
        self._check_fitted()
        return int(self.cluster_ids_.shape[0])

    # ------------------------------------------------------------------ online update
    def partial_fit(self, X, y=None) -> DriftReport:
        """One bounded online update on the micro-batch ``X``; returns its drift report.

        A rejected input (``ValueError``) leaves the model unchanged.
        """
        self._check_fitted()
        t0 = time.perf_counter()
        deadline = t0 + self.max_update_ms / 1000.0
        z = self._encode(self._prepare(X))
        version = self.version_ + 1
        rng = np.random.default_rng([self.seed_, version])
        dev = z.device

        d_raw, d_eff = self._distances(z)
        nearest = d_eff.argmin(1)
        explained = d_raw.gather(1, nearest[:, None]).squeeze(1) <= self.radius_[nearest]
        z_in = z[explained]

        res = torch.from_numpy(self.reservoir_.data).to(dev)
        published = torch.from_numpy(self.reservoir_.ids).to(dev)
        before = self._reservoir_assignment(res)
        old_centres = self.centres_.clone()
        k_old = self.centres_.shape[0]

        if self.centre_rule == "dec":
            steps, exhausted = self._centre_steps(z_in, res, rng, deadline)
        else:
            steps, exhausted = self._centre_mean_step(z, nearest), False
        res_both = self._calibrate_moving_gates(res, before) if steps else None

        aged_z, aged_ids = self.buffer_.add(
            z.cpu().numpy(), self.cluster_ids_[nearest.cpu().numpy()], (~explained).cpu().numpy(), version
        )
        spawned = self._maybe_spawn(rng, res, res_both)

        # Churn guard: bound both this update's relabelling of remembered items and
        # the share relabelled since they were first labelled (the budget may not be
        # exceeded by this update; it only binds once reached).
        ids_t = torch.from_numpy(self.cluster_ids_).to(dev)
        total_before = float((ids_t[before] != published).float().mean()) if len(res) else 0.0
        allowed_total = max(total_before, self.max_total_churn)
        action = "none"
        after = self._assign_reusing(res, res_both, k_old) if res_both is not None or spawned else before
        while True:
            ids_t = torch.from_numpy(self.cluster_ids_).to(dev)
            churn = float((before != after).float().mean()) if len(res) else 0.0
            total = float((ids_t[after] != published).float().mean()) if len(res) else 0.0
            if churn <= self.max_churn and total <= allowed_total:
                break
            # Undo the centre step first (it can be retried next batch), then drop the
            # new cluster that relabels most remembered items.
            new_taken = after >= k_old
            if not torch.equal(self.centres_[:k_old], old_centres):
                self.centres_[:k_old] = old_centres + 0.5 * (self.centres_[:k_old] - old_centres)
                if float((self.centres_[:k_old] - old_centres).norm(dim=1).max()) < 1e-3 * self.latent_scale_:
                    self.centres_[:k_old] = old_centres
                    action = "rolled_back"
                else:
                    action = "shrunk"
            elif spawned and bool(new_taken.any()):
                worst = int(torch.bincount(after[new_taken] - k_old, minlength=len(spawned)).argmax())
                self._drop_cluster(k_old + worst)
                spawned.pop(worst)
                action = "dropped_new"
            else:
                break
            after = self._assign(res)

        # The reservoir remembers what each id was founded on: the fitted items, and
        # the items a new cluster captured at birth. Items that merely aged out of the
        # window under an old id are not added: a class the model has not found yet
        # sits there under some old id, and would then block its own new cluster.
        settled_z = np.zeros((0, z.shape[1]), dtype=np.float32)
        settled_ids = np.zeros(0, dtype=np.int64)
        if self.remember == "settled":
            settled_z, settled_ids = aged_z, aged_ids
        if spawned:
            for j, rows in enumerate(spawned):
                settled_z = np.concatenate([settled_z, self.buffer_.z[rows]])
                settled_ids = np.concatenate([settled_ids, np.full(len(rows), self.cluster_ids_[k_old + j])])
            self.buffer_.remove(np.concatenate(spawned))
        n_new = self.n_clusters_ - k_old
        with torch.no_grad():
            self.freq_ = torch.cat([self.freq_, torch.full((n_new,), float(self.freq_.mean()), device=dev)])
            self.fisher_ = torch.cat([self.fisher_, torch.zeros(n_new, self.fisher_.shape[1], device=dev)])
            if z_in.shape[0]:
                # Both are expectations over the batch: a fixed-size sample estimates them.
                sample = z_in[torch.from_numpy(rng.permutation(z_in.shape[0])[:_STEP_ROWS]).to(dev)]
                q = soft_assignment(squared_distances(sample, self.centres_), self.alpha)
                self.freq_ = self.freq_decay * self.freq_ + (1 - self.freq_decay) * q.mean(0)
                self.fisher_ = self.fisher_decay * self.fisher_ + fisher_diagonal(sample, self.centres_, self.alpha)
            self.ewc_anchor_ = self.centres_.clone()
            counts = torch.bincount(nearest, minlength=self.n_clusters_).to(self.evidence_.dtype)
            self.evidence_ = self.fisher_decay * self.evidence_ + counts
            if len(settled_z):
                # Items enter the reservoir once their id is settled: after their stay in the
                # novelty window, so a class that is still being discovered does not count
                # as old knowledge that its own new cluster would "steal".
                slots = torch.from_numpy(self.reservoir_.add(settled_z, settled_ids, rng)).to(dev)
                res = torch.from_numpy(self.reservoir_.data).to(dev)
                after = torch.cat([after, after.new_zeros(len(res) - len(after))])
                after[slots] = self._assign(res[slots])
        self._res_ids = after
        shift = float((self.centres_[:k_old] - old_centres).norm(dim=1).mean() / torch.sqrt(self.radius_[:k_old]).mean())
        self.version_ = version
        self.n_seen_ += int(z.shape[0])
        return DriftReport(
            model_version=version,
            n_items=int(z.shape[0]),
            steps=steps,
            update_ms=(time.perf_counter() - t0) * 1000.0,
            churn=churn,
            centre_shift=shift,
            novelty_rate=float((~explained).float().mean()),
            new_cluster_ids=[int(i) for i in self.cluster_ids_[k_old:]],
            n_clusters=self.n_clusters_,
            buffer_size=len(self.buffer_),
            budget_exhausted=exhausted,
            guard_action=action,
        )

    def _reservoir_assignment(self, res: torch.Tensor) -> torch.Tensor:
        """Current assignment of the reservoir, cached between updates (derived state, not saved)."""
        cached = getattr(self, "_res_ids", None)
        if cached is None or len(cached) != len(res):
            cached = self._assign(res)
        return cached

    @torch.no_grad()
    def _calibrate_moving_gates(self, res: torch.Tensor, assigned: torch.Tensor) -> torch.Tensor | None:
        """Set each current prototype's gate so that it takes no remembered item of another id.

        A moving prototype may follow its own items anywhere, but it must not win an
        item that another id holds: its gate is the largest ratio (the other id's gated
        distance over the distance to this prototype) over the reservoir items of other
        ids, times the ``(1 + margin)²`` safety factor. Returns the reservoir's squared
        distances to all prototypes ``[R, 2K]`` for reuse.
        """
        if len(res) == 0:
            return None
        k = self.centres_.shape[0]
        both = squared_distances(res, torch.cat([self.centres_, self.memory_]))
        held = self._gated(both[:, :k], both[:, k:])
        held = held.gather(1, assigned[:, None])  # [R, 1] distance to the id each item holds
        ratio = held / both[:, :k].clamp_min(1e-12)
        ratio.scatter_(1, assigned[:, None], 0.0)
        floor = torch.where(self.spawned_, (1.0 + self.margin) ** 2, 1.0)
        self.gate_cur_ = torch.maximum(ratio.max(0).values * (1.0 + self.margin) ** 2, floor)
        return both

    @torch.no_grad()
    def _assign_reusing(self, res: torch.Tensor, both: torch.Tensor | None, k_old: int) -> torch.Tensor:
        """``_assign(res)`` from distances to the first ``k_old`` clusters' prototypes
        computed earlier, adding only the clusters created since."""
        if both is None:
            return self._assign(res)
        k = self.centres_.shape[0]
        cur, mem = both[:, :k_old], both[:, k_old:]
        if k > k_old:
            extra = squared_distances(res, torch.cat([self.centres_[k_old:], self.memory_[k_old:]]))
            cur = torch.cat([cur, extra[:, : k - k_old]], 1)
            mem = torch.cat([mem, extra[:, k - k_old :]], 1)
        return self._gated(cur, mem).argmin(1)

    @torch.no_grad()
    def _centre_mean_step(self, z: torch.Tensor, assigned: torch.Tensor) -> int:
        """Online-EWC step of a k-means (Gaussian) likelihood: a precision-weighted mean.

        With the old centre as prior, each item of evidence weighing the same and the
        running evidence count e_j (decayed by ``fisher_decay``) as the prior's Fisher,
        the MAP centre is μ_j + η_j (m_j - μ_j), η_j = n_j / (n_j + ewc_lambda · e_j),
        where m_j is the mean of the n_j batch items given to id j. A drifting class is
        followed within a few batches; a few stray items barely move a centre. Returns 1.
        """
        k = self.centres_.shape[0]
        counts = torch.bincount(assigned, minlength=k).to(z.dtype)
        sums = torch.zeros_like(self.centres_).index_add_(0, assigned, z)
        eta = counts / (counts + self.ewc_lambda * self.evidence_[:k]).clamp_min(1e-12)
        target = sums / counts.clamp_min(1)[:, None]
        self.centres_ = self.centres_ + eta[:, None] * (target - self.centres_)
        return 1

    def _centre_steps(self, z_in: torch.Tensor, res: torch.Tensor, rng: np.random.Generator, deadline: float) -> tuple[int, bool]:
        """DEC steps on the current prototypes under EWC and distillation; returns (steps, budget hit).

        The target P is fixed for the whole update (DEC recomputes it only every
        ``update_interval`` steps too) and built with the running cluster frequencies.
        Gradients are closed-form (:func:`kl_centre_gradient`). The optimiser is Adam
        with moments kept across updates (and in checkpoints): a fresh Adam would take
        full-size steps on pure gradient noise at every batch, so centres would jitter.
        """
        if self.online_steps == 0 or z_in.shape[0] == 0:
            return 0, False
        with torch.no_grad():
            p = target_distribution(soft_assignment(squared_distances(z_in, self.centres_), self.alpha), self.freq_)
            rehearse = res[torch.from_numpy(rng.choice(len(res), size=min(len(res), 256), replace=False)).to(res.device)]
            q_old = soft_assignment(squared_distances(rehearse, self.centres_), self.alpha)
            mu = self.centres_.clone()
            lr, b1, b2, eps = self.online_lr * self.latent_scale_, 0.9, 0.999, 1e-8
            steps, exhausted = 0, False
            order = torch.from_numpy(rng.permutation(z_in.shape[0])).to(z_in.device)
            for step in range(self.online_steps):
                if time.perf_counter() > deadline:
                    exhausted = True
                    break
                rows = order[torch.arange(step * _STEP_ROWS, (step + 1) * _STEP_ROWS, device=z_in.device) % len(order)]
                grad = kl_centre_gradient(z_in[rows], mu, p[rows], self.alpha)
                grad += self.ewc_lambda * self.fisher_ * (mu - self.ewc_anchor_)
                if self.distill_weight > 0 and len(rehearse):
                    grad += self.distill_weight * kl_centre_gradient(rehearse, mu, q_old, self.alpha)
                self.adam_t_ += 1
                self.adam_m_.mul_(b1).add_(grad, alpha=1 - b1)
                self.adam_v_.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m_hat = self.adam_m_ / (1 - b1 ** self.adam_t_)[:, None]
                v_hat = self.adam_v_ / (1 - b2 ** self.adam_t_)[:, None]
                mu -= lr * m_hat / (v_hat.sqrt() + eps)
                steps += 1
            self.centres_ = mu
        return steps, exhausted

    def _maybe_spawn(self, rng: np.random.Generator, res: torch.Tensor, res_both: torch.Tensor | None) -> list[np.ndarray]:
        """Turn groups of the recent window that old clusters do not explain into new clusters.

        Proposals come from ``spawn_rule`` (:mod:`stream_dec.online.novelty`). Each one
        gets its own predict-time gate (the factor its squared distance is inflated by),
        calibrated on the reservoir so that it would take at most ``new_cluster_churn``
        of the remembered items (never below ``(1+margin)²``). It is accepted only if,
        behind that gate, it still captures ``min_support`` window items from at least
        two batches, as compactly as the fitted clusters (a duplicate of an old cluster
        fails: its calibrated gate leaves it nothing). Returns the captured window rows of each new cluster.
        """
        room = self.max_clusters_ - self.n_clusters_
        buf = self.buffer_
        # Try when the window has turned over by a quarter (and at least min_support).
        if room <= 0 or len(buf) < 2 * self.min_support_ or buf.added_since_try < max(self.min_support_, len(buf) // 4):
            return []
        buf.added_since_try = 0
        dev = self.centres_.device
        zw = torch.from_numpy(buf.z).to(dev)
        d_win = self._distances(zw)[1].min(1).values
        seed = int(rng.integers(2**31))
        gen = torch.Generator().manual_seed(seed)
        max_new = min(room, 8)
        # Proposals only need the window's shape: a sample bounds their cost.
        sub = torch.randperm(len(zw), generator=gen)[:_PROPOSAL_SAMPLE].to(dev)
        if self.spawn_rule == "refit":
            proposals = propose_refit(zw[sub], self.centres_, max_new=max_new, generator=gen)
        elif self.spawn_rule == "anchored":
            proposals = propose_anchored(
                zw[sub], d_win[sub], min_support=max(2, self.min_support_ * len(sub) // len(zw)), max_new=max_new,
                generator=gen, gate=(1.0 + self.margin) ** 2,
            )
        else:
            rows = np.flatnonzero(buf.unexplained)
            protos = torch.cat([self.centres_, self.memory_]).cpu().numpy()
            radii = torch.cat([self.radius_, self.radius_]).cpu().numpy()
            cands = find_new_clusters(
                buf.z[rows], buf.born[rows], existing=protos, existing_radius=radii, min_support=self.min_support_,
                max_cohesion=self.cohesion_, min_separation=self.separation_, radius_quantile=self.novelty_quantile,
                max_new=max_new, seed=seed,
            )
            proposals = [torch.from_numpy(c.centre).to(dev) for c in cands]
        d_res_old = None
        if len(res):
            k = self.centres_.shape[0]
            if res_both is None:
                res_both = squared_distances(res, torch.cat([self.centres_, self.memory_]))
            d_res_old = self._gated(res_both[:, :k], res_both[:, k:]).min(1).values
        base_radius = float(torch.quantile(self.radius_[~self.spawned_], 0.25))
        captured_rows = []
        for c in proposals:
            if self.n_clusters_ >= self.max_clusters_:
                break
            # Gated Lloyd: re-centre on what the cluster captures behind its gate and
            # re-calibrate the gate; the centre leaves the old clusters' fringe for the
            # core of the new group, so the gate it needs shrinks.
            for it in range(self.spawn_refine_iters + 1):
                gate = self._calibrate_gate(c, res, d_res_old)
                d_c = squared_distances(zw, c[None, :]).squeeze(1)
                captured = d_c * gate < d_win
                if int(captured.sum()) < 3 or it == self.spawn_refine_iters:
                    break
                c_next = zw[captured].mean(0)
                if torch.allclose(c_next, c):
                    break
                c = c_next
            n_cap = int(captured.sum())
            if n_cap < self.min_support_ or np.unique(buf.born[captured.cpu().numpy()]).size < 2:
                continue  # support and persistence
            if float(d_c[captured].mean()) > self.cohesion_:
                continue  # cohesion
            self._add_cluster(c, gate, max(float(torch.quantile(d_c[captured], self.novelty_quantile)), base_radius), n_cap)
            captured_rows.append(np.flatnonzero(captured.cpu().numpy()))
            d_win = torch.minimum(d_win, d_c * gate)
        return captured_rows

    def _calibrate_gate(self, c: torch.Tensor, res: torch.Tensor, d_res_old: torch.Tensor | None) -> float:
        """Gate at which centre ``c`` takes at most ``new_cluster_churn`` of the reservoir.

        Never below ``(1 + margin)²``: the calibration sees only a sample of what the
        model labelled, and the margin covers the items it did not see.
        """
        gate = (1.0 + self.margin) ** 2
        if d_res_old is not None:
            ratio = d_res_old / squared_distances(res, c[None, :]).squeeze(1).clamp_min(1e-12)
            gate = max(gate, float(torch.quantile(ratio, 1.0 - self.new_cluster_churn)))
        return gate

    def _add_cluster(self, centre: torch.Tensor, gate: float, radius: float, evidence: int) -> None:
        """Append a cluster with a fresh id (ids are never reused)."""
        dev = self.centres_.device
        c = centre.reshape(1, -1).to(dev)
        self.centres_ = torch.cat([self.centres_, c])
        self.memory_ = torch.cat([self.memory_, c.clone()])
        self.ewc_anchor_ = torch.cat([self.ewc_anchor_, c.clone()])
        self.spawned_ = torch.cat([self.spawned_, torch.ones(1, dtype=torch.bool, device=dev)])
        self.gate_ = torch.cat([self.gate_, torch.tensor([gate], device=dev)])
        self.gate_cur_ = torch.cat([self.gate_cur_, torch.tensor([gate], device=dev)])
        self.adam_m_ = torch.cat([self.adam_m_, torch.zeros_like(c)])
        self.adam_v_ = torch.cat([self.adam_v_, torch.zeros_like(c)])
        self.adam_t_ = torch.cat([self.adam_t_, torch.zeros(1, device=dev)])
        self.evidence_ = torch.cat([self.evidence_, torch.tensor([float(evidence)], device=dev)])
        self.radius_ = torch.cat([self.radius_, torch.tensor([radius], device=dev)])
        self.cluster_ids_ = np.append(self.cluster_ids_, np.int64(self.next_id_))
        self.next_id_ += 1

    def _drop_cluster(self, j: int) -> None:
        """Undo a spawn made in this update (its id was never published, so it is not reused)."""
        keep = torch.ones(self.centres_.shape[0], dtype=torch.bool, device=self.centres_.device)
        keep[j] = False
        for name in ("centres_", "memory_", "ewc_anchor_", "spawned_", "gate_", "gate_cur_", "radius_", "adam_m_", "adam_v_", "adam_t_", "evidence_"):
            setattr(self, name, getattr(self, name)[keep])
        self.cluster_ids_ = np.delete(self.cluster_ids_, j)

    # ------------------------------------------------------------------ persistence
    def _state(self, extra: dict | None) -> dict:
        self._check_fitted()
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
        return {
            "format": FORMAT_VERSION,
            "params": params,
            "autoencoder": {k: cpu(v) for k, v in self.autoencoder_.state_dict().items()},
            "autoencoder_dims": list(self.autoencoder_.dims),
            "tensors": {
                name: cpu(getattr(self, name))
                for name in _TENSOR_STATE
            },
            "cluster_ids": torch.from_numpy(self.cluster_ids_.copy()),
            "scalars": {
                name: getattr(self, name)
                for name in ("seed_", "n_features_in_", "scale_", "next_id_", "version_", "cohesion_", "separation_", "latent_scale_", "min_support_", "max_clusters_", "n_seen_")
            },
            "reservoir": {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in self.reservoir_.state().items()},
            "buffer": {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in self.buffer_.state().items()},
            "extra": dict(extra or {}),
        }

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
        self._check_fitted()
        return ckpt.encode(self._state(extra))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "StreamDEC":
        """Load a checkpoint file, or the newest valid one of a directory.

        Raises :class:`stream_dec.checkpoint.CheckpointError` (a ``ValueError``) when no
        usable checkpoint exists; never returns a half-loaded model.
        """
        state, source = ckpt.load_any(path)
        try:
            return cls._from_state(state, device, source)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ckpt.CheckpointError(f"{source} is incomplete or inconsistent: {exc}") from None

    @classmethod
    def _from_state(cls, state: dict, device: str | None, source: Path) -> "StreamDEC":
        if state.get("format") != FORMAT_VERSION:
            raise ckpt.CheckpointError(f"{source} has format {state.get('format')!r}, expected {FORMAT_VERSION}")
        params = dict(state["params"])
        params["hidden_dims"] = tuple(params["hidden_dims"])
        if device is not None:
            params["device"] = device
        m = cls(**params)
        dev = _resolve_device(m.device)
        sc = state["scalars"]
        ae = Autoencoder(int(sc["n_features_in_"]), m.hidden_dims, int(state["autoencoder_dims"][-1]))
        ae.load_state_dict(state["autoencoder"])
        ae.to(dev).eval()
        for p in ae.parameters():
            p.requires_grad_(False)
        m.autoencoder_ = ae
        m.device_ = dev
        missing = set(_TENSOR_STATE) - set(state["tensors"])
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")
        for name in _TENSOR_STATE:
            setattr(m, name, state["tensors"][name].to(dev))
        for name, v in sc.items():
            setattr(m, name, v)
        m.cluster_ids_ = state["cluster_ids"].numpy().astype(np.int64)
        np_state = lambda d: {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}  # noqa: E731
        m.reservoir_ = Reservoir.from_state(np_state(state["reservoir"]))
        m.buffer_ = NoveltyBuffer.from_state(np_state(state["buffer"]))
        m.checkpoint_extra_ = dict(state.get("extra", {}))
        m.checkpoint_path_ = source
        k = m.centres_.shape[0]
        if any(getattr(m, n).shape[0] != k for n in _TENSOR_STATE if n != "mean_") or len(m.cluster_ids_) != k:
            raise ValueError("per-cluster arrays disagree in length")
        return m

    def summary(self) -> dict[str, Any]:
        """Plain-data description of the fitted model (used by ``stream-dec inspect``)."""
        self._check_fitted()
        return {
            "model_version": int(self.version_),
            "n_features_in": int(self.n_features_in_),
            "latent_dim": int(self.autoencoder_.dims[-1]),
            "autoencoder": list(self.autoencoder_.dims),
            "n_clusters": self.n_clusters_,
            "cluster_ids": [int(i) for i in self.cluster_ids_],
            "spawned_ids": [int(i) for i, s in zip(self.cluster_ids_, self.spawned_.cpu().numpy()) if s],
            "next_id": int(self.next_id_),
            "max_clusters": int(self.max_clusters_),
            "min_support": int(self.min_support_),
            "items_seen": int(self.n_seen_),
            "reservoir": len(self.reservoir_),
            "novelty_buffer": len(self.buffer_),
            "fisher_mean": float(self.fisher_.mean()),
            "seed": int(self.seed_),
            "device": str(self.device_),
        }

"""The stream protocol of DESIGN.md section 5: seeded splits and the two scenario runners.

Pure functions: nothing here prints or writes files. Labels are used only to build the
splits and to score; models see labels only through an optional ``observe_labels(y)``
method, which only the label-knowing oracles in ``bench/baselines.py`` define.

Ambiguities in the brief and how they are resolved here:

* Per-class shares: each class's items are permuted (seeded) and cut at
  ``round(0.5 n)`` (BASE) and ``round(0.5 n) + round(0.2 n)`` (REF); the rest is stream.
* Number of base classes: ``round(0.6 K)`` (stackoverflow 12 of 20, banking77 46 of 77,
  mnist_test 6 of 10), chosen with ``rng.choice`` without replacement.
* "Spread over the batches": a class's stream items (already in random order) are cut
  into equal consecutive chunks with ``np.array_split``, one per batch from its start
  batch to the last, so every batch holds about the same number of that class's items.
  A novel class's start batch is ``rng.integers(0, T // 2)``, i.e. one of 0 .. T/2-1.
* RNG order (one ``np.random.default_rng(seed)`` per split): base-class choice, the
  per-class permutations in class order, novel start batches, then within-batch
  shuffles; the drift split then draws the sideways directions in class order.
* Drift: class means are plain means of the BASE items (not re-normalised); nearest
  other class is by Euclidean distance between these means; ``u_perp`` is a Gaussian
  draw with its component along Delta removed, scaled to unit length. Rows count as
  unit-norm when every norm is within 1e-2 of 1 (text sets yes, mnist_test no); then
  each drifted item is divided by its own norm.
* Batch t runs 0 .. T-1, so batch 0 is undrifted and batch T-1 carries the full shift.
* Home ids: Hungarian matching on the contingency of REF labels vs predicted ids right
  after ``fit``; an item whose class has no matched id counts as not tracked.
* Cluster count: distinct ids predicted by the final model over BASE + REF + stream.
* ``n_clusters_model``: ``len(model.cluster_ids_)`` if present, else ``model.n_clusters_``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

# The harness measures the code of this checkout, so its root comes first on the path.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from stream_dec.evaluation import metrics  # noqa: E402

BASE_CLASS_SHARE = 0.6
BASE_SHARE = 0.5
REF_SHARE = 0.2
DRIFT_F = 0.6
TRACKING_LAST = 5
UNIT_NORM_TOL = 1e-2

ModelFactory = Callable[[int, int], Any]


@dataclass
class StreamSplit:
    """Index arrays of one seeded split: BASE, REF and the T stream micro-batches."""

    base: np.ndarray
    ref: np.ndarray
    batches: list[np.ndarray]
    base_classes: np.ndarray
    novel_classes: np.ndarray

    @property
    def stream(self) -> np.ndarray:
        """All stream indices, batch after batch."""
        return np.concatenate(self.batches)


@dataclass
class DriftSplit(StreamSplit):
    """A gradual-drift split plus the drifted stream batches and their labels."""

    X_batches: list[np.ndarray] = field(default_factory=list)
    y_batches: list[np.ndarray] = field(default_factory=list)
    neighbour: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    shifts: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))


def _partition_class(idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = rng.permutation(idx)
    n_base = int(round(BASE_SHARE * len(idx)))
    n_ref = int(round(REF_SHARE * len(idx)))
    return idx[:n_base], idx[n_base : n_base + n_ref], idx[n_base + n_ref :]


def _spread(items: np.ndarray, first: int, parts: list[list[np.ndarray]]) -> None:
    T = len(parts)
    for t, chunk in zip(range(first, T), np.array_split(items, T - first)):
        parts[t].append(chunk)


def _build_split(
    y: np.ndarray, rng: np.random.Generator, base_classes: np.ndarray, T: int
) -> StreamSplit:
    if T < 2:
        raise ValueError(f"T must be at least 2, got {T}")
    classes = np.unique(y)
    novel_classes = np.setdiff1d(classes, base_classes)
    parts: list[list[np.ndarray]] = [[] for _ in range(T)]
    base, ref = [], []
    for c in base_classes:
        b, r, s = _partition_class(np.flatnonzero(y == c), rng)
        base.append(b)
        ref.append(r)
        _spread(s, 0, parts)
    for c in novel_classes:
        _spread(rng.permutation(np.flatnonzero(y == c)), int(rng.integers(0, T // 2)), parts)
    empty = np.empty(0, dtype=np.int64)
    batches = [rng.permutation(np.concatenate(p)) if p else empty for p in parts]
    # Sorted indices keep the data file's own (already random) row order for fit.
    return StreamSplit(
        base=np.sort(np.concatenate(base)),
        ref=np.sort(np.concatenate(ref)),
        batches=batches,
        base_classes=np.asarray(base_classes),
        novel_classes=novel_classes,
    )


def class_incremental_split(y: np.ndarray, seed: int, T: int = 20) -> StreamSplit:
    """Seeded class-incremental split: 60% base classes, novel classes enter mid-stream."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    n_base = int(round(BASE_CLASS_SHARE * len(classes)))
    base_classes = np.sort(rng.choice(classes, n_base, replace=False))
    return _build_split(y, rng, base_classes, T)


def gradual_drift_split(X: np.ndarray, y: np.ndarray, seed: int, T: int = 20, f: float = DRIFT_F) -> DriftSplit:
    """Seeded split with all classes base; stream items of class c drift toward its nearest class."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    split = _build_split(y, rng, classes, T)

    yb = y[split.base]
    means = np.stack([X[split.base[yb == c]].mean(axis=0) for c in classes]).astype(np.float64)
    dist = cdist(means, means)
    np.fill_diagonal(dist, np.inf)
    neighbour = dist.argmin(axis=1)
    shifts = np.empty_like(means)
    for i in range(len(classes)):
        delta = means[neighbour[i]] - means[i]
        # The sideways part keeps mutual neighbours from swapping onto each other's old items.
        u = rng.standard_normal(means.shape[1])
        u -= (u @ delta) / (delta @ delta) * delta
        u /= np.linalg.norm(u)
        shifts[i] = f * delta + np.linalg.norm(delta) * u

    unit_norm = bool(np.all(np.abs(np.linalg.norm(X, axis=1) - 1.0) < UNIT_NORM_TOL))
    X_batches, y_batches = [], []
    for t, idx in enumerate(split.batches):
        pos = np.searchsorted(classes, y[idx])
        Xt = X[idx].astype(np.float64) + (t / (T - 1)) * shifts[pos]
        if unit_norm:
            Xt /= np.linalg.norm(Xt, axis=1, keepdims=True)
        X_batches.append(Xt.astype(np.float32))
        y_batches.append(y[idx])

    return DriftSplit(
        **vars(split),
        X_batches=X_batches,
        y_batches=y_batches,
        neighbour=classes[neighbour],
        shifts=shifts.astype(np.float32),
    )


def match_classes_to_ids(y_true: np.ndarray, ids: np.ndarray) -> dict[Any, Any]:
    """One-to-one Hungarian matching class -> cluster id maximising shared items."""
    classes, t = np.unique(np.asarray(y_true), return_inverse=True)
    uids, p = np.unique(np.asarray(ids), return_inverse=True)
    cont = np.zeros((len(classes), len(uids)), dtype=np.int64)
    np.add.at(cont, (t, p), 1)
    rows, cols = linear_sum_assignment(-cont)
    return {classes[r].item(): uids[c].item() for r, c in zip(rows, cols)}


def _feed_labels(model: Any, y: np.ndarray) -> None:
    # Only oracles define observe_labels; real estimators never see labels.
    if hasattr(model, "observe_labels"):
        model.observe_labels(y)


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _model_cluster_count(model: Any) -> int | None:
    ids = getattr(model, "cluster_ids_", None)
    if ids is not None:
        return int(len(ids))
    n = getattr(model, "n_clusters_", None)
    return None if n is None else int(n)


def _fit(
    make_model: ModelFactory, n_clusters: int, seed: int, X_base: np.ndarray, y_base: np.ndarray, X_ref: np.ndarray
) -> tuple[Any, float, np.ndarray]:
    """Build and fit a model on BASE; return it, the fit time and its REF ids right after fit."""
    model = make_model(n_clusters, seed)
    _feed_labels(model, y_base)
    fit_s = _timed(model.fit, X_base)
    return model, fit_s, np.asarray(model.predict(X_ref))


def _stream(
    model: Any,
    ref_ids0: np.ndarray,
    X_ref: np.ndarray,
    X_batches: list[np.ndarray],
    y_batches: list[np.ndarray],
    on_update: Callable[[Any, int], None] | None = None,
) -> dict[str, Any]:
    """partial_fit batch by batch, recording REF churn and update times."""
    churns, times = [], []
    for t, (Xb, yb) in enumerate(zip(X_batches, y_batches)):
        _feed_labels(model, yb)
        times.append(_timed(model.partial_fit, Xb))
        churns.append(metrics.churn(ref_ids0, np.asarray(model.predict(X_ref))))
        if on_update is not None:
            on_update(model, t)
    ms = 1000.0 * np.asarray(times)
    return {
        "churn_final": churns[-1],
        "churn_max": float(max(churns)),
        "churn_curve": churns,
        "pf_ms_p50": float(np.median(ms)),
        "pf_ms_p95": float(np.percentile(ms, 95)),
        "pf_ms_max": float(ms.max()),
        "n_clusters_model": _model_cluster_count(model),
    }


def _scores(prefix: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {f"{k}_{prefix}": v for k, v in metrics.score_all(y_true, y_pred).items()}


def run_class_incremental(make_model: ModelFactory, X: np.ndarray, y: np.ndarray, seed: int, T: int = 20) -> dict[str, Any]:
    """Run the class-incremental scenario for one model and seed; return its scores."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    split = class_incremental_split(y, seed, T)
    X_ref = X[split.ref]
    model, fit_s, ref_ids0 = _fit(make_model, len(split.base_classes), seed, X[split.base], y[split.base], X_ref)
    stats = _stream(model, ref_ids0, X_ref, [X[b] for b in split.batches], [y[b] for b in split.batches])
    stream = split.stream
    pred_stream = np.asarray(model.predict(X[stream]))
    pred_ref = np.asarray(model.predict(X_ref))
    pred_base = np.asarray(model.predict(X[split.base]))
    novel = np.isin(y[stream], split.novel_classes)
    return {
        "fit_s": fit_s,
        **stats,
        **_scores("all", y[stream], pred_stream),
        **_scores("new", y[stream][novel], pred_stream[novel]),
        **_scores("ref", y[split.ref], pred_ref),
        "clusters": int(len(np.unique(np.concatenate([pred_base, pred_ref, pred_stream])))),
        "n_base_classes": int(len(split.base_classes)),
        "n_novel_classes": int(len(split.novel_classes)),
        "n_base": int(len(split.base)),
        "n_ref": int(len(split.ref)),
        "n_stream": int(len(stream)),
    }


def run_gradual_drift(
    make_model: ModelFactory, X: np.ndarray, y: np.ndarray, seed: int, T: int = 20, f: float = DRIFT_F
) -> dict[str, Any]:
    """Run the gradual-drift scenario for one model and seed; return tracking and churn."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    split = gradual_drift_split(X, y, seed, T, f)
    classes = np.unique(y)
    X_ref, y_ref = X[split.ref], y[split.ref]
    model, fit_s, ref_ids0 = _fit(make_model, len(classes), seed, X[split.base], y[split.base], X_ref)

    home = match_classes_to_ids(y_ref, ref_ids0)
    has_home = np.array([c.item() in home for c in classes])
    # Unmatched classes get a placeholder id; has_home masks them out as not tracked.
    home_ids = np.array([home.get(c.item(), 0) for c in classes], dtype=np.int64)
    tracking: list[float] = []

    def track(m: Any, t: int) -> None:
        pos = np.searchsorted(classes, split.y_batches[t])
        pred = np.asarray(m.predict(split.X_batches[t]))
        tracking.append(float(np.mean(has_home[pos] & (home_ids[pos] == pred))))

    stats = _stream(model, ref_ids0, X_ref, split.X_batches, split.y_batches, on_update=track)
    return {
        "fit_s": fit_s,
        **stats,
        "tracking": float(np.mean(tracking[-TRACKING_LAST:])),
        "tracking_curve": tracking,
        "matched_classes": int(has_home.sum()),
        **_scores("ref", y_ref, np.asarray(model.predict(X_ref))),
        "n_classes": int(len(classes)),
        "n_base": int(len(split.base)),
        "n_ref": int(len(split.ref)),
        "n_stream": int(len(split.stream)),
    }

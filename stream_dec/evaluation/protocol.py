"""Seeded splits of the stream protocol that measures quality (docs/quality-protocol.md).

One implementation for ``stream-dec demo`` and the quality benchmark (``bench/protocol.py``
runs the scenarios on these splits), so both stream a data set the same way. Labels
are used only to build a split; the model never sees them.

How the protocol's rules are made exact:

* Per-class shares: each class's items are permuted (seeded) and cut at
  ``round(0.5 n)`` (BASE) and ``round(0.5 n) + round(0.2 n)`` (REF); the rest is stream.
* Number of base classes: ``round(0.6 K)`` (12 of 20, 46 of 77, 6 of 10), chosen with
  ``rng.choice`` without replacement.
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
  unit-norm when every norm is within 1e-2 of 1; then each drifted item is divided by
  its own norm.
* Batch t runs 0 .. T-1, so batch 0 is undrifted and batch T-1 carries the full shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import cdist

BASE_CLASS_SHARE = 0.6
BASE_SHARE = 0.5
REF_SHARE = 0.2
DRIFT_F = 0.6
UNIT_NORM_TOL = 1e-2
#: The protocol's T: micro-batches of the stream.
SEGMENTS = 20


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


def _build_split(y: np.ndarray, rng: np.random.Generator, base_classes: np.ndarray, T: int) -> StreamSplit:
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


def class_incremental_split(y: np.ndarray, seed: int, T: int = SEGMENTS) -> StreamSplit:
    """Seeded class-incremental split: 60% base classes, novel classes enter mid-stream.

    >>> s = class_incremental_split(np.repeat(np.arange(5), 10), seed=0, T=4)
    >>> len(s.base_classes), len(s.novel_classes), len(s.base), len(s.ref), len(s.stream)
    (3, 2, 15, 6, 29)
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    n_base = int(round(BASE_CLASS_SHARE * len(classes)))
    base_classes = np.sort(rng.choice(classes, n_base, replace=False))
    return _build_split(y, rng, base_classes, T)


def gradual_drift_split(X: np.ndarray, y: np.ndarray, seed: int, T: int = SEGMENTS, f: float = DRIFT_F) -> DriftSplit:
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

"""Buffered novelty detection: new clusters are made from evidence, not from outliers.

Items that no existing cluster explains wait in a bounded buffer. A new cluster is
only created when a group in the buffer is (a) big enough (minimum support), (b) as
compact as the clusters the model already has (cohesion, relative to the data), (c)
persistent (its members arrived in at least two different batches) and (d) not just
the fringe of an existing cluster. Everything is relative to statistics of the data
the model has seen, never an absolute distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score


@dataclass
class SpawnCandidate:
    """A group accepted as a new cluster."""

    centre: np.ndarray
    members: np.ndarray  # row indices into the buffer
    radius: float  # squared-distance quantile of the members


class NoveltyBuffer:
    """Bounded FIFO of unexplained latents with the batch (model version) they came in."""

    def __init__(self, capacity: int, dim: int, ttl: int):
        self.capacity = int(capacity)
        self.ttl = int(ttl)
        self.z = np.zeros((0, dim), dtype=np.float32)
        self.born = np.zeros(0, dtype=np.int64)
        self.added_since_try = 0

    def __len__(self) -> int:
        return self.z.shape[0]

    def add(self, z: np.ndarray, version: int) -> None:
        """Append rows; drop the oldest beyond capacity and everything older than ``ttl`` batches."""
        self.z = np.concatenate([self.z, z.astype(np.float32)])
        self.born = np.concatenate([self.born, np.full(z.shape[0], version, dtype=np.int64)])
        self.added_since_try += z.shape[0]
        idx = np.flatnonzero(self.born > version - self.ttl)[-self.capacity :]
        self.z, self.born = self.z[idx], self.born[idx]

    def remove(self, rows: np.ndarray) -> None:
        """Forget the given rows (they became a cluster)."""
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self.z, self.born = self.z[keep], self.born[keep]

    def state(self) -> dict:
        """Plain-data state for checkpoints."""
        return {
            "capacity": self.capacity,
            "ttl": self.ttl,
            "z": self.z.copy(),
            "born": self.born.copy(),
            "added_since_try": self.added_since_try,
        }

    @classmethod
    def from_state(cls, state: dict) -> "NoveltyBuffer":
        """Rebuild from :meth:`state`."""
        z = np.asarray(state["z"], dtype=np.float32)
        b = cls(int(state["capacity"]), z.shape[1], int(state["ttl"]))
        b.z, b.born = z.copy(), np.asarray(state["born"], dtype=np.int64).copy()
        b.added_since_try = int(state["added_since_try"])
        return b


def find_new_clusters(
    z: np.ndarray,
    born: np.ndarray,
    *,
    existing: np.ndarray,
    existing_radius: np.ndarray,
    min_support: int,
    max_cohesion: float,
    radius_quantile: float,
    max_new: int,
    seed: int,
) -> list[SpawnCandidate]:
    """Find dense, persistent groups in buffered latents ``z``.

    ``existing`` are the current prototypes [m, d] with squared radii ``existing_radius``;
    ``max_cohesion`` is the largest mean squared distance to its own centre that a group
    may have (derived from the model's clusters by the caller). The number of groups
    is chosen by silhouette over k = 1..kmax, k = 1 standing in when no split helps.
    """
    n = z.shape[0]
    kmax = min(max_new, n // min_support)
    if kmax < 1:
        return []
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(n, 1500), replace=False)
    best_labels, best_score = np.zeros(n, dtype=np.int64), -np.inf
    best_centres = z.mean(0, keepdims=True)
    for k in range(2, kmax + 1):
        km = KMeans(n_clusters=k, n_init=2, random_state=seed, max_iter=100).fit(z)
        if len(np.unique(km.labels_[sample])) < 2:
            continue
        s = silhouette_score(z[sample], km.labels_[sample])
        if s > best_score:
            best_labels, best_score, best_centres = km.labels_, s, km.cluster_centers_
    out: list[SpawnCandidate] = []
    for g in range(best_centres.shape[0]):
        members = np.flatnonzero(best_labels == g)
        if members.size < min_support or np.unique(born[members]).size < 2:
            continue
        zc = z[members]
        # Trim the group to its compact core: members beyond the cohesion bound are
        # probably noise that k-means attached, and they would bias the centre.
        centre = zc.mean(0)
        for _ in range(3):
            d2 = ((zc - centre) ** 2).sum(1)
            core = d2 <= np.quantile(d2, 0.8) if members.size > min_support else np.ones_like(d2, bool)
            centre = zc[core].mean(0)
        d2 = ((zc - centre) ** 2).sum(1)
        core = d2 <= 2.0 * max_cohesion
        if core.sum() < min_support or float(d2[core].mean()) > max_cohesion:
            continue
        # (d) a real new group sits outside the radius of the cluster nearest to it.
        d2_exist = ((existing - centre) ** 2).sum(1)
        j = int(np.argmin(d2_exist))
        if d2_exist[j] <= existing_radius[j]:
            continue
        out.append(
            SpawnCandidate(
                centre=centre.astype(np.float32),
                members=members[core],
                radius=float(np.quantile(d2[core], radius_quantile)),
            )
        )
    return out

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
import torch

from stream_dec.model.kmeans import kmeans_pp, silhouette


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
    min_separation: float,
    radius_quantile: float,
    max_new: int,
    seed: int,
) -> list[SpawnCandidate]:
    """Find dense, persistent groups in buffered latents ``z``.

    ``existing`` are the current prototypes [m, d] with squared radii ``existing_radius``;
    ``max_cohesion`` is the largest mean squared distance to its own centre that a group
    may have, and groups whose centres are closer than ``min_separation`` (squared) are
    one group; both come from the model's own clusters. The partition is the k-means
    one with the best silhouette over k = 2..kmax; merging undoes over-splitting.
    """
    n = z.shape[0]
    kmax = min(max_new + 1, n // min_support)
    if kmax < 2:
        return []
    gen = torch.Generator().manual_seed(seed)
    zt = torch.from_numpy(z)
    sample = torch.randperm(n, generator=gen)[:800]
    best_labels, best_score = None, -np.inf
    for k in range(2, kmax + 1):
        labels, _ = kmeans_pp(zt, k, gen)
        if len(torch.unique(labels[sample])) < 2:
            continue
        score = silhouette(zt[sample], torch.unique(labels[sample], return_inverse=True)[1])
        if score > best_score:
            best_labels, best_score = labels.numpy(), score
    if best_labels is None:
        return []
    groups = [_core(z, np.flatnonzero(best_labels == g), min_support) for g in np.unique(best_labels)]
    groups = _merge_close(z, [g for g in groups if g.size >= min_support], min_separation, min_support)
    out: list[SpawnCandidate] = []
    for members in groups:
        if members.size < min_support or np.unique(born[members]).size < 2:
            continue  # (a) support, (c) persistence
        centre = z[members].mean(0)
        d2 = ((z[members] - centre) ** 2).sum(1)
        if float(d2.mean()) > max_cohesion:
            continue  # (b) cohesion
        d2_exist = ((existing - centre) ** 2).sum(1)
        j = int(np.argmin(d2_exist))
        if d2_exist[j] <= existing_radius[j]:
            continue  # (d) only the fringe of an existing cluster
        out.append(SpawnCandidate(centre.astype(np.float32), members, float(np.quantile(d2, radius_quantile))))
    return out[:max_new]


def _core(z: np.ndarray, members: np.ndarray, min_support: int) -> np.ndarray:
    """Trim a k-means group to its compact core (the closest 80%, re-centred a few times).

    k-means attaches stray noise to every group; left in, it biases the centre outward.
    """
    if members.size <= min_support:
        return members
    core = members
    for _ in range(3):
        centre = z[core].mean(0)
        d2 = ((z[members] - centre) ** 2).sum(1)
        core = members[d2 <= np.quantile(d2, 0.8)]
    return core


def _merge_close(z: np.ndarray, groups: list[np.ndarray], min_separation: float, min_support: int) -> list[np.ndarray]:
    """Union groups whose centres are closer than the closest pair of real clusters."""
    groups = list(groups)
    merged = True
    while merged and len(groups) > 1:
        merged = False
        centres = np.stack([z[g].mean(0) for g in groups])
        d2 = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        a, b = np.unravel_index(np.argmin(d2), d2.shape)
        if d2[a, b] < min_separation:
            union = np.union1d(groups[a], groups[b])
            groups = [g for i, g in enumerate(groups) if i not in (a, b)] + [_core(z, union, min_support)]
            merged = True
    return groups

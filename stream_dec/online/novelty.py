"""Novelty detection from a window of recent latents: new clusters need evidence.

Three proposal rules (``StreamDEC(spawn_rule=...)``), all checked by the estimator's
acceptance tests afterwards (gate calibrated on remembered items, minimum support,
persistence over batches, cohesion):

* ``"anchored"`` (default): k-means over the whole recent window with the existing
  centres held fixed; new centres are added one at a time where the old ones leave the
  most mass unexplained. In high dimension a novel class mostly lies *inside* the
  radius of some old cluster (distances concentrate), so a per-item outlier test sees
  only its fringe; the anchored extension sees the whole group.
* ``"refit"``: k-means over the window seeded with the old centres plus greedy new
  seeds; the centres that started new are the proposals.
* ``"outliers"``: the classic recipe: k-means with k chosen by silhouette over the
  items that lie beyond every cluster's radius, kept when compact, persistent and
  outside existing radii.

Everything is relative to statistics of the data the model has seen, never an
absolute distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stream_dec.model.dec import squared_distances
from stream_dec.model.kmeans import greedy_seeds, kmeans_pp, lloyd, silhouette


@dataclass
class SpawnCandidate:
    """A group accepted as a new cluster."""

    centre: np.ndarray
    members: np.ndarray  # row indices into the buffer
    radius: float  # squared-distance quantile of the members


class NoveltyBuffer:
    """Bounded FIFO of recent latents, the id each was published with, the batch (model
    version) it came in and whether an existing cluster's radius explained it.

    Rows leave by age (``ttl`` batches), by capacity, or by becoming a new cluster;
    the estimator moves rows that leave by age or capacity into its reservoir: only
    then is their id settled.

    >>> import numpy as np
    >>> buf = NoveltyBuffer(capacity=6, dim=2, ttl=2)
    >>> for version in (1, 2, 3):
    ...     aged_z, aged_ids = buf.add(np.zeros((3, 2)), ids=[version] * 3, unexplained=[True, False, False], version=version)
    >>> len(buf), buf.born.tolist()  # batch 1 is older than ttl=2 batches
    (6, [2, 2, 2, 3, 3, 3])
    >>> aged_ids.tolist(), int(buf.unexplained.sum())
    ([1, 1, 1], 2)
    """

    _FIELDS = ("z", "ids", "born", "unexplained")

    def __init__(self, capacity: int, dim: int, ttl: int):
        self.capacity = int(capacity)
        self.ttl = int(ttl)
        self.z = np.zeros((0, dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self.born = np.zeros(0, dtype=np.int64)
        self.unexplained = np.zeros(0, dtype=bool)
        self.added_since_try = 0

    def __len__(self) -> int:
        return self.z.shape[0]

    def _keep(self, mask: np.ndarray) -> None:
        for f in self._FIELDS:
            setattr(self, f, getattr(self, f)[mask])

    def add(self, z: np.ndarray, ids: np.ndarray, unexplained: np.ndarray, version: int) -> tuple[np.ndarray, np.ndarray]:
        """Append rows; return ``(z, ids)`` of the rows that age out (``ttl``) or overflow."""
        self.z = np.concatenate([self.z, z.astype(np.float32)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.born = np.concatenate([self.born, np.full(z.shape[0], version, dtype=np.int64)])
        self.unexplained = np.concatenate([self.unexplained, np.asarray(unexplained, dtype=bool)])
        self.added_since_try += z.shape[0]
        keep = np.zeros(len(self), dtype=bool)
        keep[np.flatnonzero(self.born > version - self.ttl)[-self.capacity :]] = True
        out = (self.z[~keep], self.ids[~keep])
        self._keep(keep)
        return out

    def remove(self, rows: np.ndarray) -> None:
        """Forget the given rows (they became a cluster)."""
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self._keep(keep)

    def state(self) -> dict:
        """Plain-data state for checkpoints."""
        return {"capacity": self.capacity, "ttl": self.ttl, "added_since_try": self.added_since_try,
                **{f: getattr(self, f).copy() for f in self._FIELDS}}

    @classmethod
    def from_state(cls, state: dict) -> "NoveltyBuffer":
        """Rebuild from :meth:`state`."""
        z = np.asarray(state["z"], dtype=np.float32)
        b = cls(int(state["capacity"]), z.shape[1], int(state["ttl"]))
        b.z = z.copy()
        b.ids = np.asarray(state["ids"], dtype=np.int64).copy()
        b.born = np.asarray(state["born"], dtype=np.int64).copy()
        b.unexplained = np.asarray(state["unexplained"], dtype=bool).copy()
        b.added_since_try = int(state["added_since_try"])
        if not len(b.ids) == len(b.born) == len(b.unexplained) == len(b.z):
            raise ValueError("novelty buffer arrays disagree in length")
        return b


@torch.no_grad()
def propose_refit(
    z: torch.Tensor,
    old_centres: torch.Tensor,
    *,
    max_new: int,
    generator: torch.Generator,
    trials: int = 8,
    iters: int = 20,
) -> list[torch.Tensor]:
    """New centres from a k-means refit of the window seeded with the old centres.

    The old centres start where they are; ``max_new`` more are seeded greedily where
    the old ones leave the most squared distance (D² sampling, best of ``trials``).
    Lloyd then moves all of them; the centres that started new and still own items are
    the proposals. Seeding with the old centres keeps them on their clusters, so the
    new ones settle on the groups the old model does not cover.
    """
    k_old = old_centres.shape[0]
    centres = greedy_seeds(z, old_centres.clone(), max_new, generator, trials)
    labels, centres = lloyd(z, centres, iters)
    owned = torch.bincount(labels, minlength=centres.shape[0])
    return [centres[j] for j in range(k_old, centres.shape[0]) if int(owned[j]) > 0]


@torch.no_grad()
def propose_anchored(
    z: torch.Tensor,
    d_old: torch.Tensor,
    *,
    min_support: int,
    max_new: int,
    generator: torch.Generator,
    gate: float = 1.0,
    candidates: int = 96,
    iters: int = 10,
    max_failures: int = 1,
) -> list[torch.Tensor]:
    """New centres for window latents ``z`` with the old clusters held fixed.

    ``d_old`` [n] is each item's (gated) squared distance to its best existing cluster.
    A new centre at ``c`` owns the items with ``gate · d(z, c) < d_old``. Centres are
    added greedily. Seeds are the means of the ``min_support // 2`` nearest neighbours of
    ``candidates`` random window items: in high dimension a single point is a poor
    centre (its neighbours are ~2x as far from it as from their own mean), a local mean
    is not. The seed with the largest owned gain Σ (d_old - gate · d)₊ wins (an outlier
    gains only itself, a dense group a lot); gated Lloyd steps then move it to the mean
    of what it owns. A centre that ends up owning fewer than ``min_support`` items is
    discarded; the search stops after ``max_new`` centres or ``max_failures`` discards.
    """
    n = z.shape[0]
    cur = d_old.clone()
    out: list[torch.Tensor] = []
    k_nn = max(2, min(n, min_support // 2))
    failures = 0
    # A failed seed (a group too small once its centre settles) may end the search:
    # on a stationary stream every try ends in failures, and each extra round of
    # candidates costs as much as the first. One round of 96 candidates finds a group
    # holding 3% of the window with probability 1 - .97**96 = 95%, and a group missed
    # now is found at the next try (docs/experiments.md compares it with more rounds).
    while len(out) < max_new and failures < max_failures:
        idx = torch.randperm(n, generator=generator)[: min(n, candidates)].to(z.device)
        nn_idx = squared_distances(z[idx], z).topk(k_nn, dim=1, largest=False).indices  # [c, k]
        seeds = z[nn_idx].mean(1)
        gains = (cur[None, :] - gate * squared_distances(seeds, z)).clamp_min(0).sum(1)
        c = seeds[int(gains.argmax())]
        for _ in range(iters):
            owned = gate * squared_distances(z, c[None, :]).squeeze(1) < cur
            if int(owned.sum()) < min_support:
                break
            c_new = z[owned].mean(0)
            if torch.allclose(c_new, c):
                break
            c = c_new
        d_c = gate * squared_distances(z, c[None, :]).squeeze(1)
        if int((d_c < cur).sum()) < min_support:
            failures += 1
            continue
        out.append(c)
        cur = torch.minimum(cur, d_c)
    return out


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

"""Small, fast k-means and silhouette in torch for the online hot path.

scikit-learn's KMeans is used for the one-off initialisation in ``fit``; for the
novelty buffer (a few thousand low-dimensional rows, several k per attempt, inside the
update's time budget) its per-call overhead (validation, thread-pool set-up) costs
more than the arithmetic, so this module does the same Lloyd iterations directly.
"""

from __future__ import annotations

import math

import torch

from stream_dec.model.dec import squared_distances


@torch.no_grad()
def greedy_seeds(z: torch.Tensor, centres: torch.Tensor, n_new: int, generator: torch.Generator, trials: int) -> torch.Tensor:
    """Append ``n_new`` greedy k-means++ seeds to ``centres`` (which may be empty).

    Each pick draws ``trials`` candidates by D² sampling and keeps the one that lowers
    the potential most, as scikit-learn does; plain k-means++ falls into bad optima.
    """
    n = z.shape[0]
    if centres.shape[0] == 0:
        first = int(torch.randint(n, (1,), generator=generator))
        centres, n_new = z[first : first + 1], n_new - 1
    closest = squared_distances(z, centres).min(1).values
    for _ in range(n_new):
        total = float(closest.sum())
        probs = closest / total if total > 0 else torch.full_like(closest, 1.0 / n)
        cand = torch.multinomial(probs.cpu(), trials, replacement=True, generator=generator).to(z.device)
        pot = torch.minimum(closest[None, :], squared_distances(z[cand], z))  # [trials, n]
        best = int(pot.sum(1).argmin())
        centres = torch.cat([centres, z[cand[best]][None, :]])
        closest = pot[best]
    return centres


@torch.no_grad()
def cluster_sums(z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the rows of ``z`` per label ``[k, d]``, bit-reproducible on every device.

    ``index_add_`` adds with atomics on CUDA, so the order (and the last bits) of a sum
    changes between runs, and a replayed update or a standby's republished snapshot
    would differ from the original. There a one-hot matrix product, which cuBLAS runs
    in a fixed order, does the sum; the CPU keeps ``index_add_``, whose sums every
    checkpoint and test so far was computed with.

    >>> cluster_sums(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([0, 2, 0]), 3)
    tensor([[6., 8.],
            [0., 0.],
            [3., 4.]])
    """
    if z.device.type == "cpu":
        return torch.zeros(k, z.shape[1], dtype=z.dtype).index_add_(0, labels, z)
    return torch.nn.functional.one_hot(labels, k).to(z.dtype).T @ z


@torch.no_grad()
def lloyd(z: torch.Tensor, centres: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from ``centres`` until labels settle; returns ``(labels, centres)``."""
    labels = squared_distances(z, centres).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=centres.shape[0]).to(z.dtype)
        sums = cluster_sums(z, labels, centres.shape[0])
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        new = squared_distances(z, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centres


@torch.no_grad()
def kmeans_pp(z: torch.Tensor, k: int, generator: torch.Generator, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ seeding then Lloyd iterations; returns ``(labels [n], centres [k, d])``."""
    seeds = greedy_seeds(z, z[:0], k, generator, trials=2 + int(math.log(k)))
    return lloyd(z, seeds, iters)


@torch.no_grad()
def silhouette(z: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette coefficient (Euclidean), as ``sklearn.metrics.silhouette_score``."""
    k = int(labels.max()) + 1
    d = torch.cdist(z, z)
    onehot = torch.nn.functional.one_hot(labels, k).to(z.dtype)
    sums = d @ onehot  # [n, k] total distance to each cluster
    counts = onehot.sum(0)
    own = counts[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    mean_other = sums / counts.clamp_min(1)[None, :]
    mean_other.scatter_(1, labels[:, None], float("inf"))
    mean_other[:, counts == 0] = float("inf")
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own > 1, s, torch.zeros_like(s))  # sklearn: 0 for singletons
    return float(s.mean())

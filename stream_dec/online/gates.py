"""Distances, gates and assignment: what keeps an id from taking items it never labelled.

Every id has two prototypes (``clusters.centres``: current, ``clusters.memory``: where
it was born). The gated distance of an item to an id is the smaller of its squared
distances to the two, each inflated by a gate: ``gate`` for a spawned cluster's birth
prototype, ``gate_cur`` for every current (moving) prototype; an original memory
prototype has gate 1. An item goes to the id with the smallest gated distance, then
descends the id hierarchy: a child (``parent`` column) takes an item its parent holds
when its distance, with its birth prototype behind the lower ``gate_ref``, beats the
parent's. Children are tried in row (birth) order, so a younger child never takes an
older sibling's items. Moving an item to a descendant of its id is a refinement (its
stored id still holds); a child takes other ids' items only behind ``gate``.

Gates are calibrated on the reservoir (the items the model remembers labelling):
:func:`calibrate_moving_gates` after the centres move, :func:`new_cluster_gate` for a
proposed cluster.
"""

from __future__ import annotations

import torch

from stream_dec.model import squared_distances
from stream_dec.online.clusters import ClusterTable
from stream_dec.online.confidence import Calibration, confidence

PREDICT_CHUNK = 65536  # rows per distance computation: bounds the [n, 2K] temporary


@torch.no_grad()
def distances(t: ClusterTable, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``[n, K]`` squared distance to the nearer prototype of each id, and the gated one."""
    k = t.centres.shape[0]
    both = squared_distances(z, torch.cat([t.centres, t.memory]))
    return torch.minimum(both[:, :k], both[:, k:]), gated(t, both[:, :k], both[:, k:])


def gated(t: ClusterTable, cur: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """Gated ``[n, K]`` distance per id from squared distances to current and memory prototypes.

    Where an item descends from a parent into a child, the child's entry is its
    refinement distance, so ``argmin`` gives the descended row and ``min`` the distance
    the item is held at.
    """
    d = torch.minimum(cur * t.gate_cur[None, :], mem * t.gate[None, :])
    refining = torch.nonzero(t.gate_ref < t.gate).flatten().tolist()
    if not refining or d.shape[0] == 0:
        return d
    prow = t.parent_rows()
    held, win = d.min(1)
    for c in refining:
        p = int(prow[c])
        if p < 0:
            continue
        r = torch.minimum(cur[:, c] * t.gate_cur[c], mem[:, c] * t.gate_ref[c])
        down = (win == p) & (r < held)
        win = torch.where(down, c, win)
        held = torch.where(down, r, held)
        d[:, c] = torch.where(down, r, d[:, c])
    return d


@torch.no_grad()
def assign(t: ClusterTable, z: torch.Tensor) -> torch.Tensor:
    """Row index (into ``t.ids``) of the winning cluster of every latent."""
    out = [distances(t, z[i : i + PREDICT_CHUNK])[1].argmin(1) for i in range(0, z.shape[0], PREDICT_CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)


@torch.no_grad()
def label(t: ClusterTable, z: torch.Tensor, calibration: Calibration) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, confidence)`` of every latent: the winning row (into ``t.ids``) and its confidence.

    The one labelling function: the estimator's ``predict_with_confidence`` and the
    predict-only snapshot (stream_dec/online/snapshot.py) both call it, so a predictor
    in another process gives exactly the learner's labels. The confidence is
    :func:`stream_dec.online.confidence.confidence` of the gated distances under
    ``calibration`` (the model's ``confidence_calibration()``).
    """
    rows, conf = [], []
    for i in range(0, z.shape[0], PREDICT_CHUNK):
        d = distances(t, z[i : i + PREDICT_CHUNK])[1]
        rows.append(d.argmin(1))
        conf.append(confidence(d, calibration))
    if not rows:
        return torch.zeros(0, dtype=torch.long, device=z.device), torch.zeros(0, device=z.device)
    return torch.cat(rows), torch.cat(conf)


@torch.no_grad()
def explain(t: ClusterTable, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nearest, explained)``: each item's winning row, and whether that cluster's radius covers it."""
    d_raw, d_eff = distances(t, z)
    nearest = d_eff.argmin(1)
    explained = d_raw.gather(1, nearest[:, None]).squeeze(1) <= t.radius[nearest]
    return nearest, explained


@torch.no_grad()
def assign_reusing(t: ClusterTable, res: torch.Tensor, both: torch.Tensor | None, k_old: int) -> torch.Tensor:
    """``assign(t, res)`` from squared distances ``both`` ``[R, 2 k_old]`` to the first ``k_old``
    clusters' prototypes computed earlier, adding only the clusters created since."""
    if both is None:
        return assign(t, res)
    k = t.centres.shape[0]
    cur, mem = both[:, :k_old], both[:, k_old:]
    if k > k_old:
        extra = squared_distances(res, torch.cat([t.centres[k_old:], t.memory[k_old:]]))
        cur = torch.cat([cur, extra[:, : k - k_old]], 1)
        mem = torch.cat([mem, extra[:, k - k_old :]], 1)
    return gated(t, cur, mem).argmin(1)


MARGIN_STEPS = (0.0, 0.1, 0.2, 0.5, 1.0)  # fractions of ``margin`` tried for the moving gates, smallest first


@torch.no_grad()
def calibrate_moving_gates(
    t: ClusterTable, res: torch.Tensor, assigned: torch.Tensor, margin: float, churn: float
) -> torch.Tensor | None:
    """Set each current prototype's gate so that it takes no remembered item of another id.

    A moving prototype may follow its own items anywhere, but it must not win an item
    that another id holds: its gate is the largest ratio (the other id's gated distance
    over the distance to this prototype) over the reservoir items of other ids, times a
    safety factor ``(1 + m)²`` for the items the reservoir does not hold.

    ``m`` is measured, not fixed: calibrated on one half of the
    reservoir, the gates are applied to the other half (both ways), and ``m`` is the
    smallest of :data:`MARGIN_STEPS` × ``margin`` at which that unseen half provably
    loses at most ``churn / 2`` of its items; a gate set on the whole reservoir, twice
    the sample, lets through about half as many, so a moved prototype spends about a
    quarter of what a new cluster may take, each update. Few remembered items need the whole
    ``margin``; a well-sampled stream lets the prototypes follow their drifting items
    closely, which a fixed margin forbids (docs/experiments.md §17). ``churn=0`` can
    never be shown, so it keeps the whole ``margin``. Returns the reservoir's squared distances to all
    prototypes ``[R, 2K]`` for reuse (None for an empty reservoir).
    """
    if len(res) == 0:
        return None
    k = t.centres.shape[0]
    both = squared_distances(res, torch.cat([t.centres, t.memory]))
    held = gated(t, both[:, :k], both[:, k:])
    held = held.gather(1, assigned[:, None])  # [R, 1] distance to the id each item holds
    ratio = held / both[:, :k].clamp_min(1e-12)
    ratio.scatter_(1, assigned[:, None], 0.0)
    floor = torch.where(t.spawned, (1.0 + margin) ** 2, 1.0)
    m = _held_out_margin(ratio, floor, margin, churn)
    t.gate_cur = torch.maximum(ratio.max(0).values * (1.0 + m) ** 2, floor)
    return both


def _held_out_margin(ratio: torch.Tensor, floor: torch.Tensor, margin: float, churn: float) -> float:
    """Smallest margin of :data:`MARGIN_STEPS` whose gates, set on one half of ``ratio``'s
    rows, provably take at most ``churn / 2`` of the other half.

    Every row is unseen once (each half is fitted on the other). With ``lost`` of the
    ``n`` rows taken, the share is bounded above by ``(lost + 3 + 2√lost) / n``: the rule
    of three for none lost, about two standard deviations above the count otherwise.
    A small reservoir cannot show a share this low, so it keeps the whole ``margin``.

    >>> r = torch.zeros(4000, 2); r[:, 1] = torch.linspace(0.1, 0.9, 4000)
    >>> _held_out_margin(r, torch.ones(2), margin=0.1, churn=0.002)  # many items, none near: no margin
    0.0
    >>> _held_out_margin(r[:400], torch.ones(2), margin=0.1, churn=0.002)  # too few to show it
    0.1
    """
    halves = (ratio[0::2], ratio[1::2])
    n = ratio.shape[0]
    if min(len(h) for h in halves) == 0:
        return margin
    # An unseen row is taken at margin m when some prototype's ratio beats both the floor
    # and the fitted half's largest ratio times (1 + m)²: so each row needs one number,
    # the largest ratio-to-fitted-max over the prototypes whose floor it passes.
    need = torch.cat([
        torch.where(unseen > floor[None, :], unseen / fit.max(0).values.clamp_min(1e-30)[None, :], 0.0).max(1).values
        for fit, unseen in (halves, halves[::-1])
    ])
    for step in MARGIN_STEPS:
        m = step * margin
        lost = int((need > (1.0 + m) ** 2).sum())
        if (lost + 3 + 2 * lost**0.5) / n <= churn / 2:
            return m
    return margin


@torch.no_grad()
def held_distance(t: ClusterTable, res: torch.Tensor, both: torch.Tensor | None) -> torch.Tensor | None:
    """Gated squared distance of each reservoir item to the id it goes to now (None: empty reservoir)."""
    held = held_by(t, res, both)
    return None if held is None else held[0]


@torch.no_grad()
def held_by(t: ClusterTable, res: torch.Tensor, both: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(distance, row)``: the gated squared distance of each item of ``res`` to the row holding it, and that row."""
    if len(res) == 0:
        return None
    k = t.centres.shape[0]
    if both is None:
        both = squared_distances(res, torch.cat([t.centres, t.memory]))
    held = gated(t, both[:, :k], both[:, k:]).min(1)
    return held.values, held.indices


@torch.no_grad()
def new_cluster_gate(c: torch.Tensor, res: torch.Tensor, d_res_old: torch.Tensor | None, *, margin: float, churn: float) -> float:
    """Gate at which centre ``c`` takes at most a ``churn`` share of the reservoir.

    ``d_res_old`` is :func:`held_distance` of the reservoir. Never below
    ``(1 + margin)²``: the calibration sees only a sample of what the model labelled,
    and the margin covers the items it did not see.
    """
    gate = (1.0 + margin) ** 2
    if d_res_old is not None:
        ratio = d_res_old / squared_distances(res, c[None, :]).squeeze(1).clamp_min(1e-12)
        gate = max(gate, float(torch.quantile(ratio, 1.0 - churn)))
    return gate


@torch.no_grad()
def refine_gate(r_win: torch.Tensor, r_own: torch.Tensor, cap: float) -> float:
    """Gate at which a child takes its parent's items: the best split of new from founding items.

    ``r_win`` and ``r_own`` are, for the parent's items in the recent window and among
    the remembered ones, the ratio of the distance the parent holds each at to the
    squared distance to the child; at gate ``g`` the child takes those with ratio > g.
    The gate maximises (share of window items taken) − (share of remembered items
    taken): the window holds the parent's old kind of items in their old proportions
    plus the new group, so the difference counts only the new group, and its best
    threshold needs no constant. At most a ``cap`` share of the remembered items may go.
    Returns ``inf`` (take nothing) when no gate takes more window than remembered share.

    >>> refine_gate(torch.tensor([3.0, 2.5, 2.0, 0.5]), torch.tensor([0.4, 0.6, 1.5, 0.8]), cap=1.0)
    1.5
    >>> refine_gate(torch.tensor([0.2, 0.3]), torch.tensor([0.4, 0.6]), cap=1.0)
    inf
    """
    if r_win.numel() == 0 or r_own.numel() == 0:
        return float("inf")
    win, own = torch.sort(r_win).values, torch.sort(r_own).values
    cand = torch.sort(torch.cat([win, own])).values  # the gates where what is taken changes
    taken_win = (r_win.numel() - torch.searchsorted(win, cand, right=True)) / r_win.numel()
    taken_own = (r_own.numel() - torch.searchsorted(own, cand, right=True)) / r_own.numel()
    score = torch.where(taken_own <= cap, taken_win - taken_own, torch.full_like(taken_win, -1.0))
    best = int(score.argmax())
    return float(cand[best]) if float(score[best]) > 0 else float("inf")

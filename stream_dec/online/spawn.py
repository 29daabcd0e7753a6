"""Spawning: turn groups of the recent window that old clusters do not explain into new clusters.

Proposals come from ``spawn_rule`` (:mod:`stream_dec.online.novelty`). Each one gets
its own predict-time gate (the factor its squared distance is inflated by), calibrated
on the reservoir so that it would take at most ``new_cluster_churn`` of the remembered
items (never below ``(1+margin)²``). Gated Lloyd iterations then move it to the core of
what it captures behind that gate. It is accepted only if it still captures
``min_support`` window items from at least two batches, as compactly as the fitted
clusters (a duplicate of an old cluster fails: its calibrated gate leaves it nothing).

An accepted cluster's parent is the id that holds more than half of the window items
it captures (``source_share``); otherwise it is a new root. A child refines its parent:
against the parent's items it has a second, lower gate (``gate_ref``,
:func:`stream_dec.online.gates.refine_gate`: the split of the parent's window items
from its remembered ones, taking at most ``refine_share`` of the remembered ones);
against every other id's remembered items its gate is calibrated to the same
``new_cluster_churn`` budget as a root's. Moving a parent's items into its child keeps
their stored id valid (it is announced), so it is not churn.

Under the update's time budget a due search does not start once the time is spent,
and stops checking proposals when it runs out; either way the window's turnover
counter is left as it was, so the search is due again at the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from stream_dec.model import squared_distances
from stream_dec.online import gates
from stream_dec.online.clusters import NewCluster
from stream_dec.online.context import UpdateContext
from stream_dec.online.guard import churned, published_rows
from stream_dec.online.novelty import NoveltyBuffer, find_new_clusters, propose_anchored, propose_refit

if TYPE_CHECKING:  # pragma: no cover
    from stream_dec.online.estimator import StreamDEC

SPAWN_RULES = ("refit", "anchored", "outliers")
PROPOSAL_SAMPLE = 2048  # window rows the proposals see: they only need the window's shape
MAX_NEW_PER_UPDATE = 8


def due(buf: NoveltyBuffer, room: int, min_support: int) -> bool:
    """Whether a search is due: room for a cluster, and the window has turned over by a
    quarter (and by at least ``min_support`` items) since the last search."""
    return room > 0 and len(buf) >= 2 * min_support and buf.added_since_try >= max(min_support, len(buf) // 4)


@torch.no_grad()
def maybe_spawn(est: "StreamDEC", u: UpdateContext, res_both: torch.Tensor | None) -> list[np.ndarray]:
    """Search the window when due and time allows; append the accepted clusters to ``est.clusters_``.

    ``res_both`` are the reservoir's squared distances to all prototypes if already
    computed. Returns the captured window rows of each new cluster, in table order.
    Records in ``u`` whether the search was skipped or cut (a replay follows ``u.replay``).
    """
    t, buf = est.clusters_, est.buffer_
    room = est.max_clusters_ - len(t)
    if not due(buf, room, est.min_support_):
        return []
    if u.replay.spawn_skipped if u.replay is not None else u.out_of_time():
        u.spawn_skipped = True
        return []
    u.turnover, buf.added_since_try = buf.added_since_try, 0
    zw = torch.from_numpy(buf.z).to(t.device)
    d_win, win_rows = gates.distances(t, zw)[1].min(1)
    explained = torch.from_numpy(~buf.unexplained).to(t.device)
    seed = int(u.rng.integers(2**31))
    proposals = _propose(est, zw, d_win, seed, max_new=min(room, MAX_NEW_PER_UPDATE))
    held = gates.held_by(t, u.res, res_both)
    res_old = None if held is None else (u.res, *held)
    budget = _refine_budget(est, u, held)
    base_radius = float(torch.quantile(t.radius[~t.spawned], 0.25))
    captured_rows: list[np.ndarray] = []
    limit = u.replay.proposals if u.replay is not None else None
    for i, c in enumerate(proposals):
        if len(t) >= est.max_clusters_:
            break
        if (limit is not None and i >= limit) or u.out_of_time():
            u.proposals, buf.added_since_try = i, u.turnover
            break
        c, g, d_c, captured = _settle(est, c, zw, d_win, win_rows, explained, res_old, budget)
        n_cap = int(captured.sum())
        if n_cap < est.min_support_ or np.unique(buf.born[captured.cpu().numpy()]).size < 2:
            continue  # support and persistence
        if float(d_c[captured].mean()) > est.cohesion_:
            continue  # cohesion
        radius = max(float(torch.quantile(d_c[captured], est.novelty_quantile)), base_radius)
        rows = np.flatnonzero(captured.cpu().numpy())
        prow, share = _parent_row(win_rows[captured], explained[captured]), source(win_rows[captured].cpu().numpy())[1]
        gate_ref = g.gate_ref if prow is not None and prow == g.parent else g.gate
        row = t.append(NewCluster(
            centre=c, gate=g.gate, radius=radius, support=n_cap, parent=None if prow is None else int(t.ids[prow]),
            born=u.version, gate_ref=gate_ref,
        ))
        u.births[int(t.ids[row])] = {
            "support": n_cap, "source_share": share, "window": len(buf), "gate": float(g.gate),
            "cohesion": float(d_c[captured].mean()) / est.cohesion_,
            **({"gate_ref": gate_ref} if prow is not None else {}),
        }
        captured_rows.append(rows)
        budget -= g.taken_own if gate_ref < g.gate else 0
        d_win = torch.where(captured, d_c * g.factor(win_rows), d_win)
        win_rows = torch.where(captured, row, win_rows)
    return captured_rows


def source(ids: np.ndarray) -> tuple[int | None, float]:
    """``(parent, share)``: the id most of ``ids`` had and its share; parent None unless share > 1/2.

    >>> source(np.array([4, 4, 4, 1]))
    (4, 0.75)
    >>> source(np.array([4, 4, 1, 1]))
    (None, 0.5)
    """
    vals, counts = np.unique(ids, return_counts=True)
    top = int(counts.argmax())
    share = float(counts[top]) / float(counts.sum())
    return (int(vals[top]) if share > 0.5 else None), share


def _propose(est: "StreamDEC", zw: torch.Tensor, d_win: torch.Tensor, seed: int, max_new: int) -> list[torch.Tensor]:
    """Candidate centres from ``spawn_rule`` over the window latents ``zw`` (gated distances ``d_win``)."""
    t, buf = est.clusters_, est.buffer_
    gen = torch.Generator().manual_seed(seed)
    sub = torch.randperm(len(zw), generator=gen)[:PROPOSAL_SAMPLE].to(t.device)
    if est.spawn_rule == "refit":
        return propose_refit(zw[sub], t.centres, max_new=max_new, generator=gen)
    if est.spawn_rule == "anchored":
        return propose_anchored(
            zw[sub], d_win[sub], min_support=max(2, est.min_support_ * len(sub) // len(zw)), max_new=max_new,
            generator=gen, gate=(1.0 + est.margin) ** 2,
        )
    rows = np.flatnonzero(buf.unexplained)
    cands = find_new_clusters(
        buf.z[rows], buf.born[rows], existing=torch.cat([t.centres, t.memory]).cpu().numpy(),
        existing_radius=torch.cat([t.radius, t.radius]).cpu().numpy(), min_support=est.min_support_,
        max_cohesion=est.cohesion_, min_separation=est.separation_, radius_quantile=est.novelty_quantile,
        max_new=max_new, seed=seed,
    )
    return [torch.from_numpy(c.centre).to(t.device) for c in cands]


@dataclass(frozen=True)
class _Gates:
    """A proposal's gates: ``gate`` against every id, the lower ``gate_ref`` against its parent row only."""

    gate: float
    gate_ref: float
    parent: int | None  # row of the parent, None for a root
    taken_own: int = 0  # the parent's remembered items taken behind gate_ref

    def factor(self, rows: torch.Tensor) -> torch.Tensor:
        """The gate against the items held by ``rows``."""
        mine = rows == (-1 if self.parent is None else self.parent)
        return torch.where(mine, self.gate_ref, self.gate)


def _settle(
    est: "StreamDEC", c: torch.Tensor, zw: torch.Tensor, d_win: torch.Tensor, win_rows: torch.Tensor,
    explained: torch.Tensor, res_old: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, budget: float,
) -> tuple[torch.Tensor, _Gates, torch.Tensor, torch.Tensor]:
    """Gated Lloyd: re-centre ``c`` on what it captures behind its gates and re-calibrate them.

    The centre leaves the old clusters' fringe for the core of the new group, so the
    gate it needs shrinks. The parent is the row holding most of what it captured at the
    previous iteration (at the first, what it would take at the smallest gate); a
    proposal whose final capture no longer comes mostly from that parent is settled as
    a root. ``res_old`` is the reservoir, the distance each item is held at and the row
    holding it. Returns ``(centre, gates, squared distances of the window to it, captured mask)``.
    """
    floor = (1.0 + est.margin) ** 2
    captured = None
    for it in range(est.spawn_refine_iters + 1):
        d_c = squared_distances(zw, c[None, :]).squeeze(1)
        took = d_c * floor < d_win if captured is None else captured
        prow = _parent_row(win_rows[took], explained[took])
        g = _gates(est, c, d_c, d_win, win_rows, res_old, prow, budget)
        captured = d_c * g.factor(win_rows) < d_win
        if int(captured.sum()) < 3 or it == est.spawn_refine_iters:
            break
        c_next = zw[captured].mean(0)
        if torch.allclose(c_next, c):
            break
        c = c_next
    if g.parent is not None and _parent_row(win_rows[captured], explained[captured]) != g.parent:
        g = _gates(est, c, d_c, d_win, win_rows, res_old, None, budget)
        captured = d_c * g.gate < d_win
    return c, g, d_c, captured


def _parent_row(rows: torch.Tensor, explained: torch.Tensor) -> int | None:
    """The row holding, within its radius (``explained``), more than half of the items held by ``rows``.

    None (a root) when no row does: a group far from every id lies beyond the radius
    of the id that happens to hold it, so it is new, not a part of that id.
    """
    if rows.numel() == 0 or not bool(explained.any()):
        return None
    top, _ = source(rows[explained].cpu().numpy())
    if top is None or 2 * int((rows[explained] == top).sum()) <= rows.numel():
        return None
    return top


def _gates(
    est: "StreamDEC", c: torch.Tensor, d_c: torch.Tensor, d_win: torch.Tensor, win_rows: torch.Tensor,
    res_old: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, prow: int | None, budget: float,
) -> _Gates:
    """The gates of centre ``c`` as a root (``prow`` None) or as a child of row ``prow``.

    A child's ``gate`` is calibrated on the remembered items of the other ids only, to
    the same number of items a root may take (``new_cluster_churn`` of the reservoir);
    its ``gate_ref`` on its parent's window and remembered items (:func:`gates.refine_gate`).
    """
    margin, churn = est.margin, est.new_cluster_churn
    # A spawned id was founded on the core it captured at birth, so its window items (its
    # later periphery) would read as a new group against them: only fitted ids, founded
    # on a sample of their whole kind, are refined.
    if res_old is None or prow is None or est.refine_share == 0 or bool(est.clusters_.spawned[prow]):
        gate = gates.new_cluster_gate(c, res_old[0] if res_old else None, res_old[1] if res_old else None, margin=margin, churn=churn)
        return _Gates(gate, gate, None)
    res, held, rows = res_old
    own = rows == prow
    n_other = int((~own).sum())
    gate = (1.0 + margin) ** 2
    if n_other:
        gate = gates.new_cluster_gate(c, res[~own], held[~own], margin=margin, churn=min(1.0, churn * len(res) / n_other))
    if not bool(own.any()):
        return _Gates(gate, gate, prow)
    r_own = held[own] / squared_distances(res[own], c[None, :]).squeeze(1).clamp_min(1e-12)
    mine = win_rows == prow
    r_win = d_win[mine] / d_c[mine].clamp_min(1e-12)
    cap = min(est.refine_share, max(budget, 0.0) / r_own.numel())
    gate_ref = gates.refine_gate(r_win, r_own, cap)
    if not gate_ref < float("inf"):
        # No split of the parent's items: the parent's remembered items count against the
        # new_cluster_churn budget like every other id's.
        gate = gates.new_cluster_gate(c, res, held, margin=margin, churn=churn)
        return _Gates(gate, gate, prow)
    # The child takes its parent's items only up to the cap, whichever gate it wins them by.
    gate = max(gate, gate_ref)
    return _Gates(gate, gate_ref, prow, int((r_own > gate_ref).sum()))


def _refine_budget(est: "StreamDEC", u: UpdateContext, held: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """Remembered items that new children may still take from their parents (``refine_budget`` of the reservoir)."""
    if held is None:
        return 0.0
    first = published_rows(est.clusters_, u.published)
    now = int(((first != held[1]) & ~churned(est.clusters_, first, held[1])).sum())
    return est.refine_budget * len(u.published) - now

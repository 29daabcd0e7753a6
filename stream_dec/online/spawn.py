"""Spawning: turn groups of the recent window that old clusters do not explain into new clusters.

Proposals come from ``spawn_rule`` (:mod:`stream_dec.online.novelty`). Each one gets
its own predict-time gate (the factor its squared distance is inflated by), calibrated
on the reservoir so that it would take at most ``new_cluster_churn`` of the remembered
items (never below ``(1+margin)²``). Gated Lloyd iterations then move it to the core of
what it captures behind that gate. It is accepted only if it still captures
``min_support`` window items from at least two batches, as compactly as the fitted
clusters (a duplicate of an old cluster fails: its calibrated gate leaves it nothing).

An accepted cluster's parent is the id that held more than half of its captured window
items when they came in (the window keeps the id each item had; ``source_share``);
otherwise it is a new root. The parent is recorded, not used: assignment ignores it.

Under the update's time budget a due search does not start once the time is spent,
and stops checking proposals when it runs out; either way the window's turnover
counter is left as it was, so the search is due again at the next batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from stream_dec.model import squared_distances
from stream_dec.online import gates
from stream_dec.online.clusters import NewCluster
from stream_dec.online.context import UpdateContext
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
    d_win = gates.distances(t, zw)[1].min(1).values
    seed = int(u.rng.integers(2**31))
    proposals = _propose(est, zw, d_win, seed, max_new=min(room, MAX_NEW_PER_UPDATE))
    d_res_old = gates.held_distance(t, u.res, res_both)
    base_radius = float(torch.quantile(t.radius[~t.spawned], 0.25))
    captured_rows: list[np.ndarray] = []
    limit = u.replay.proposals if u.replay is not None else None
    for i, c in enumerate(proposals):
        if len(t) >= est.max_clusters_:
            break
        if (limit is not None and i >= limit) or u.out_of_time():
            u.proposals, buf.added_since_try = i, u.turnover
            break
        c, gate, d_c, captured = _settle(est, c, zw, d_win, u.res, d_res_old)
        n_cap = int(captured.sum())
        if n_cap < est.min_support_ or np.unique(buf.born[captured.cpu().numpy()]).size < 2:
            continue  # support and persistence
        if float(d_c[captured].mean()) > est.cohesion_:
            continue  # cohesion
        radius = max(float(torch.quantile(d_c[captured], est.novelty_quantile)), base_radius)
        rows = np.flatnonzero(captured.cpu().numpy())
        parent, share = source(buf.ids[rows])
        row = t.append(NewCluster(centre=c, gate=gate, radius=radius, support=n_cap, parent=parent, born=u.version))
        u.births[int(t.ids[row])] = {
            "support": n_cap, "source_share": share, "window": len(buf), "gate": float(gate),
            "cohesion": float(d_c[captured].mean()) / est.cohesion_,
        }
        captured_rows.append(rows)
        d_win = torch.minimum(d_win, d_c * gate)
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


def _settle(
    est: "StreamDEC", c: torch.Tensor, zw: torch.Tensor, d_win: torch.Tensor, res: torch.Tensor, d_res_old: torch.Tensor | None
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """Gated Lloyd: re-centre ``c`` on what it captures behind its gate and re-calibrate the gate.

    The centre leaves the old clusters' fringe for the core of the new group, so the
    gate it needs shrinks. Returns ``(centre, gate, squared distances of the window to
    it, captured mask)``.
    """
    for it in range(est.spawn_refine_iters + 1):
        gate = gates.new_cluster_gate(c, res, d_res_old, margin=est.margin, churn=est.new_cluster_churn)
        d_c = squared_distances(zw, c[None, :]).squeeze(1)
        captured = d_c * gate < d_win
        if int(captured.sum()) < 3 or it == est.spawn_refine_iters:
            break
        c_next = zw[captured].mean(0)
        if torch.allclose(c_next, c):
            break
        c = c_next
    return c, gate, d_c, captured

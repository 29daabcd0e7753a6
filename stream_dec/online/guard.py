"""The churn guard: an update may relabel only a bounded share of the remembered items.

Churn is hierarchical (docs/quality-protocol.md): an item whose id moves to a
descendant of its id (a child refining its parent) keeps its stored id valid, so that
move is a refinement, counted apart; any other change of id is churn.

It bounds this update's relabelling of the reservoir (``max_churn``), the share of the
reservoir whose id is neither the id it was first given nor a descendant of it
(``max_total_churn``), and the share held by a strict descendant of its first id
(``refine_budget``); an update may not push a total share past its budget, which only
binds once reached.
Over budget, it undoes the centre step first (halving it until it fits or is
negligible: the step can be retried next batch), then drops the new cluster that
relabels most remembered items, until the update fits or nothing is left to undo.

Measuring is always done; undoing is not when the update's time is spent: then the
guard rolls the update back instead (the old centres and gates return and the new
clusters go, so no remembered item changes id: always within both budgets). The
batch's items stay in the novelty window, so what was undone can happen at a later batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from stream_dec.online import gates
from stream_dec.online.context import UpdateContext

if TYPE_CHECKING:  # pragma: no cover
    from stream_dec.online.estimator import StreamDEC


@torch.no_grad()
def churn_guard(est: "StreamDEC", u: UpdateContext, res_both: torch.Tensor | None, spawned: list[np.ndarray]) -> tuple[float, str, torch.Tensor]:
    """Shrink the centre step or drop new clusters until the update is within the churn budgets.

    ``spawned`` (the captured rows of each new cluster, in table order) loses the
    entries of dropped clusters. Returns ``(churn of this update, action taken, the
    reservoir's assignment after the update)``.
    """
    t, res, before, published = est.clusters_, u.res, u.before, u.published
    allowed_total = max(_churn(t, res, before, before, published)[1], est.max_total_churn)
    allowed_refined = max(refined_share(t, published, before), est.refine_budget)
    action = "none"
    if u.replay is not None and u.replay.guard_cut:
        return _roll_back(est, u, spawned)
    after = gates.assign_reusing(t, res, res_both, u.k_old) if res_both is not None or spawned else before
    while True:
        churn, total = _churn(t, res, before, after, published)
        if churn <= est.max_churn and total <= allowed_total and refined_share(t, published, after) <= allowed_refined:
            break
        if u.out_of_time():
            return _roll_back(est, u, spawned)
        step = _undo_centre_step(t, u, est.latent_scale_)
        if step is not None:
            action = step
        elif spawned and bool((before != after)[after >= u.k_old].any()):
            _drop_worst_new(t, u, before, after, spawned)
            action = "dropped_new"
        else:
            break
        after = gates.assign(t, res)
    return churn, action, after


def churned(t, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Which items moved from row ``before`` to a row that is not ``before`` or a descendant of it."""
    desc = torch.from_numpy(t.descends()).to(after.device)
    return ~desc[before, after]


def published_rows(t, published: torch.Tensor) -> torch.Tensor:
    """Rows of the ids in ``published`` (every remembered item's first id is a live id)."""
    ids = torch.from_numpy(t.ids).to(published.device)
    return torch.searchsorted(ids, published)


def _churn(t, res: torch.Tensor, before: torch.Tensor, after: torch.Tensor, published: torch.Tensor) -> tuple[float, float]:
    """``(share churned by this update, share whose id is neither its first id nor a descendant of it)``."""
    if not len(res):
        return 0.0, 0.0
    return float(churned(t, before, after).float().mean()), float(churned(t, published_rows(t, published), after).float().mean())


def refined_share(t, published: torch.Tensor, after: torch.Tensor) -> float:
    """Share of the remembered items held by a strict descendant of their first id."""
    if not len(after):
        return 0.0
    first = published_rows(t, published)
    return float(((first != after) & ~churned(t, first, after)).float().mean())


def _undo_centre_step(t, u: UpdateContext, latent_scale: float) -> str | None:
    """Halve the old clusters' centre step, or restore it once negligible; None if there is none."""
    k_old, old = u.k_old, u.old_centres
    if torch.equal(t.centres[:k_old], old):
        return None
    t.centres[:k_old] = old + 0.5 * (t.centres[:k_old] - old)
    if float((t.centres[:k_old] - old).norm(dim=1).max()) < 1e-3 * latent_scale:
        t.centres[:k_old] = old
        return "rolled_back"
    return "shrunk"


def _drop_worst_new(t, u: UpdateContext, before: torch.Tensor, after: torch.Tensor, spawned: list[np.ndarray]) -> None:
    """Drop the new cluster that takes most remembered items (churned or refined)."""
    new_taken = (after >= u.k_old) & (before != after)
    worst = int(torch.bincount(after[new_taken] - u.k_old, minlength=len(spawned)).argmax())
    t.drop(u.k_old + worst)
    spawned.pop(worst)


def _roll_back(est: "StreamDEC", u: UpdateContext, spawned: list[np.ndarray]) -> tuple[float, str, torch.Tensor]:
    """Undo the centre step, the gates it moved and the new clusters: the table is as before the update."""
    t = est.clusters_
    t.centres[: u.k_old] = u.old_centres
    t.gate_cur[: u.k_old] = u.old_gate_cur
    for j in reversed(range(u.k_old, len(t))):
        t.drop(j)
    spawned.clear()
    if u.turnover is not None:
        est.buffer_.added_since_try = u.turnover  # the spawn search is due again
    u.guard_cut = True
    return 0.0, "rolled_back", u.before

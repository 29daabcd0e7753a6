"""The churn guard: an update may relabel only a bounded share of the remembered items.

It bounds both this update's relabelling of the reservoir (``max_churn``) and the share
of the reservoir whose id differs from the id it was first given (``max_total_churn``;
an update may not push that share past the budget, which only binds once reached).
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
    ids_t = torch.from_numpy(t.ids).to(res.device)
    total_before = float((ids_t[before] != published).float().mean()) if len(res) else 0.0
    allowed_total = max(total_before, est.max_total_churn)
    action = "none"
    if u.replay is not None and u.replay.guard_cut:
        return _roll_back(est, u, spawned)
    after = gates.assign_reusing(t, res, res_both, u.k_old) if res_both is not None or spawned else before
    while True:
        churn, total = _churn(t, res, before, after, published)
        if churn <= est.max_churn and total <= allowed_total:
            break
        if u.out_of_time():
            return _roll_back(est, u, spawned)
        step = _undo_centre_step(t, u, est.latent_scale_)
        if step is not None:
            action = step
        elif spawned and bool((after >= u.k_old).any()):
            _drop_worst_new(t, u, after, spawned)
            action = "dropped_new"
        else:
            break
        after = gates.assign(t, res)
    return churn, action, after


def _churn(t, res: torch.Tensor, before: torch.Tensor, after: torch.Tensor, published: torch.Tensor) -> tuple[float, float]:
    """``(share relabelled by this update, share whose id differs from the first one)``."""
    if not len(res):
        return 0.0, 0.0
    ids_t = torch.from_numpy(t.ids).to(res.device)
    return float((before != after).float().mean()), float((ids_t[after] != published).float().mean())


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


def _drop_worst_new(t, u: UpdateContext, after: torch.Tensor, spawned: list[np.ndarray]) -> None:
    """Drop the new cluster that takes most remembered items."""
    new_taken = after >= u.k_old
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

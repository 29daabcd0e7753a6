"""Lifecycle events: what one update did to the life of ids, with the evidence behind each.

Every event names ``cluster``, its ``parent`` (None for a root), its ``root`` and the
``model_version`` of the update that made it; the service publishes each as a
lifecycle record (stream_dec/schemas/lifecycle.schema.json, docs/contracts.md).

* ``born``: the update kept a new id (a new root, or a refinement of ``parent``). Its
  evidence is what the spawn search recorded (``u.births``: support, source share,
  window, gate, cohesion, and whatever else it measured) plus ``founding_taken``.
* ``retired``: the id is no longer *live*. An id is live while the model has evidence
  that it is assigned: a remembered (reservoir) item is assigned to it, an item of the
  recent window came in under it, or it was born within the window's span (its ttl in
  model versions, the grace a new id needs before the stream has shown anything under
  it). The window and the reservoir are the model's own record of what it labelled, so
  no new constant decides retirement. While a remembered item is assigned to an id
  the churn guard protects that label, so the id is still in use; once nothing is, the
  model has no evidence that the id is still used.
* ``revived``: a retired id is live again (an item came in under it).

Retirement is an observation, not a change: a retired id stays in the table, keeps
its prototypes and gates, and ``predict`` still returns it for an item that lands
nearest to it (whether any point still would cannot be shown in general, so
retirement does not claim it). The labels of every item are exactly what they would
be without this module. A stored label with a retired id keeps its meaning; should
the stream bring the id back, a ``revived`` record says so before the model version
after the one that labelled that item.

Liveness is computed from the model's state (the window, the reservoir and the birth
versions), never stored: an id's state at the start of an update equals its state at
the end of the previous one, so each change is announced exactly once, and a model
restored from a checkpoint (or an update replayed from its plan) announces the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from stream_dec.online import gates
from stream_dec.online.clusters import NO_PARENT, ClusterTable
from stream_dec.online.context import UpdateContext
from stream_dec.online.novelty import NoveltyBuffer

if TYPE_CHECKING:  # pragma: no cover
    from stream_dec.online.estimator import StreamDEC

EVENTS = ("born", "retired", "revived")


@dataclass(frozen=True)
class Window:
    """The window's ids (the id each item came in under) and arrival versions, at the start of an update."""

    ids: np.ndarray
    born: np.ndarray
    ttl: int

    @classmethod
    def of(cls, buf: NoveltyBuffer) -> Window:
        """A copy of ``buf``'s ids and versions (the buffer changes during the update)."""
        return cls(buf.ids.copy(), buf.born.copy(), int(buf.ttl))


def born(t: ClusterTable, u: UpdateContext, after: torch.Tensor) -> list[dict]:
    """One ``born`` event per new id the update kept, with the evidence of its birth.

    ``after`` is the reservoir's assignment (rows of ``t``) once the churn guard is done.
    ``founding_taken`` is the share of the parent's remembered items (reservoir items
    first labelled with the parent) that the new id holds after the update; 0 for a root.
    """
    events = []
    ids_after = t.ids[after.cpu().numpy()] if len(after) else np.zeros(0, dtype=np.int64)
    published = u.published.cpu().numpy()
    for row in range(u.k_old, len(t)):
        cid, parent = int(t.ids[row]), int(t.parent[row])
        own = published == parent
        taken = float((ids_after[own] == cid).mean()) if parent != NO_PARENT and own.any() else 0.0
        events.append({**_names(t, row, u.version), **u.births[cid], "founding_taken": taken})
    return events


def turnover(t: ClusterTable, u: UpdateContext, before: Window, after: Window, moved: torch.Tensor, res_after: torch.Tensor) -> list[dict]:
    """``retired`` and ``revived`` events of the ids that existed before the update, in id order.

    ``before``/``after``: the window at the start and at the end of the update.
    ``moved``: the assignment (rows of ``t``) of the reservoir as it was at the start,
    under the updated clusters (the churn guard's result); ``res_after``: the assignment
    of the reservoir at the end (after new items entered it).
    """
    k = u.k_old
    held_before = np.bincount(u.before.cpu().numpy(), minlength=k)[:k]
    held_after = np.bincount(res_after.cpu().numpy(), minlength=len(t))[:k]
    live_before = _live(t, k, held_before, before, u.version - 1)
    live_after = _live(t, k, held_after, after, u.version)
    events = []
    for row in np.flatnonzero(live_before & ~live_after):
        events.append({**_names(t, row, u.version, "retired"), **_retired_evidence(t, row, u, before, moved, int(held_before[row]))})
    for row in np.flatnonzero(~live_before & live_after):
        cid = int(t.ids[row])
        events.append({**_names(t, row, u.version, "revived"), "remembered": int(held_after[row]),
                       "window_items": int((after.ids == cid).sum())})
    return sorted(events, key=lambda e: e["cluster"])


def retired_ids(est: StreamDEC) -> list[int]:
    """The ids of the fitted model ``est`` that are retired now (what ``stream-dec inspect`` marks).

    The rule of :func:`turnover` applied to the model's current state, so an id is
    listed exactly when its last event was ``retired`` (a model restored from a
    checkpoint that did not record birth versions may list an id that was unused
    before it was restored, without a record).
    """
    t = est.clusters_
    res = est.reservoir_.tensors(t.device)[0]
    held = np.bincount(gates.assign(t, res).cpu().numpy(), minlength=len(t))[: len(t)]
    return [int(i) for i in t.ids[~_live(t, len(t), held, Window.of(est.buffer_), int(est.version_))]]


def _live(t: ClusterTable, k: int, held: np.ndarray, window: Window, version: int) -> np.ndarray:
    """Whether each of the first ``k`` ids is live at the end of model ``version`` (see the module docstring)."""
    in_window = np.isin(t.ids[:k], window.ids)
    recent = t.born[:k] > version - window.ttl  # UNKNOWN (-1) birth versions count as old
    return (held > 0) | in_window | recent


def _retired_evidence(t: ClusterTable, row: int, u: UpdateContext, before: Window, moved: torch.Tensor, remembered: int) -> dict:
    """What a retirement rests on: where the id's remembered items went, and when it last labelled an arrival.

    ``moved_to``: the ids its remembered items are assigned to after the update (other
    than itself); ``forgotten``: those still assigned to it that the reservoir's sampling
    dropped. ``last_assigned_version``: the model version of the last batch in which an
    item came in under it, when the window still held one at the start of the update
    (None: longer ago than the window reaches, or never).
    """
    cid = int(t.ids[row])
    mine = u.before.cpu().numpy() == row
    now = t.ids[moved.cpu().numpy()[mine]] if mine.any() else np.zeros(0, dtype=np.int64)
    vals, counts = np.unique(now[now != cid], return_counts=True)
    order = np.lexsort((vals, -counts))
    seen = before.born[before.ids == cid]
    return {
        "remembered": remembered,
        "moved_to": [{"cluster": int(vals[i]), "items": int(counts[i])} for i in order],
        "forgotten": int(remembered - counts.sum()),
        "last_assigned_version": int(seen.max()) if len(seen) else None,
        "window_versions": before.ttl,
    }


def _names(t: ClusterTable, row: int, version: int, event: str = "born") -> dict:
    """The fields every event has: ``event``, ``cluster``, ``parent``, ``root``, ``model_version``."""
    cid, parent = int(t.ids[row]), int(t.parent[row])
    return {
        "event": event, "cluster": cid, "parent": None if parent == NO_PARENT else parent,
        "root": int(t.roots(np.array([cid]))[0]), "model_version": version,
    }

"""The cluster table: every per-cluster array of the model, kept in step.

A row is a cluster. Rows are only ever appended (a new cluster gets a fresh id, ids are
never reused) or, within the update that appended them, dropped again (the churn guard
undoing a spawn whose id was never published). ``FIELDS`` is the one list of columns:
a column is added by adding one :class:`Field` there (its value for the clusters made
by ``fit`` and for a cluster appended online); ``append``, ``drop``, ``state`` and
``from_state`` follow it. Objects that keep per-cluster rows of their own (the centre
rule's optimiser moments, the EWC Fisher) are listed in ``parts`` and told of every
append and drop, so they stay in step without being listed here.

>>> import torch
>>> t = ClusterTable.from_fit(torch.zeros(2, 3), radius=torch.ones(2), freq=torch.full((2,), 0.5))
>>> t.begin_update()
>>> t.append(NewCluster(centre=torch.ones(3), gate=4.0, radius=2.0, support=12))
2
>>> t.ids.tolist(), t.gate.tolist(), t.spawned.tolist()
([0, 1, 2], [1.0, 1.0, 4.0], [False, False, True])
>>> t.append(NewCluster(centre=torch.ones(3), gate=4.0, radius=2.0, support=12, parent=2, born=5))
3
>>> t.parent_ids(), t.roots(np.array([3, 0])).tolist()
({0: None, 1: None, 2: None, 3: 2}, [2, 0])
>>> t.drop(3)
>>> len(t), t.next_id
(3, 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class NewCluster:
    """What the spawn step knows of a cluster it creates."""

    centre: torch.Tensor  # [d]
    gate: float  # factor its squared distances are inflated by (calibrated on the reservoir)
    radius: float  # squared-distance quantile of what it captured
    support: int  # window items it captured
    parent: int | None = None  # the id it refines (None: a root)
    born: int = 0  # model version of the update that made it
    gate_ref: float | None = None  # gate against its parent only (refinement); None: the same as ``gate``


class ClusterPart(Protocol):
    """Per-cluster state kept outside the table, grown and shrunk with it."""

    def on_append(self, new: NewCluster) -> None:
        """A row was appended for ``new``."""

    def on_drop(self, keep: torch.Tensor) -> None:
        """Rows where ``keep`` is False were removed."""


@dataclass(frozen=True)
class Field:
    """One column: its value for the clusters of ``fit`` and its row for an appended cluster.

    ``fitted(centres, given)`` gets the fitted centres ``[k, d]`` and the value passed to
    :meth:`ClusterTable.from_fit` (None when not passed); ``appended(table, new)`` returns
    the one-row value of a cluster appended online. ``host`` columns are numpy arrays
    (ids are published, not computed with); the others are tensors on the model's device.
    ``restored(state)``, when set, gives the column of a saved state written before the
    column existed (from that state's other columns); without it such a state is refused.
    """

    name: str
    doc: str
    fitted: Callable[[torch.Tensor, Any], Any]
    appended: Callable[["ClusterTable", NewCluster], Any]
    host: bool = False
    restored: Callable[[dict], Any] | None = None


def _given(name: str) -> Callable[[torch.Tensor, Any], Any]:
    def fitted(centres: torch.Tensor, value: Any) -> Any:
        if value is None:
            raise ValueError(f"from_fit needs {name}")
        return value

    return fitted


NO_PARENT = -1  # the parent column's value for a root
UNKNOWN = -1  # birth version or support a checkpoint written before they were recorded lacks


def _row(table: "ClusterTable", value: float) -> torch.Tensor:
    return torch.tensor([value], device=table.device)


FIELDS: tuple[Field, ...] = (
    Field("ids", "cluster id (int64): fitted clusters 0..k-1, then fresh ids",
          lambda c, v: np.arange(c.shape[0], dtype=np.int64), lambda t, n: np.array([t.next_id], dtype=np.int64), host=True),
    Field("centres", "current prototype, moved by the centre rule",
          lambda c, v: c, lambda t, n: n.centre.reshape(1, -1).to(t.device)),
    Field("memory", "memory prototype: where the id was born; its old items keep their id",
          lambda c, v: c.clone(), lambda t, n: n.centre.reshape(1, -1).to(t.device).clone()),
    Field("spawned", "created online rather than by fit",
          lambda c, v: torch.zeros(c.shape[0], dtype=torch.bool, device=c.device),
          lambda t, n: torch.ones(1, dtype=torch.bool, device=t.device)),
    Field("gate", "factor inflating the squared distance to the memory prototype",
          lambda c, v: torch.ones(c.shape[0], device=c.device), lambda t, n: _row(t, n.gate)),
    Field("gate_cur", "factor inflating the squared distance to the current prototype",
          lambda c, v: torch.ones(c.shape[0], device=c.device), lambda t, n: _row(t, n.gate)),
    # A child may take its parent's items behind a lower gate than other ids' items
    # (refinement, stream_dec/online/gates.py); equal to ``gate`` it refines nothing, which
    # is what a table saved before the column existed did.
    Field("gate_ref", "factor inflating the squared distance to the memory prototype against its parent only",
          lambda c, v: torch.ones(c.shape[0], device=c.device),
          lambda t, n: _row(t, n.gate if n.gate_ref is None else n.gate_ref),
          restored=lambda state: state["gate"].clone()),
    Field("radius", "squared distance within which a cluster explains an item",
          _given("radius"), lambda t, n: _row(t, n.radius)),
    # A new cluster starts at the mean frequency of the clusters the update started with.
    Field("freq", "running soft frequency (the DEC target's f_j)",
          _given("freq"), lambda t, n: _row(t, float(t.freq[: t.mark].mean()))),
    # Assignment reads ``parent`` (a child competes with its parent behind ``gate_ref``).
    Field("parent", "id this cluster refines (int64, NO_PARENT for a root)",
          lambda c, v: np.full(c.shape[0], NO_PARENT, dtype=np.int64),
          lambda t, n: np.array([NO_PARENT if n.parent is None else n.parent], dtype=np.int64), host=True),
    Field("born", "model version that made it (int64, 0 for fitted clusters)",
          lambda c, v: np.zeros(c.shape[0], dtype=np.int64), lambda t, n: np.array([n.born], dtype=np.int64), host=True),
    Field("support", "items it was founded on (int64): fitted items, or window items captured at birth",
          lambda c, v: np.full(c.shape[0], UNKNOWN, dtype=np.int64) if v is None else np.asarray(v, dtype=np.int64),
          lambda t, n: np.array([n.support], dtype=np.int64), host=True),
)


class ClusterTable:
    """Per-cluster columns (``FIELDS``) as attributes, and the next fresh id."""

    def __init__(self, columns: dict[str, Any], next_id: int):
        for f in FIELDS:
            setattr(self, f.name, columns[f.name])
        self.next_id = int(next_id)
        self.mark = len(self)
        self.parts: list[ClusterPart] = []
        if any(len(getattr(self, f.name)) != len(self) for f in FIELDS):
            raise ValueError("per-cluster arrays disagree in length")

    @classmethod
    def from_fit(cls, centres: torch.Tensor, **given: Any) -> "ClusterTable":
        """The table of the ``k`` clusters made by ``fit`` (ids ``0..k-1``)."""
        return cls({f.name: f.fitted(centres, given.get(f.name)) for f in FIELDS}, next_id=centres.shape[0])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.centres.device

    def begin_update(self) -> None:
        """Mark the clusters that exist before an update: only later ones may be dropped."""
        self.mark = len(self)

    def append(self, new: NewCluster) -> int:
        """Append a cluster with a fresh id; returns its row."""
        for f in FIELDS:
            old, row = getattr(self, f.name), f.appended(self, new)
            setattr(self, f.name, np.concatenate([old, row]) if f.host else torch.cat([old, row]))
        self.next_id += 1
        for part in self.parts:
            part.on_append(new)
        return len(self) - 1

    def drop(self, j: int) -> None:
        """Undo a spawn made in this update (its id was never published, so it is not reused)."""
        if not self.mark <= j < len(self):
            raise ValueError(f"row {j} was not appended in this update: published clusters are never dropped")
        keep = torch.ones(len(self), dtype=torch.bool, device=self.device)
        keep[j] = False
        keep_np = keep.cpu().numpy()
        for f in FIELDS:
            old = getattr(self, f.name)
            setattr(self, f.name, old[keep_np] if f.host else old[keep])
        for part in self.parts:
            part.on_drop(keep)

    def parent_ids(self) -> dict[int, int | None]:
        """Every id and the id it refines (None for a root)."""
        return {int(i): (None if p == NO_PARENT else int(p)) for i, p in zip(self.ids, self.parent)}

    def parent_rows(self) -> np.ndarray:
        """The row of every cluster's parent (int64, -1 for a root)."""
        rows = np.searchsorted(self.ids, self.parent)  # ids are ascending: rows are only appended
        return np.where(self.parent == NO_PARENT, -1, rows).astype(np.int64)

    def descends(self) -> np.ndarray:
        """``[K, K]`` bool: ``[a, b]`` is True when row ``b`` is row ``a`` or one of its descendants."""
        out = np.eye(len(self), dtype=bool)
        # A parent's row always comes before its child's, so one pass in row order resolves every chain.
        for b, p in enumerate(self.parent_rows()):
            if p >= 0:
                out[:, b] |= out[:, p]
        return out

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """The root (top ancestor) of every id in ``ids`` (int64 array of live ids)."""
        top = np.arange(self.next_id, dtype=np.int64)
        parent = np.full(self.next_id, NO_PARENT, dtype=np.int64)
        parent[self.ids] = self.parent
        # A parent is always older than its child, so one pass in id order resolves every chain.
        for i in self.ids:
            if parent[i] != NO_PARENT:
                top[i] = top[parent[i]]
        return top[np.asarray(ids, dtype=np.int64)]

    def state(self) -> dict:
        """Plain-data state for checkpoints (CPU tensors)."""
        out: dict[str, Any] = {"next_id": self.next_id}
        for f in FIELDS:
            v = getattr(self, f.name)
            out[f.name] = torch.from_numpy(v.copy()) if f.host else v.detach().cpu().clone()
        return out

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "ClusterTable":
        """Rebuild from :meth:`state` on ``device``."""
        missing = [f.name for f in FIELDS if f.name not in state and f.restored is None]
        if missing:
            raise ValueError(f"missing cluster columns {missing}")
        state = {**state, **{f.name: f.restored(state) for f in FIELDS if f.name not in state}}
        cols = {f.name: state[f.name].numpy().copy() if f.host else state[f.name].to(device) for f in FIELDS}
        return cls(cols, next_id=int(state["next_id"]))

"""A fixed-size uniform sample of past latents and the ids they were given (algorithm R).

It is the model's memory of what it has labelled: the churn guard measures how many
of these items an update would relabel, per update and since they were labelled.
"""

from __future__ import annotations

import numpy as np
import torch


class Reservoir:
    """Uniform sample of at most ``capacity`` rows of everything passed to :meth:`add`.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> r = Reservoir(capacity=100, dim=1)
    >>> for start in range(0, 1000, 250):
    ...     rows = np.arange(start, start + 250, dtype=np.float32)[:, None]
    ...     _ = r.add(rows, ids=rows[:, 0].astype(np.int64) // 250, rng=rng)
    >>> len(r), r.n_seen
    (100, 1000)
    >>> np.unique(r.ids).tolist()  # every quarter of the stream is still represented
    [0, 1, 2, 3]
    """

    def __init__(self, capacity: int, dim: int):
        self.capacity = int(capacity)
        self.data = np.zeros((0, dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)  # cluster id each row had when it was labelled
        self.n_seen = 0
        self._mirror: tuple[torch.Tensor, torch.Tensor] | None = None  # rows and ids on an accelerator
        self._dirty: list[np.ndarray] = []  # slots written since the mirror was last brought up to date

    def __len__(self) -> int:
        return self.data.shape[0]

    def add(self, rows: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Offer ``rows`` with their ids; each row seen so far stays with probability capacity / n_seen.

        Returns the slots that were written (appended or replaced), so callers can keep
        per-slot caches in step.
        """
        rows = np.asarray(rows, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        free = self.capacity - len(self)
        written = np.zeros(0, dtype=np.int64)
        if free > 0:
            start = len(self)
            self.data = np.concatenate([self.data, rows[:free]])
            self.ids = np.concatenate([self.ids, ids[:free]])
            self.n_seen += min(free, rows.shape[0])
            written = np.arange(start, len(self))
            rows, ids = rows[free:], ids[free:]
        if rows.shape[0] == 0:
            self._dirty.append(written)
            return written
        # For the i-th row overall, draw j in [0, i); it replaces slot j if j < capacity.
        positions = self.n_seen + np.arange(1, rows.shape[0] + 1)
        j = np.floor(rng.random(rows.shape[0]) * positions).astype(np.int64)
        keep = j < self.capacity
        # Later rows overwrite earlier ones in the same slot, as the sequential algorithm would.
        self.data[j[keep]] = rows[keep]
        self.ids[j[keep]] = ids[keep]
        self.n_seen += rows.shape[0]
        written = np.union1d(written, j[keep])
        self._dirty.append(written)
        return written

    def tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, ids)`` as tensors on ``device``: views on the CPU, a kept mirror elsewhere.

        On an accelerator the mirror stays on the device between updates and only the
        slots written since the last call are copied over, so an update moves its new
        rows to the device, not the whole reservoir.
        """
        device = torch.device(device)
        if device.type == "cpu":
            return torch.from_numpy(self.data), torch.from_numpy(self.ids)
        return self._mirrored(device)

    def _mirrored(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mirror, dirty, self._dirty = self._mirror, self._dirty, []
        if mirror is None or mirror[0].device != device:
            self._mirror = (torch.from_numpy(self.data).to(device), torch.from_numpy(self.ids).to(device))
            return self._mirror
        rows, ids = mirror
        if rows.shape[0] < len(self):  # appended while filling up
            grow = len(self) - rows.shape[0]
            rows = torch.cat([rows, rows.new_empty((grow, rows.shape[1]))])
            ids = torch.cat([ids, ids.new_empty(grow)])
        if dirty:
            slots = np.unique(np.concatenate(dirty))
            idx = torch.from_numpy(slots).to(device)
            rows[idx] = torch.from_numpy(self.data[slots]).to(device)
            ids[idx] = torch.from_numpy(self.ids[slots]).to(device)
        self._mirror = (rows, ids)
        return self._mirror

    def state(self) -> dict:
        """Plain-data state for checkpoints."""
        return {"capacity": self.capacity, "data": self.data.copy(), "ids": self.ids.copy(), "n_seen": self.n_seen}

    @classmethod
    def from_state(cls, state: dict) -> "Reservoir":
        """Rebuild from :meth:`state`."""
        data = np.asarray(state["data"], dtype=np.float32)
        r = cls(int(state["capacity"]), data.shape[1])
        r.data = data.copy()
        r.ids = np.asarray(state["ids"], dtype=np.int64).copy()
        r.n_seen = int(state["n_seen"])
        if len(r.ids) != len(r.data):
            raise ValueError("reservoir ids and rows disagree in length")
        return r

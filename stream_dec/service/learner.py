"""The learner: a batch's update runs on its own thread while the loop acknowledges and polls.

Invariants:

* At most one update runs at a time, in batch order (one worker thread); torch releases
  the GIL, so the update overlaps the loop's I/O.
* The service collects an update (:meth:`Learner.settle`) before the next ``predict``,
  before a checkpoint and on an assignment, so every batch is labelled by the model that
  learnt from all batches before it, exactly as offline: the labels do not depend on
  timing.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Update:
    """A finished update: its report, its batch's offset range per partition, when it ran."""

    report: Any
    ranges: dict[int, tuple[int, int]]
    started: float
    ended: float


def _learn(model, X, ranges) -> Update:
    t0 = time.perf_counter()
    report = model.partial_fit(X)
    return Update(report, ranges, t0, time.perf_counter())


class Learner:
    """Runs ``model.partial_fit`` on a worker thread, one batch at a time."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-dec-learn")
        self._running: Future | None = None

    def start(self, model, X, ranges: dict[int, tuple[int, int]]) -> None:
        """Start learning batch ``X``; ``ranges``: its (first, last) offset per partition."""
        if self._running is not None:
            raise RuntimeError("the previous update was not collected (settle) before the next one")
        self._running = self._pool.submit(_learn, model, X, ranges)

    def done(self) -> bool:
        """Whether an update has finished and waits to be collected."""
        return self._running is not None and self._running.done()

    def settle(self) -> Update | None:
        """Wait for the running update, if any, and return it (re-raising what it raised)."""
        if self._running is None:
            return None
        running, self._running = self._running, None
        return running.result()

    @staticmethod
    def learn_now(model, X, ranges: dict[int, tuple[int, int]] | None = None) -> Update:
        """Learn ``X`` on the caller's thread."""
        return _learn(model, X, ranges or {})

    def close(self) -> None:
        """Let the running update finish and stop the thread."""
        self._pool.shutdown(wait=True)

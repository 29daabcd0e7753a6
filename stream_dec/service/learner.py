"""The learner: a batch's update runs on its own thread while the loop acknowledges and polls.

Invariants:

* At most one update runs at a time, in batch order (one worker thread); torch releases
  the GIL, so the update overlaps the loop's I/O.
* The service collects an update (:meth:`Learner.settle`) before the next ``predict``,
  before a checkpoint and on an assignment, so every batch is labelled by the model that
  learnt from all batches before it, exactly as offline: the labels do not depend on
  timing.
* An update given a ``plan`` (a replayed batch's journaled :class:`stream_dec.UpdatePlan`)
  redoes exactly that update, whatever the clock; the service journals the plan of every
  other update once it is done (``report.plan``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Update:
    """A finished update: its report, its batch's offset range per partition, when it ran.

    ``batch``: what the caller passed to identify the batch (the service: its journal
    line's end and labelling version); ``replayed``: it ran a journaled plan.
    """

    report: Any
    ranges: dict[int, tuple[int, int]]
    started: float
    ended: float
    batch: Any = None
    replayed: bool = False


def _learn(method: str, model, X, ranges, plan=None, batch=None) -> Update:
    t0 = time.perf_counter()
    fit = getattr(model, method)
    report = fit(X) if plan is None else fit(X, plan=plan)
    return Update(report, ranges, t0, time.perf_counter(), batch, plan is not None)


class Learner:
    """Runs ``model.partial_fit`` on a worker thread, one batch at a time.

    ``method``: the model's method to call, ``"partial_fit"`` (inputs) or
    ``"partial_fit_latent"`` (latents, the learner role).
    """

    def __init__(self, method: str = "partial_fit"):
        self.method = method
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-dec-learn")
        self._running: Future | None = None

    def start(self, model, X, ranges: dict[int, tuple[int, int]], *, plan=None, batch: Any = None) -> None:
        """Start learning batch ``X``; ``ranges``: its (first, last) offset per partition; ``plan``: redo this update."""
        if self._running is not None:
            raise RuntimeError("the previous update was not collected (settle) before the next one")
        self._running = self._pool.submit(_learn, self.method, model, X, ranges, plan, batch)

    def busy(self) -> bool:
        """Whether an update is running or waits to be collected."""
        return self._running is not None

    def done(self) -> bool:
        """Whether an update has finished and waits to be collected."""
        return self._running is not None and self._running.done()

    def settle(self) -> Update | None:
        """Wait for the running update, if any, and return it (re-raising what it raised)."""
        if self._running is None:
            return None
        running, self._running = self._running, None
        return running.result()

    def learn_now(self, model, X, ranges: dict[int, tuple[int, int]] | None = None, *, plan=None, batch: Any = None) -> Update:
        """Learn ``X`` on the caller's thread (``plan``: redo this update)."""
        return _learn(self.method, model, X, ranges or {}, plan, batch)

    def close(self) -> None:
        """Let the running update finish and stop the thread."""
        self._pool.shutdown(wait=True)

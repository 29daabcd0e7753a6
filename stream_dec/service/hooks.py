"""Hooks: callables the service calls as it works, for benchmarks and instrumentation.

Every hook defaults to doing nothing. They run on the service's threads, so they must be
quick and must not call back into the service (except :meth:`StreamService.stop`):

* ``on_poll`` runs on the loop's thread after each poll;
* ``on_batch`` and ``on_update`` run with the batch lock held, on the loop's thread
  (rebalance callbacks only record the event; the loop does the work);
* ``on_assigned`` runs on the loop's thread, after the service resumed;
* ``on_checkpoint`` runs on the checkpoint thread once a checkpoint is on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _noop(*_args: Any) -> None:
    return None


@dataclass
class BatchInfo:
    """What one processed batch did and how long each step took."""

    #: The input records of the batch (kafka-python ``ConsumerRecord``).
    records: list
    #: Next offset of every partition the batch read from.
    end: dict[int, int]
    #: Records labelled (0 for a relearnt batch).
    labelled: int
    #: Records sent to the dead-letter topic.
    dead_lettered: int
    #: Learnt again without publishing (an exactly-once replay after a crash).
    relearnt: bool
    #: ``time.perf_counter()`` when processing started.
    started: float
    #: Seconds per step: decode, wait_update (the previous update), journal, predict,
    #: send, acks (the transaction commit and every acknowledgement), checkpoint (the
    #: snapshot, when one was due), commit, and total.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ServiceHooks:
    """The service's hooks (see the module docstring for the threads they run on)."""

    #: ``(records polled, seconds the poll step took, seconds inside consumer.poll)``.
    on_poll: Callable[[int, float, float], None] = _noop
    #: A batch's outputs are acknowledged and its offsets recorded.
    on_batch: Callable[[BatchInfo], None] = _noop
    #: ``(DriftReport, started, ended)``: an update finished (``time.perf_counter()`` stamps).
    on_update: Callable[[Any, float, float], None] = _noop
    #: ``(model version, seconds)``: a checkpoint is on disk.
    on_checkpoint: Callable[[int, float], None] = _noop
    #: ``(partitions)``: partitions were assigned (an empty list: standby).
    on_assigned: Callable[[list[int]], None] = _noop

"""Progress: one log line every N batches or S seconds, and a summary when the run ends.

An operator reading the log (``docker compose logs``, journald) sees the service move
without scraping ``/metrics``: records, labels, dead letters, new cluster ids, churn and
lag since the last line; the summary adds the dead letters by reason, the model versions
and the checkpoints of the whole run.

:class:`Progress` is fed through the service's hooks (:meth:`Progress.observe`), so it
sees exactly what a benchmark sees; the loop asks :meth:`Progress.due` after each round of
batches, on its own thread.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from stream_dec.service.hooks import BatchInfo, ServiceHooks

log = logging.getLogger("stream_dec.service")


@dataclass
class Tally:
    """What a stretch of the run did (since the last progress line, or since the start)."""

    batches: int = 0
    records: int = 0
    labelled: int = 0
    dead_lettered: int = 0
    relearnt: int = 0
    updates: int = 0
    new_ids: int = 0
    churn: list[float] = field(default_factory=list)

    def add_batch(self, info: BatchInfo) -> None:
        """Count one processed batch."""
        self.batches += 1
        self.records += len(info.records)
        self.labelled += info.labelled
        self.dead_lettered += info.dead_lettered
        self.relearnt += len(info.records) if info.relearnt else 0

    def add_update(self, report) -> None:
        """Count one update's drift report."""
        self.updates += 1
        self.new_ids += len(report.new_cluster_ids)
        self.churn.append(float(report.churn))

    def describe(self) -> str:
        """``records, labelled, dead-lettered, new ids, churn`` as words.

        >>> t = Tally(batches=2, records=10, labelled=8, dead_lettered=2, updates=2, new_ids=1, churn=[0.001, 0.003])
        >>> t.describe()
        '2 batches, 10 records: 8 labelled, 2 dead-lettered; 2 updates, 1 new id, churn mean 0.20% max 0.30%'
        """
        parts = f"{self.batches:,} batches, {self.records:,} records: {self.labelled:,} labelled, {self.dead_lettered:,} dead-lettered"
        if self.relearnt:
            parts += f", {self.relearnt:,} relearnt"
        parts += f"; {self.updates:,} updates, {self.new_ids:,} new id{'' if self.new_ids == 1 else 's'}"
        if self.churn:
            parts += f", churn mean {100 * sum(self.churn) / len(self.churn):.2f}% max {100 * max(self.churn):.2f}%"
        return parts


class Progress:
    """Counts the run's batches, updates and checkpoints; says when a progress line is due.

    ``every_batches`` / ``every_s``: a line is due after that many batches or seconds since
    the last one, whichever first (0 turns either off). ``clock``: seconds, monotonic.
    """

    def __init__(self, every_batches: int, every_s: float, *, clock: Callable[[], float] = time.monotonic):
        self.every_batches = every_batches
        self.every_s = every_s
        self.total = Tally()
        self.since_line = Tally()
        self.checkpoints = 0
        self._clock = clock
        self.started = self._last_line = clock()

    def observe(self, hooks: ServiceHooks) -> ServiceHooks:
        """Hooks that feed this tally, then call ``hooks``."""

        def on_batch(info: BatchInfo) -> None:
            self.total.add_batch(info)
            self.since_line.add_batch(info)
            hooks.on_batch(info)

        def on_update(report, started: float, ended: float) -> None:
            self.total.add_update(report)
            self.since_line.add_update(report)
            hooks.on_update(report, started, ended)

        def on_checkpoint(version: int, seconds: float) -> None:
            self.checkpoints += 1
            hooks.on_checkpoint(version, seconds)

        return ServiceHooks(on_poll=hooks.on_poll, on_batch=on_batch, on_update=on_update, on_checkpoint=on_checkpoint,
                            on_assigned=hooks.on_assigned)

    def due(self) -> bool:
        """Whether a progress line is due (never before a batch since the last one).

        >>> now = [0.0]
        >>> p = Progress(every_batches=2, every_s=60, clock=lambda: now[0])
        >>> p.due()  # nothing processed yet
        False
        >>> p.since_line.batches = 2; p.due()
        True
        >>> _ = p.line(lag=0); now[0] = 61.0; p.due()  # a new stretch, with no batch in it yet
        False
        >>> p.since_line.batches = 1; p.due()  # one batch, 61 s after the last line
        True
        """
        n = self.since_line.batches
        if not n:
            return False
        by_count = bool(self.every_batches) and n >= self.every_batches
        by_time = bool(self.every_s) and self._clock() - self._last_line >= self.every_s
        return by_count or by_time

    def line(self, lag: int | None) -> str:
        """The progress line for the stretch since the last one (``lag``: records behind, summed), and start a new stretch."""
        now = self._clock()
        text = f"progress: {self.since_line.describe()} in {now - self._last_line:.1f}s; lag {'unknown' if lag is None else f'{lag:,}'}"
        self.since_line = Tally()
        self._last_line = now
        return text

    def summary(self, *, delivered: dict[str, int], failed: dict[str, int], first_version: int, last_version: int) -> str:
        """The run's summary: totals, dead letters by reason (``delivered`` and ``failed`` to send), versions, checkpoints.

        >>> p = Progress(100, 60, clock=lambda: 0.0)
        >>> p.summary(delivered={"bad_json": 2}, failed={}, first_version=3, last_version=3)
        'summary: 0 batches, 0 records: 0 labelled, 0 dead-lettered; 0 updates, 0 new ids; dead letters by reason {bad_json: 2}; model versions 3 -> 3; 0 checkpoints; 0.0s'
        """
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(collections.Counter(delivered).items()))
        text = f"summary: {self.total.describe()}; dead letters by reason {{{reasons}}}"
        if any(failed.values()):
            text += " (not delivered: {" + ", ".join(f"{r}: {n}" for r, n in sorted(failed.items()) if n) + "})"
        text += f"; model versions {first_version} -> {last_version}; {self.checkpoints} checkpoints; {self._clock() - self.started:.1f}s"
        return text

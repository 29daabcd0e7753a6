"""The checkpointer: the model and its input offsets, saved together, off the loop.

A checkpoint is the model's state plus the next offset of every input partition
(``extra["offsets"][input_topic]``), so a restart resumes exactly where the model's
knowledge ends. The state is serialised between updates (``model.snapshot``) on the
caller's thread; the file is written (fsync included) on the checkpoint thread.

Invariants:

* At most one write is in flight, and writes land in the order they were taken.
* :attr:`Checkpointer.version` (and the journal's base) advance only once a write is
  on disk: if it fails, the previous checkpoint and every journal line after it stay,
  and a restart replays from there.
* After a successful write the journal keeps just the lines the new checkpoint does not
  cover (:meth:`stream_dec.service.journal.Journal.prune`).
* With a lease (stream_dec/service/fencing.py) a checkpoint is written, and the journal
  pruned, only while the epoch it was taken under is the newest: a fenced owner writes
  no checkpoint. Each checkpoint names its writer in ``extra["owner"]`` (instance and
  epoch), so an instance that gets the partitions back can tell whether the newest
  checkpoint is the state it holds.
* A failed write is retried after 1, 2, 4, ... batches (at most ``interval``), not only
  at the next interval: the journal grows meanwhile, and every line stays until a
  checkpoint covers it, so the retry that succeeds leaves no gap.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from stream_dec.service.fencing import Fenced, OwnerLease
from stream_dec.service.journal import Journal
from stream_dec.service.metrics import ServiceMetrics

log = logging.getLogger("stream_dec.service")


class NoCheckpointError(RuntimeError):
    """The checkpoint directory holds no usable checkpoint (run ``stream-dec train`` first)."""


def read_newest(settings):
    """The newest valid checkpoint of ``settings.checkpoint.dir``, with the service's update budgets applied.

    Raises :class:`stream_dec.checkpoint.CheckpointError` when none is usable.
    """
    from stream_dec import StreamDEC

    model = StreamDEC.load(Path(settings.checkpoint.dir), device=settings.model.device)
    model.set_params(online_steps=settings.update.max_steps, max_update_ms=settings.update.max_ms, verbose=False)
    return model


def newest_or_none(settings):
    """:func:`read_newest`, or None when the directory holds no usable checkpoint."""
    from stream_dec import CheckpointError

    try:
        return read_newest(settings)
    except CheckpointError:
        return None


def load_newest(settings):
    """:func:`read_newest`, or :class:`NoCheckpointError` saying how to create one."""
    from stream_dec import CheckpointError

    directory = Path(settings.checkpoint.dir)
    try:
        model = read_newest(settings)
    except CheckpointError as exc:
        raise NoCheckpointError(
            f"no usable checkpoint in {directory} ({exc}); create one with "
            f"`stream-dec train --data FILE --n-clusters K --checkpoint-dir {directory}`"
        ) from None
    log.info("loaded %s (model version %d, %d clusters)", model.checkpoint_path_, model.version_, model.n_clusters_)
    return model


def checkpoint_owner(model) -> dict | None:
    """Who wrote the model's checkpoint: ``{"instance": ..., "epoch": ...}``, or None (``stream-dec train``, an older service)."""
    extra = getattr(model, "checkpoint_extra_", {}) or {}
    owner = extra.get("owner")
    return dict(owner) if isinstance(owner, dict) else None


def checkpoint_offsets(model, topic: str) -> dict[int, int]:
    """The next offset of every partition of ``topic`` stored in the model's checkpoint ({} if none)."""
    extra = getattr(model, "checkpoint_extra_", {}) or {}
    by_topic = extra.get("offsets", {})
    return {int(p): int(o) for p, o in by_topic.get(topic, {}).items()}


class Checkpointer:
    """Takes checkpoints of a model every ``interval`` batches and writes them on its own thread.

    ``version``: the newest checkpoint on disk (the one loaded, at first).
    ``on_written(version, seconds)`` runs on the checkpoint thread after each write;
    ``on_fenced(Fenced)`` there when the lease refused one.
    ``lease``: write only under the epoch a checkpoint was taken with (None: no fencing).
    """

    def __init__(self, directory: str | Path, *, journal: Journal, topic: str, version: int, keep: int = 3,
                 interval: int = 10, metrics: ServiceMetrics | None = None,
                 on_written: Callable[[int, float], None] | None = None, lease: OwnerLease | None = None,
                 on_fenced: Callable[[Fenced], None] | None = None):
        self.directory = Path(directory)
        self.journal = journal
        self.topic = topic
        self.version = int(version)
        self.keep = keep
        self.interval = interval
        self.metrics = metrics or ServiceMetrics()
        self._on_written = on_written or (lambda version, seconds: None)
        self.lease = lease
        self._on_fenced = on_fenced or (lambda exc: None)
        #: The writer of the newest checkpoint written here (``extra["owner"]``), None before the first.
        self.written_by: dict | None = None
        self._since = 0  # batches since the last checkpoint taken
        self._failures = 0  # consecutive failed writes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-dec-checkpoint")
        self._writing: Future | None = None

    def batch_done(self) -> bool:
        """Count one processed batch; True when a checkpoint is due (sooner after a failed write)."""
        self._since += 1
        due = self.interval if not self._failures else min(self.interval, 2 ** (self._failures - 1))
        return self._since >= due

    def take(self, model, offsets: dict[int, int], *, wait: bool = True, owner: dict | None = None) -> None:
        """Serialise ``model`` with ``offsets`` now; write it on the checkpoint thread.

        Call between updates. Waits for the previous write first; with ``wait`` it also
        waits for this one (shutdown, revocation) and raises what the write raised.
        ``owner``: ``{"instance", "epoch"}`` of the writer, stored in ``extra["owner"]``;
        with a lease the file is written only while that epoch is the newest.
        """
        self.wait()
        t0 = time.perf_counter()
        offsets = dict(offsets)
        extra = {"offsets": {self.topic: {str(p): o for p, o in offsets.items()}}}
        if owner is not None:
            extra["owner"] = dict(owner)
        data = model.snapshot(extra=extra)
        self._since = 0
        self._writing = self._writer.submit(self._write, data, int(model.version_), offsets, t0, extra.get("owner"))
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight, if any, is done (re-raising what it raised)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def reset(self, version: int, written_by: dict | None = None) -> None:
        """A checkpoint was loaded from disk: it is the one new journal lines follow."""
        self.wait()
        self.version = self.journal.base = int(version)
        self.written_by = written_by
        self._since = 0

    def close(self) -> None:
        """Finish the write in flight and stop the thread."""
        self._writer.shutdown(wait=True)

    def _write(self, data: bytes, version: int, offsets: dict[int, int], t0: float, owner: dict | None) -> None:
        # The file is written outside the lock (a newer owner's claim must not wait for
        # a slow disk); the epoch is checked before it and again, under the lock, before
        # the journal is pruned and the version advances.
        try:
            with self._guard(owner):
                pass
            _save(self.directory, data, version, self.keep)
            with self._guard(owner):
                self.journal.prune(version, offsets)
        except Fenced as exc:
            log.error("checkpoint of model version %d refused: %s", version, exc)
            self._on_fenced(exc)
            return
        except OSError:
            # The previous checkpoint and its journal lines stay: a restart replays from there.
            self._failures += 1
            self.metrics.ckpt_failures.inc()
            log.exception("checkpoint failed (%d in a row); retrying after %d batches", self._failures,
                          min(self.interval, 2 ** (self._failures - 1)))
            return
        self._failures = 0
        self.version = version
        self.written_by = owner
        seconds = time.perf_counter() - t0
        self.metrics.checkpoint_written(seconds)
        self._on_written(version, seconds)

    def _guard(self, owner: dict | None):
        if self.lease is None:
            return contextlib.nullcontext()
        return self.lease.guard(None if owner is None else owner.get("epoch"))


def _save(directory: Path, data: bytes, version: int, keep: int) -> None:
    from stream_dec import checkpoint as ckpt

    ckpt.save_to_directory(directory, data, seq=version, keep=keep)

"""The batch journal: where each micro-batch ended, written before its outputs leave.

Records re-read after a crash are cut at the journaled ends, so the (deterministic)
model sees the same batches and publishes the same labels: duplicates are exact copies.
One JSON object per line, in processing order::

    {"base": 12, "labelled_by": 14, "end": {"0": 5120, "3": 4096}, "epoch": 3}
    {"base": 12, "labelled_by": 14, "end": {"0": 5120, "3": 4096}, "epoch": 3, "plan": {"steps": 2, ...}}

``base`` is the version of the checkpoint the line follows, ``labelled_by`` the model
version that labelled the batch, ``end`` the next offset of every input partition the
batch read from, ``epoch`` the owner epoch of the writer (stream_dec/service/fencing.py).
Once the batch's update is done, a second line with the same ``end`` carries its
``plan`` (:class:`stream_dec.UpdatePlan`, what of the update ran before its time
budget cut it); reading merges it into the batch's line, so a replay redoes exactly
that update. Any further keys are kept as written (:attr:`JournalLine.fields`).

Invariants:

* A line is appended, flushed (and fsynced when the journal is ``durable``) before any
  output of its batch is sent. A process crash keeps every appended line; only a
  machine crash can lose unsynced ones, and a torn last line is skipped when read.
* The lines whose ``base`` is a checkpoint's version describe, in order, the batches
  that followed that checkpoint. New lines take :attr:`Journal.base`, the newest
  checkpoint known to be on disk (not one still being written). Lines of an older base
  that a newer checkpoint does not cover (its write landed, the prune did not) describe
  the batches after it too.
* Epochs never decrease along the file: a line with a lower epoch than one before it
  was written by a fenced owner after the newer one took over, and is ignored.
* :meth:`Journal.prune` runs once a checkpoint is on disk: it keeps exactly the lines of
  the current base whose batches the checkpoint does not cover, re-based on the new
  checkpoint, and replaces the file durably (temp file, fsync, rename, fsync of the
  directory): a crash leaves the old journal or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_dec.checkpoint import write_atomic

#: File name of the journal inside the checkpoint directory.
JOURNAL = "batches.jsonl"
_CORE = ("base", "labelled_by", "end")


@dataclass(frozen=True)
class JournalLine:
    """One journaled batch boundary.

    >>> line = JournalLine(base=3, labelled_by=4, end={0: 10, 2: 7}, fields={"epoch": 2})
    >>> line.to_json()
    '{"base": 3, "labelled_by": 4, "end": {"0": 10, "2": 7}, "epoch": 2}'
    >>> JournalLine.from_json(line.to_json()) == line
    True
    >>> JournalLine.from_json('{"base": 3, "end": {"0"') is None  # torn by a crash mid-write
    True
    >>> line.covered_by({0: 10, 2: 9}), line.covered_by({0: 10})
    (True, False)
    """

    base: int
    labelled_by: int
    end: dict[int, int]
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The line as written (no newline)."""
        entry = {"base": self.base, "labelled_by": self.labelled_by, "end": {str(p): o for p, o in self.end.items()}}
        entry.update(self.fields)
        return json.dumps(entry)

    @classmethod
    def from_json(cls, text: str) -> JournalLine | None:
        """Parse one line; None for a line that is not a complete entry (torn by a crash)."""
        try:
            entry = json.loads(text)
            return cls(
                base=int(entry["base"]),
                labelled_by=int(entry.get("labelled_by", -1)),
                end={int(p): int(o) for p, o in entry["end"].items()},
                fields={k: v for k, v in entry.items() if k not in _CORE},
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def covered_by(self, offsets: dict[int, int]) -> bool:
        """Whether a model at these next offsets has already learnt this batch."""
        return all(offsets.get(p, 0) >= o for p, o in self.end.items())

    def continues(self, version: int, offsets: dict[int, int]) -> bool:
        """Whether this line, of an older base, describes a batch after checkpoint ``version`` (at ``offsets``).

        So it is when that checkpoint's write landed and the prune after it did not:
        the line follows an older checkpoint, was labelled by ``version`` or later, and
        the checkpoint has not learnt its batch.

        >>> line = JournalLine(base=3, labelled_by=5, end={0: 30})
        >>> line.continues(5, {0: 20}), line.continues(5, {0: 30}), line.continues(6, {0: 20})
        (True, False, False)
        """
        return self.base < version <= self.labelled_by and not self.covered_by(offsets)

    def rebased(self, base: int) -> JournalLine:
        """The same line, following checkpoint ``base``."""
        return JournalLine(base, self.labelled_by, self.end, self.fields)


class Journal:
    """The journal file of one checkpoint directory; thread-safe.

    ``base``: the version of the newest checkpoint on disk, which new lines follow.
    ``durable``: fsync every appended line (exactly-once relearns committed batches at
    exactly these boundaries after a machine crash too).
    """

    def __init__(self, path: str | os.PathLike, *, base: int, durable: bool = False):
        self.path = Path(path)
        self.base = int(base)
        self.durable = durable
        # Appends (loop thread) and the prune (checkpoint thread) must not interleave.
        self._lock = threading.Lock()

    def append(self, end: dict[int, int], labelled_by: int, **fields: Any) -> JournalLine:
        """Write a batch's boundary; call before any of its outputs is sent."""
        with self._lock:
            line = JournalLine(self.base, int(labelled_by), dict(end), fields)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line.to_json() + "\n")
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            return line

    def seal(self) -> bool:
        """End a torn last line (a crash mid-write) so that the next line starts on its own.

        Without it the next append would continue the torn text and be unreadable too.
        Call when taking the journal over (the previous writer is gone). Returns whether
        a line was torn.
        """
        with self._lock:
            if not self.path.exists() or self.path.stat().st_size == 0:
                return False
            with open(self.path, "rb+") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) == b"\n":
                    return False
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            return True

    def lines(self) -> list[JournalLine]:
        """Every complete line, in order (torn ones skipped)."""
        with self._lock:
            return self._read()

    def following(self, version: int, offsets: dict[int, int] | None = None) -> list[JournalLine]:
        """The lines describing the batches after checkpoint ``version`` (holding ``offsets``), in order.

        Lines of ``version``, and lines of an older base that ``offsets`` do not cover.
        After a fall-back past a corrupt checkpoint the lines in the file follow a newer
        version and none are returned: the batches are then cut by size.
        """
        return [line for line in self.lines() if line.base == version or (offsets is not None and line.continues(version, offsets))]

    def prune(self, version: int, offsets: dict[int, int]) -> int:
        """Checkpoint ``version`` (holding ``offsets``) is on disk: keep only what follows it.

        Lines of the current base whose batches the checkpoint does not cover are kept,
        re-based on ``version``; everything else goes. New lines follow ``version`` from
        here on. Returns the number of lines kept.
        """
        with self._lock:
            keep = [line.rebased(version) for line in self._read()
                    if (line.base == self.base or line.continues(self.base, offsets)) and not line.covered_by(offsets)]
            # A crash leaves the old file or the new one (temp file, fsync, rename, fsync of the directory).
            write_atomic(self.path, "".join(line.to_json() + "\n" for line in keep).encode("utf-8"))
            self.base = int(version)
            return len(keep)

    def _read(self) -> list[JournalLine]:
        if not self.path.exists():
            return []
        parsed = (JournalLine.from_json(text) for text in self.path.read_text(encoding="utf-8").splitlines())
        return merge_lines(line for line in parsed if line is not None)


def merge_lines(lines) -> list[JournalLine]:
    """Batch lines in file order: plan lines merged into their batch's line, fenced writers' lines dropped.

    >>> a = JournalLine(0, 1, {0: 10}, {"epoch": 1})
    >>> plan = JournalLine(0, 1, {0: 10}, {"epoch": 1, "plan": {"steps": 2}})
    >>> stray = JournalLine(0, 1, {0: 30}, {"epoch": 1})
    >>> b = JournalLine(0, 2, {0: 20}, {"epoch": 2})
    >>> [(line.end, line.fields) for line in merge_lines([a, plan, b, stray])]
    [({0: 10}, {'epoch': 1, 'plan': {'steps': 2}}), ({0: 20}, {'epoch': 2})]
    """
    out: list[JournalLine] = []
    at: dict[tuple, int] = {}  # (base, end) -> index in out
    newest_epoch = 0
    for line in lines:
        epoch = line.fields.get("epoch")
        if isinstance(epoch, int):
            if epoch < newest_epoch:
                continue  # written by an owner fenced before it noticed
            newest_epoch = epoch
        key = (line.base, tuple(sorted(line.end.items())))
        if "plan" in line.fields and key in at:
            i = at[key]
            out[i] = JournalLine(out[i].base, out[i].labelled_by, out[i].end, {**out[i].fields, "plan": line.fields["plan"]})
            continue
        at[key] = len(out)
        out.append(line)
    return out

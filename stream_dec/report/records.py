"""Output records of the service, parsed and checked: what a report is drawn from.

The output topic holds three kinds of JSON records (docs/contracts.md, "Output"):
``assignment`` (one per labelled input record), ``drift`` (one per micro-batch) and
``lifecycle`` (one per event in an id's life; planned, handled when present). A record
of any other kind means the wrong topic or a newer producer than this reader: both
stop the report rather than draw something wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

KINDS = ("assignment", "drift", "lifecycle")
_ASSIGNMENT_INTS = ("cluster", "model_version", "partition", "offset")


class ReportError(ValueError):
    """Input a report cannot be drawn from (no records, a wrong topic, an unknown kind): one line for the user."""


@dataclass
class Stream:
    """Everything a report shows, read from an output topic or a file of its records.

    Assignments are column arrays (one entry per assignment record, duplicates
    included); drift and lifecycle records are kept as their parsed dicts, in the
    order read. ``time_ms`` is the first and last record time (None for a file, whose
    lines carry no record times); ``dlq`` maps dead-letter reasons to counts (None when
    no dead-letter topic was read).
    """

    source: str
    items: list[str] = field(default_factory=list)
    cluster: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    version: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    topic: list[str] = field(default_factory=list)
    partition: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    drifts: list[dict] = field(default_factory=list)
    lifecycle: list[dict] = field(default_factory=list)
    time_ms: tuple[int, int] | None = None
    dlq: dict[str, int] | None = None

    @property
    def n_records(self) -> int:
        """Output records read, of every kind."""
        return len(self.items) + len(self.drifts) + len(self.lifecycle)


def _int_field(rec: dict, name: str, where: str) -> int:
    value = rec.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{where}: {rec.get('kind')} record without an integer {name!r} (got {value!r})")
    return value


def _loads(value: Any, where: str) -> dict:
    """The JSON object a record value holds (bytes, text or an already parsed dict)."""
    if isinstance(value, dict):
        return value
    if value is None:
        raise ReportError(f"{where}: a record without a value (not an output record of stream-dec)")
    try:
        rec = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{where}: not a JSON record ({exc})") from None
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def parse_records(values: Iterable[tuple[str, Any]], source: str, allow_empty: bool = False) -> Stream:
    """A :class:`Stream` from ``(where, value)`` pairs; ``where`` names the record in error messages.

    Raises :class:`ReportError` for a value that is not a JSON object, a record of an
    unknown ``kind``, an assignment without its integer fields, or no records at all
    (unless ``allow_empty``).

    >>> s = parse_records([("line 1", '{"kind": "assignment", "id": "a", "cluster": 3, "model_version": 0,'
    ...                     ' "topic": "t", "partition": 0, "offset": 7}'), ("line 2", '{"kind": "drift", "model_version": 1}')], "x")
    >>> s.n_records, s.cluster.tolist(), len(s.drifts)
    (2, [3], 1)
    >>> parse_records([("line 1", '{"kind": "labels"}')], "x")
    Traceback (most recent call last):
    ...
    stream_dec.report.records.ReportError: line 1: unknown record kind 'labels' (an output topic of stream-dec holds assignment, drift, lifecycle)
    """
    stream = Stream(source)
    cols: dict[str, list[int]] = {name: [] for name in _ASSIGNMENT_INTS}
    for where, value in values:
        rec = _loads(value, where)
        kind = rec.get("kind")
        if kind == "assignment":
            for name in _ASSIGNMENT_INTS:
                cols[name].append(_int_field(rec, name, where))
            stream.items.append(str(rec.get("id")))
            stream.topic.append(str(rec.get("topic")))
        elif kind == "drift":
            _int_field(rec, "model_version", where)
            stream.drifts.append(rec)
        elif kind == "lifecycle":
            _int_field(rec, "cluster", where)
            _int_field(rec, "model_version", where)
            stream.lifecycle.append(rec)
        else:
            raise ReportError(f"{where}: unknown record kind {kind!r} (an output topic of stream-dec holds {', '.join(KINDS)})")
    stream.cluster, stream.version = np.array(cols["cluster"], np.int64), np.array(cols["model_version"], np.int64)
    stream.partition, stream.offset = np.array(cols["partition"], np.int64), np.array(cols["offset"], np.int64)
    if not stream.n_records and not allow_empty:
        raise ReportError(f"{source}: no records")
    return stream


def read_records_file(path: str | Path) -> Stream:
    """A :class:`Stream` from a file of output record values, one JSON object a line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"--records {p}: no such file")
    with p.open("rb") as fh:
        lines = [(f"{p.name} line {n}", line) for n, line in enumerate(fh, 1) if line.strip()]
    return parse_records(lines, source=str(p))

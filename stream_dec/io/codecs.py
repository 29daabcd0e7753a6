"""Encoding and decoding of the service's Kafka records (DESIGN.md §3, "Kafka records").

Input values are JSON ``{"id": str, "embedding": [float, ...]}`` or, with the header
``content-type: application/x-float32``, raw little-endian float32 bytes whose item id
is the record key. :func:`decode_record` turns either into ``(item_id, float32 vector)``
or raises :class:`DecodeError` with a short, stable ``reason`` code that the service
puts on the dead-letter record (see :data:`REASONS` and ``schemas/dlq-headers.schema.json``).

Output values (assignment and drift records) are compact JSON; their JSON Schemas are
in ``stream_dec/schemas/``. No torch import here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

CONTENT_TYPE_HEADER = "content-type"
CONTENT_TYPE_FLOAT32 = "application/x-float32"
CONTENT_TYPE_JSON = "application/json"
DEFAULT_MAX_BYTES = 1_048_576

#: Stage of a failure: the bytes could not be turned into (id, vector) ...
STAGE_DECODE = "decode"
#: ... or they could, but the vector is unusable.
STAGE_VALIDATE = "validate"

#: Every reason code :func:`decode_record` can raise, with its stage and meaning.
REASONS: dict[str, tuple[str, str]] = {
    "null_value": (STAGE_DECODE, "the record has no value (tombstone)"),
    "too_large": (STAGE_DECODE, "the value is larger than the size limit"),
    "unsupported_content_type": (STAGE_DECODE, "the content-type header names a format other than JSON or float32"),
    "bad_json": (STAGE_DECODE, "the value is not valid UTF-8 JSON (NaN/Infinity literals included)"),
    "not_object": (STAGE_DECODE, "the JSON value is not an object"),
    "missing_id": (STAGE_DECODE, 'the JSON object has no "id"'),
    "bad_id": (STAGE_DECODE, '"id" is not a non-empty string'),
    "missing_embedding": (STAGE_DECODE, 'the JSON object has no "embedding"'),
    "bad_embedding": (STAGE_DECODE, '"embedding" is not a flat array of numbers'),
    "missing_key": (STAGE_DECODE, "a float32 record has no key (the key is its item id)"),
    "bad_key": (STAGE_DECODE, "the key of a float32 record is not UTF-8"),
    "bad_length": (STAGE_DECODE, "the float32 value's length is not a multiple of 4 bytes"),
    "empty": (STAGE_VALIDATE, "the embedding has no values"),
    "wrong_dimension": (STAGE_VALIDATE, "the embedding's length differs from the model's input dimension"),
    "non_finite": (STAGE_VALIDATE, "the embedding holds NaN or infinite values (after conversion to float32)"),
}

_F32 = np.dtype("<f4")
_MAX_DETAIL = 500
_CONNECT = "__connect.errors."
#: Header holding the machine-readable reason code (Kafka Connect has no such field).
REASON_HEADER = "__stream_dec.errors.reason"


class DecodeError(ValueError):
    """An input record that cannot be used: ``stage``, stable ``reason`` code, human ``detail``."""

    def __init__(self, stage: str, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep pickling (multiprocessing workers) working with the 3-arg init
        return (type(self), (self.stage, self.reason, self.detail))


def _fail(reason: str, detail: str) -> DecodeError:
    return DecodeError(REASONS[reason][0], reason, detail)


def content_type(headers: Iterable[tuple[str, bytes | None]] | None) -> str | None:
    """The media type named by a record's ``content-type`` header (lower case, parameters dropped), or None."""
    if not headers:
        return None
    for name, value in headers:
        if name.lower() == CONTENT_TYPE_HEADER and value is not None:
            text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
            return text.split(";", 1)[0].strip().lower()
    return None


def _check_vector(vec: np.ndarray, dim: int | None) -> np.ndarray:
    if vec.size == 0:
        raise _fail("empty", "the embedding has 0 values")
    if dim is not None and vec.shape[0] != dim:
        raise _fail("wrong_dimension", f"expected {dim} values, got {vec.shape[0]}")
    if not np.isfinite(vec).all():
        bad = int(np.count_nonzero(~np.isfinite(vec)))
        raise _fail("non_finite", f"{bad} of {vec.shape[0]} values are NaN or infinite as float32")
    return vec


def _decode_float32(key: bytes | None, value: bytes) -> tuple[str, np.ndarray]:
    if not key:
        raise _fail("missing_key", "a float32 record needs its item id as the key")
    try:
        item_id = key.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("bad_key", f"key {key[:40]!r} is not UTF-8") from None
    if len(value) % 4:
        raise _fail("bad_length", f"{len(value)} bytes is not a multiple of 4")
    # frombuffer is a zero-copy view; astype only copies on big-endian hosts.
    return item_id, np.frombuffer(value, dtype=_F32).astype(np.float32, copy=False)


def _decode_json(value: bytes) -> tuple[str, np.ndarray]:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _fail("bad_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise _fail("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise _fail("missing_id", 'the object has no "id" field')
    item_id = obj["id"]
    if not isinstance(item_id, str) or not item_id:
        raise _fail("bad_id", f'"id" must be a non-empty string, got {item_id!r:.60}')
    if "embedding" not in obj:
        raise _fail("missing_embedding", 'the object has no "embedding" field')
    emb = obj["embedding"]
    if not isinstance(emb, list):
        raise _fail("bad_embedding", f'"embedding" must be an array, got {type(emb).__name__}')
    # Letting numpy infer the dtype is the cheapest strict check: strings, nulls, nested
    # arrays and all-boolean arrays come out as a non-numeric kind or raise.
    try:
        arr = np.array(emb)
    except (ValueError, OverflowError):
        raise _fail("bad_embedding", '"embedding" must be a flat array of numbers') from None
    if arr.ndim != 1 or arr.dtype.kind not in "fiu":  # an empty list is float64, so it reaches the "empty" check
        raise _fail("bad_embedding", '"embedding" must be a flat array of numbers')
    with np.errstate(over="ignore"):  # values beyond float32 range become inf: reported as non_finite
        return item_id, arr.astype(np.float32)


def decode_record(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None = None,
    *,
    dim: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[str, np.ndarray]:
    """Decode one input record into ``(item_id, 1-d float32 vector)``.

    ``dim`` is the expected vector length (None accepts any non-empty length);
    ``max_bytes`` bounds the value size. Raises :class:`DecodeError` otherwise.
    """
    if value is None:
        raise _fail("null_value", "the record has no value")
    if len(value) > max_bytes:
        raise _fail("too_large", f"{len(value)} bytes is over the limit of {max_bytes}")
    ctype = content_type(headers)
    if ctype == CONTENT_TYPE_FLOAT32:
        item_id, vec = _decode_float32(key, value)
    elif ctype is None or ctype == CONTENT_TYPE_JSON:
        item_id, vec = _decode_json(value)
    else:
        raise _fail("unsupported_content_type", f"content-type {ctype!r:.60} (use {CONTENT_TYPE_JSON} or {CONTENT_TYPE_FLOAT32})")
    return item_id, _check_vector(vec, dim)


class DecodedBatch:
    """A decoded micro-batch: ``ids`` and the ``(n, dim)`` float32 matrix ``X`` of the usable
    records, their positions ``valid`` in the input, and ``failures`` as ``(position, DecodeError)``."""

    __slots__ = ("ids", "X", "valid", "failures")

    def __init__(self, ids: list[str], X: np.ndarray, valid: list[int], failures: list[tuple[int, DecodeError]]):
        self.ids = ids
        self.X = X
        self.valid = valid
        self.failures = failures


def decode_batch(
    records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes | None]] | None]],
    *,
    dim: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DecodedBatch:
    """Decode ``(key, value, headers)`` triples at once; same results as :func:`decode_record` on each.

    float32 records of the right length are checked together (one ``frombuffer``, one
    finiteness test for the batch: 2 us a record instead of 6). JSON records, and any
    float32 record that misses the fast path, go through :func:`decode_record`, so every
    failure carries exactly the reason a single decode would give. (For JSON the parse
    itself dominates; batching its conversion measured slower than per record.)
    """
    nbytes = 4 * dim
    fast_pos: list[int] = []
    fast_ids: list[str] = []
    raw: list[bytes] = []
    rest: list[int] = []
    for i, (key, value, headers) in enumerate(records):
        if headers and key and value is not None and len(value) == nbytes and nbytes <= max_bytes and content_type(headers) == CONTENT_TYPE_FLOAT32:
            try:
                fast_ids.append(key.decode("utf-8"))
            except UnicodeDecodeError:
                rest.append(i)
                continue
            fast_pos.append(i)
            raw.append(value)
        else:
            rest.append(i)
    # A bytearray keeps the matrix writable (torch.from_numpy warns on read-only memory).
    X_fast = np.frombuffer(bytearray().join(raw), dtype=_F32).reshape(len(raw), dim)
    finite = np.isfinite(X_fast).all(axis=1)
    if not finite.all():  # decode_record words the non_finite failure
        rest.extend(p for p, ok in zip(fast_pos, finite) if not ok)
        rest.sort()
        fast_ids = [item for item, ok in zip(fast_ids, finite) if ok]
        fast_pos = [p for p, ok in zip(fast_pos, finite) if ok]
        X_fast = X_fast[finite]
    if not rest:
        return DecodedBatch(fast_ids, X_fast, fast_pos, [])
    failures: list[tuple[int, DecodeError]] = []
    ids, vecs, pos = [], [], []
    for i in rest:
        key, value, headers = records[i]
        try:
            item_id, vec = decode_record(key, value, headers, dim=dim, max_bytes=max_bytes)
        except DecodeError as err:
            failures.append((i, err))
            continue
        ids.append(item_id)
        vecs.append(vec)
        pos.append(i)
    if not fast_pos:
        X = np.stack(vecs) if vecs else np.empty((0, dim), dtype=np.float32)
        return DecodedBatch(ids, X, pos, failures)
    # Both kinds in one batch: merge back into input order.
    all_ids, all_pos = fast_ids + ids, fast_pos + pos
    order = np.argsort(np.asarray(all_pos), kind="stable")
    X = np.concatenate([X_fast, np.stack(vecs)]) if vecs else X_fast
    return DecodedBatch([all_ids[j] for j in order], X[order], [all_pos[j] for j in order], failures)


def _vector(vec: Any) -> np.ndarray:
    arr = np.asarray(vec, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-d vector, got shape {arr.shape}")
    return np.ascontiguousarray(arr)  # orjson serialises C-contiguous arrays only


def encode_float32(vec: Any) -> bytes:
    """Raw little-endian float32 bytes of a 1-d vector (send with header ``content-type: application/x-float32``)."""
    return _vector(vec).astype(_F32, copy=False).tobytes()


def encode_json(item_id: str, vec: Any) -> bytes:
    """The JSON input value ``{"id": item_id, "embedding": [...]}`` with float32-exact numbers."""
    # orjson writes float32 in shortest round-trip form, so decoding restores identical values.
    return orjson.dumps({"id": str(item_id), "embedding": _vector(vec)}, option=orjson.OPT_SERIALIZE_NUMPY)


def _finite_or_none(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def encode_assignment(
    item_id: str,
    cluster: int,
    confidence: float,
    model_version: int,
    topic: str,
    partition: int,
    offset: int,
    **extra: Any,
) -> bytes:
    """JSON value of an ``assignment`` output record (one per valid input record).

    ``extra`` adds fields (JSON-serialisable) after the fixed ones; it may not replace them.
    """
    rec = {
        "kind": "assignment",
        "id": str(item_id),
        "cluster": int(cluster),
        # A float32 stays float32 so orjson writes its short form (0.9, not 0.8999999761581421).
        "confidence": confidence if isinstance(confidence, np.float32) else float(confidence),
        "model_version": int(model_version),
        "topic": str(topic),
        "partition": int(partition),
        "offset": int(offset),
    }
    return _with_extra(rec, extra)


def encode_assignments(
    ids: Sequence[str],
    clusters: Sequence[int],
    confidences: np.ndarray,
    model_version: int,
    topic: str,
    partitions: Sequence[int],
    offsets: Sequence[int],
) -> list[bytes]:
    """:func:`encode_assignment` for a whole batch (same bytes; no ``extra`` fields).

    The service's per-record budget is a few microseconds: this skips the per-call
    conversions and checks (``clusters``/``partitions``/``offsets`` are Python ints,
    ``confidences`` a float32 array).
    """
    dumps, opt = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    version = int(model_version)
    topic = str(topic)
    conf = np.asarray(confidences, dtype=np.float32)
    return [
        dumps(
            {"kind": "assignment", "id": i, "cluster": c, "confidence": q, "model_version": version, "topic": topic, "partition": p, "offset": o},
            option=opt,
        )
        for i, c, q, p, o in zip(ids, clusters, conf, partitions, offsets)
    ]


_DRIFT_REQUIRED = ("model_version", "n_items", "update_ms", "churn", "centre_shift", "novelty_rate", "new_cluster_ids", "n_clusters")
_DRIFT_OPTIONAL = ("steps", "buffer_size", "budget_exhausted", "guard_action")
_DRIFT_FLOATS = ("update_ms", "churn", "centre_shift", "novelty_rate")


def encode_drift(report: Any, *, topic: str, offset_ranges: Mapping[int, tuple[int, int]], **extra: Any) -> bytes:
    """JSON value of a ``drift`` output record (one per micro-batch).

    ``report`` is a :class:`stream_dec.DriftReport` (or a mapping with the same fields);
    ``offset_ranges`` maps each source partition of the batch to its ``(first, last)``
    offsets, both inclusive. Non-finite metrics become ``null``.
    """
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    missing = [k for k in _DRIFT_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"drift report lacks {', '.join(missing)}")
    rec: dict[str, Any] = {"kind": "drift"}
    for k in _DRIFT_REQUIRED + _DRIFT_OPTIONAL:
        if k not in data:
            continue
        v = data[k]
        if k in _DRIFT_FLOATS:
            v = _finite_or_none(v)
        elif k == "new_cluster_ids":
            v = [int(i) for i in v]
        elif k == "budget_exhausted":
            v = bool(v)
        elif k == "guard_action":
            v = str(v)
        else:
            v = int(v)
        rec[k] = v
    rec["topic"] = str(topic)
    rec["offset_ranges"] = [
        {"partition": int(p), "first_offset": int(first), "last_offset": int(last)} for p, (first, last) in sorted(offset_ranges.items())
    ]
    return _with_extra(rec, extra)


def _with_extra(rec: dict, extra: dict) -> bytes:
    clash = sorted(set(extra) & set(rec))
    if clash:
        raise ValueError(f"extra fields may not replace fixed ones: {', '.join(clash)}")
    rec.update(extra)
    return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)


def dlq_headers(
    original_headers: Iterable[tuple[str, bytes | None]] | None,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
    reason: str,
    detail: str,
    *,
    exception_class: str = f"{__name__}.DecodeError",
) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record: the original ones plus Kafka Connect style ``__connect.errors.*``.

    Stale ``__connect.errors.*`` / reason headers from an earlier failure (a record
    replayed out of a DLQ) are replaced, so each name appears once. The message is
    ``"<reason>: <detail>"``, and ``__stream_dec.errors.reason`` carries the bare code.
    """
    kept = [(k, v) for k, v in (original_headers or ()) if not k.startswith(_CONNECT) and k != REASON_HEADER]
    detail = detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "..."
    added = [
        (_CONNECT + "topic", topic),
        (_CONNECT + "partition", str(int(partition))),
        (_CONNECT + "offset", str(int(offset))),
        (_CONNECT + "stage", stage),
        (_CONNECT + "exception.class.name", exception_class),
        (_CONNECT + "exception.message", f"{reason}: {detail}"),
        (REASON_HEADER, reason),
    ]
    return kept + [(k, v.encode("utf-8")) for k, v in added]


def dlq_headers_for(error: DecodeError, original_headers, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """:func:`dlq_headers` for a :class:`DecodeError`."""
    return dlq_headers(original_headers, topic, partition, offset, error.stage, error.reason, error.detail)

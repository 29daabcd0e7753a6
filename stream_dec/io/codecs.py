"""Encoding and decoding of the service's Kafka records (the contract is in docs/contracts.md).

Input values are JSON ``{"id": str, "embedding": [float, ...]}`` or, with the header
``content-type: application/x-float32``, raw little-endian float32 bytes whose item id
is the record key. :func:`decode_batch` (and :func:`decode_record`, one at a time) take
whatever a Kafka consumer hands over -- key and value ``None`` or bytes of any size,
headers ``None`` or ``(name, bytes | None)`` pairs -- and turn each record into
``(item_id, float32 vector)`` or a :class:`DecodeError` with a short, stable ``reason``:

========================  ========  ===========================================================
reason                    stage     when
========================  ========  ===========================================================
null_value                decode    the value is null (a tombstone), with or without a key
too_large                 decode    the value is longer than ``max_bytes``
key_too_large             decode    the key is longer than ``max_key_bytes``
unsupported_content_type  decode    ``content-type`` names neither JSON nor float32
bad_json                  decode    the value is not UTF-8 JSON (NaN/Infinity literals included)
not_object                decode    the JSON value is not an object
missing_id                decode    the object has no ``"id"``
bad_id                    decode    ``"id"`` is not a non-empty string
id_too_large              decode    the item id is longer than ``max_id_bytes`` as UTF-8
missing_embedding         decode    the object has no ``"embedding"``
bad_embedding             decode    ``"embedding"`` is not a flat array of numbers
missing_key               decode    a float32 record has no key (its item id)
bad_key                   decode    a float32 record's key is not UTF-8
bad_length                decode    a float32 value's length is not a multiple of 4
empty                     validate  the embedding has no values
wrong_dimension           validate  the embedding's length is not the model's input dimension
non_finite                validate  a value is NaN or infinite as float32
========================  ========  ===========================================================

The same table is :data:`REASONS`, and the enum of ``schemas/dlq-headers.schema.json``.
A failure goes to the dead-letter topic as :func:`dead_letter` builds it: always
sendable by kafka-python and bounded in size, whatever the input record was.

>>> item_id, vec = decode_record(None, b'{"id": "doc-1", "embedding": [0.5, -1, 2]}')
>>> item_id, vec.dtype.name, vec.tolist()
('doc-1', 'float32', [0.5, -1.0, 2.0])
>>> decode_record(b"doc-2", encode_float32([1.5, 2.0]), [("content-type", b"application/x-float32")])
('doc-2', array([1.5, 2. ], dtype=float32))
>>> try:
...     decode_record(None, b'{"id": "doc-3", "embedding": [1, 2]}', dim=3)
... except DecodeError as err:
...     print(err.stage, err.reason, "-", err.detail)
validate wrong_dimension - expected 3 values, got 2

Output values (assignment and drift records) are compact JSON; their JSON Schemas are
in ``stream_dec/schemas/``. No torch import here.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson

CONTENT_TYPE_HEADER = "content-type"
CONTENT_TYPE_FLOAT32 = "application/x-float32"
CONTENT_TYPE_JSON = "application/json"
DEFAULT_MAX_BYTES = 1_048_576
#: Longest record key accepted (and copied verbatim to a dead letter). The input contract
#: makes the key the item id, so a key this long is a producer bug; 4 KiB leaves room
#: over :data:`DEFAULT_MAX_ID_BYTES` for keys that wrap an id.
DEFAULT_MAX_KEY_BYTES = 4_096
#: Longest item id (UTF-8) accepted. Every assignment carries the id twice (as its key
#: and in its value) into downstream stores; 2 KiB holds the identifiers such stores
#: bound (object names of 1,024 bytes, 2,048-character URLs as in sitemaps, key
#: attributes of 2,048 bytes).
DEFAULT_MAX_ID_BYTES = 2_048

#: Stage of a failure: the bytes could not be turned into (id, vector) ...
STAGE_DECODE = "decode"
#: ... or they could, but the vector is unusable.
STAGE_VALIDATE = "validate"

#: Every reason code :func:`decode_record` can raise, with its stage and meaning.
REASONS: dict[str, tuple[str, str]] = {
    "null_value": (STAGE_DECODE, "the record has no value (tombstone)"),
    "too_large": (STAGE_DECODE, "the value is larger than the size limit"),
    "key_too_large": (STAGE_DECODE, "the key is larger than the key size limit"),
    "unsupported_content_type": (STAGE_DECODE, "the content-type header names a format other than JSON or float32"),
    "bad_json": (STAGE_DECODE, "the value is not valid UTF-8 JSON (NaN/Infinity literals included)"),
    "not_object": (STAGE_DECODE, "the JSON value is not an object"),
    "missing_id": (STAGE_DECODE, 'the JSON object has no "id"'),
    "bad_id": (STAGE_DECODE, '"id" is not a non-empty string'),
    "id_too_large": (STAGE_DECODE, "the item id (JSON \"id\" or float32 key) is larger than the id size limit as UTF-8"),
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
#: Prefix of the headers this module writes on a dead letter.
_OURS = "__stream_dec."
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
    """The media type named by a record's ``content-type`` header (lower case, parameters dropped), or None.

    A header with a null value does not count; a name given as bytes is read as UTF-8.
    """
    if not headers:
        return None
    for name, value in headers:
        if value is None:
            continue
        if not isinstance(name, str):
            name = _header_name(name)
        if name.lower() == CONTENT_TYPE_HEADER:
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


def _id_too_large(nbytes: int, limit: int) -> DecodeError:
    # The detail never quotes the id: it is the part that is too long.
    return _fail("id_too_large", f"the item id is {nbytes} bytes as UTF-8, over the limit of {limit}")


def _decode_float32(key: bytes | None, value: bytes, max_id_bytes: int) -> tuple[str, np.ndarray]:
    if not key:
        raise _fail("missing_key", "a float32 record needs its item id as the key")
    try:
        item_id = key.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("bad_key", f"key {key[:40]!r} is not UTF-8") from None
    if len(key) > max_id_bytes:
        raise _id_too_large(len(key), max_id_bytes)
    if len(value) % 4:
        raise _fail("bad_length", f"{len(value)} bytes is not a multiple of 4")
    # frombuffer is a zero-copy view; astype only copies on big-endian hosts.
    return item_id, np.frombuffer(value, dtype=_F32).astype(np.float32, copy=False)


def _decode_json(value: bytes, max_id_bytes: int) -> tuple[str, np.ndarray]:
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
    # UTF-8 takes at most 4 bytes a character, so short ids skip the encode. (orjson
    # refuses lone surrogates, so every id it returns encodes.)
    if 4 * len(item_id) > max_id_bytes and len(item_id.encode("utf-8")) > max_id_bytes:
        raise _id_too_large(len(item_id.encode("utf-8")), max_id_bytes)
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
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_id_bytes: int = DEFAULT_MAX_ID_BYTES,
) -> tuple[str, np.ndarray]:
    """Decode one input record into ``(item_id, 1-d float32 vector)``.

    ``dim`` is the expected vector length (None accepts any non-empty length);
    ``max_bytes``, ``max_key_bytes`` and ``max_id_bytes`` bound the value, the key and
    the item id (UTF-8), in bytes. Raises :class:`DecodeError` otherwise, with the reason of
    the first check that fails.
    """
    if value is None:
        raise _fail("null_value", "the record has no value")
    if len(value) > max_bytes:
        raise _fail("too_large", f"{len(value)} bytes is over the limit of {max_bytes}")
    if key is not None and len(key) > max_key_bytes:
        raise _fail("key_too_large", f"the key is {len(key)} bytes, over the limit of {max_key_bytes}")
    ctype = content_type(headers)
    if ctype == CONTENT_TYPE_FLOAT32:
        item_id, vec = _decode_float32(key, value, max_id_bytes)
    elif ctype is None or ctype == CONTENT_TYPE_JSON:
        item_id, vec = _decode_json(value, max_id_bytes)
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


def _split_fast(records: Sequence, dim: int, max_bytes: int, max_key: int) -> tuple[list[int], list[str], list[bytes], list[int]]:
    """Positions, ids and values of the float32 records whose length, key and header make
    them certain to decode (finiteness aside), and the positions of all the others."""
    nbytes = 4 * dim
    fast_pos: list[int] = []
    fast_ids: list[str] = []
    raw: list[bytes] = []
    rest: list[int] = []
    for i, (key, value, headers) in enumerate(records):
        if (
            headers
            and key
            and value is not None
            and len(value) == nbytes
            and nbytes <= max_bytes
            and len(key) <= max_key
            and content_type(headers) == CONTENT_TYPE_FLOAT32
        ):
            try:
                fast_ids.append(key.decode("utf-8"))
            except UnicodeDecodeError:
                rest.append(i)
                continue
            fast_pos.append(i)
            raw.append(value)
        else:
            rest.append(i)
    return fast_pos, fast_ids, raw, rest


def decode_batch(
    records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes | None]] | None]],
    *,
    dim: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_id_bytes: int = DEFAULT_MAX_ID_BYTES,
) -> DecodedBatch:
    """Decode ``(key, value, headers)`` triples at once; same results as :func:`decode_record` on each.

    float32 records of the right length are checked together (one ``frombuffer``, one
    finiteness test for the batch). JSON records, and any float32 record that misses
    the fast path, go through :func:`decode_record`, so every failure carries exactly
    the reason a single decode would give. (For JSON the parse itself dominates:
    batching its conversion measured slower than per record.)

    >>> batch = decode_batch([(b"a", encode_float32([1, 2]), [("content-type", b"application/x-float32")]),
    ...                       (None, None, [("trace", None)]),
    ...                       (None, b'{"id": "b", "embedding": [3, 4]}', None)], dim=2)
    >>> batch.ids, batch.X.tolist(), batch.valid, [(pos, err.reason) for pos, err in batch.failures]
    (['a', 'b'], [[1.0, 2.0], [3.0, 4.0]], [0, 2], [(1, 'null_value')])
    """
    fast_pos, fast_ids, raw, rest = _split_fast(records, dim, max_bytes, min(max_key_bytes, max_id_bytes))
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
    limits = dict(dim=dim, max_bytes=max_bytes, max_key_bytes=max_key_bytes, max_id_bytes=max_id_bytes)
    for i in rest:
        key, value, headers = records[i]
        try:
            item_id, vec = decode_record(key, value, headers, **limits)
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
    *,
    root: int | None = None,
    **extra: Any,
) -> bytes:
    """JSON value of an ``assignment`` output record (one per valid input record).

    ``root`` (the top ancestor of ``cluster`` in the id hierarchy) follows ``cluster``
    when given. ``extra`` adds fields (JSON-serialisable) after the fixed ones; it may
    not replace them.
    """
    rec: dict[str, Any] = {
        "kind": "assignment",
        "id": str(item_id),
        "cluster": int(cluster),
        **({} if root is None else {"root": int(root)}),
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
    roots: Sequence[int] | None = None,
) -> list[bytes]:
    """:func:`encode_assignment` for a whole batch (same bytes; no ``extra`` fields).

    The service's per-record budget is a few microseconds: this skips the per-call
    conversions and checks (``clusters``/``roots``/``partitions``/``offsets`` are Python
    ints, ``confidences`` a float32 array).
    """
    dumps, opt = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    version = int(model_version)
    topic = str(topic)
    conf = np.asarray(confidences, dtype=np.float32)
    if roots is not None:
        return [
            dumps(
                {"kind": "assignment", "id": i, "cluster": c, "root": r, "confidence": q, "model_version": version, "topic": topic,
                 "partition": p, "offset": o},
                option=opt,
            )
            for i, c, r, q, p, o in zip(ids, clusters, roots, conf, partitions, offsets)
        ]
    return [
        dumps(
            {"kind": "assignment", "id": i, "cluster": c, "confidence": q, "model_version": version, "topic": topic, "partition": p, "offset": o},
            option=opt,
        )
        for i, c, q, p, o in zip(ids, clusters, conf, partitions, offsets)
    ]


_DRIFT_REQUIRED = ("model_version", "n_items", "update_ms", "churn", "centre_shift", "novelty_rate", "new_cluster_ids", "n_clusters")
_DRIFT_OPTIONAL = ("steps", "buffer_size", "budget_exhausted", "guard_action", "plan", "refined")
_DRIFT_FLOATS = ("update_ms", "churn", "centre_shift", "novelty_rate", "refined")


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
        elif k == "plan":
            v = dict(v)  # plain data already (UpdatePlan.to_dict)
        else:
            v = int(v)
        rec[k] = v
    rec["topic"] = str(topic)
    rec["offset_ranges"] = [
        {"partition": int(p), "first_offset": int(first), "last_offset": int(last)} for p, (first, last) in sorted(offset_ranges.items())
    ]
    return _with_extra(rec, extra)


LIFECYCLE_EVENTS = ("born", "retired", "revived")
_LIFECYCLE_IDS = ("cluster", "parent", "root", "model_version")
# The evidence each event must carry (schemas/lifecycle.schema.json); an event may carry
# more (e.g. what a spawn rule measured), which is passed through after these.
_LIFECYCLE_EVIDENCE = {
    "born": ("support", "source_share", "window", "gate", "cohesion", "founding_taken"),
    "retired": ("remembered", "moved_to", "forgotten", "last_assigned_version", "window_versions"),
    "revived": ("remembered", "window_items"),
}


def encode_lifecycle(event: Mapping[str, Any], **extra: Any) -> bytes:
    """JSON value of a ``lifecycle`` output record (one per event in an id's life; key: the cluster id).

    ``event`` is one entry of a ``DriftReport``'s ``lifecycle`` list
    (schemas/lifecycle.schema.json; stream_dec/online/lifecycle.py): ``event``,
    ``cluster``, ``parent`` (None for a root), ``root``, ``model_version`` and the
    event's evidence, then any further evidence the event carries. Integers stay
    integers, non-finite numbers become ``null``.

    >>> encode_lifecycle({"event": "born", "cluster": 7, "parent": 2, "root": 0, "model_version": 5, "support": 40,
    ...                   "source_share": 0.9, "window": 800, "gate": 1.5, "cohesion": 0.7, "founding_taken": 0.0})
    b'{"kind":"lifecycle","event":"born","cluster":7,"parent":2,"root":0,"model_version":5,"support":40,"source_share":0.9,"window":800,"gate":1.5,"cohesion":0.7,"founding_taken":0.0}'
    >>> encode_lifecycle({"event": "retired", "cluster": 2, "parent": None, "root": 2, "model_version": 9, "remembered": 3,
    ...                   "moved_to": [{"cluster": 7, "items": 3}], "forgotten": 0, "last_assigned_version": None,
    ...                   "window_versions": 10})
    b'{"kind":"lifecycle","event":"retired","cluster":2,"parent":null,"root":2,"model_version":9,"remembered":3,"moved_to":[{"cluster":7,"items":3}],"forgotten":0,"last_assigned_version":null,"window_versions":10}'
    """
    kind = event.get("event")
    if kind not in LIFECYCLE_EVENTS:
        raise ValueError(f"unknown lifecycle event {kind!r} (known: {', '.join(LIFECYCLE_EVENTS)})")
    missing = [k for k in _LIFECYCLE_IDS + _LIFECYCLE_EVIDENCE[kind] if k not in event]
    if missing:
        raise ValueError(f"lifecycle event lacks {', '.join(missing)}")
    rec: dict[str, Any] = {"kind": "lifecycle", "event": kind}
    for k in _LIFECYCLE_IDS:
        rec[k] = None if event[k] is None else int(event[k])
    if rec["parent"] is None and rec["root"] != rec["cluster"]:
        raise ValueError("a lifecycle event without a parent must be its own root")
    for k in _LIFECYCLE_EVIDENCE[kind] + tuple(k for k in event if k not in rec and k not in _LIFECYCLE_EVIDENCE[kind]):
        rec[k] = _plain(event[k])
    return _with_extra(rec, extra)


def _plain(x: Any) -> Any:
    """``x`` as JSON-ready data: integers stay integers, other numbers are finite floats or None.

    >>> _plain([{"a": np.int64(3), "b": float("nan")}, True, None, 0.5])
    [{'a': 3, 'b': None}, True, None, 0.5]
    """
    if x is None or isinstance(x, (bool, np.bool_, str)):
        return bool(x) if isinstance(x, np.bool_) else x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return _finite_or_none(x)


def _with_extra(rec: dict, extra: dict) -> bytes:
    clash = sorted(set(extra) & set(rec))
    if clash:
        raise ValueError(f"extra fields may not replace fixed ones: {', '.join(clash)}")
    rec.update(extra)
    return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)


# -- dead letters --------------------------------------------------------------------------

#: Header on a dead letter whose key was replaced by its digest: the original key's length in bytes.
KEY_REPLACED_HEADER = "__stream_dec.dlq.key.replaced"
#: Header on a dead letter whose value was replaced by a stub: the original value's length in bytes.
VALUE_REPLACED_HEADER = "__stream_dec.dlq.value.replaced"
#: Header listing the positions (0-based, comma-separated, among the dead letter's headers)
#: of the original headers whose value was null; they are sent with an empty value.
NULL_HEADERS_HEADER = "__stream_dec.dlq.null.headers"
#: Header counting the original headers left off to keep within ``max_header_bytes``.
DROPPED_HEADERS_HEADER = "__stream_dec.dlq.headers.dropped"

#: Longest value a dead letter copies verbatim. With the default key and header bounds a
#: dead letter stays under Kafka's default ``max.message.bytes`` (1,048,588), so a DLQ
#: topic with default settings takes every one (:func:`dead_letter_max_bytes`).
DEFAULT_DLQ_MAX_VALUE_BYTES = 983_040
#: Most bytes of original headers a dead letter copies (names, values and framing).
DEFAULT_DLQ_MAX_HEADER_BYTES = 16_384
#: Bound on what a dead letter adds to its bounded key, value and original headers: the
#: error headers (a topic name has at most 249 characters, the detail is cut at 500) and
#: the record and batch framing kafka-python counts against ``max_request_size``.
DLQ_OVERHEAD_BYTES = 4_096
_HEADER_FRAMING = 10  # two varint lengths, at most 5 bytes each
_KEY_DIGEST_PREFIX = b"sha256:"
_KEY_DIGEST_BYTES = len(_KEY_DIGEST_PREFIX) + 64
_STUB_HEAD_BYTES = 1_024
#: Smallest ``max_value_bytes`` :func:`dead_letter` accepts: room for a stub's fixed fields.
MIN_DLQ_VALUE_BYTES = 256


def _header_name(name: Any) -> str:
    """A header name kafka-python can send: bytes read as UTF-8, undecodable bytes and lone
    surrogates written as backslash escapes, anything else as its ``str()``."""
    if isinstance(name, (bytes, bytearray, memoryview)):
        return bytes(name).decode("utf-8", "backslashreplace")
    if not isinstance(name, str):
        name = str(name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name


def _header_value(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return (value if isinstance(value, str) else str(value)).encode("utf-8", "backslashreplace")


def _copied_headers(headers: Iterable[tuple[Any, Any]] | None, max_bytes: int | None) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The original headers a dead letter keeps, made sendable, and the headers noting what changed.

    Greedy in order: a header that would pass ``max_bytes`` is left off and later, smaller
    ones still fit. A null value's entry in the null-position list counts against the bound.
    """
    kept: list[tuple[str, bytes]] = []
    nulls: list[str] = []
    dropped = used = 0
    for name, value in headers or ():
        name = _header_name(name)
        if name.startswith(_CONNECT) or name.startswith(_OURS):
            continue  # an earlier failure's (a record replayed out of a dead-letter topic)
        raw = b"" if value is None else _header_value(value)
        size = len(name.encode("utf-8")) + len(raw) + _HEADER_FRAMING
        if value is None:
            size += len(str(len(kept))) + 1
        if max_bytes is not None and used + size > max_bytes:
            dropped += 1
            continue
        used += size
        if value is None:
            nulls.append(str(len(kept)))
        kept.append((name, raw))
    notes = []
    if nulls:
        notes.append((NULL_HEADERS_HEADER, ",".join(nulls).encode("ascii")))
    if dropped:
        notes.append((DROPPED_HEADERS_HEADER, str(dropped).encode("ascii")))
    return kept, notes


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
    max_header_bytes: int | None = None,
) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record: the original ones plus Kafka Connect style ``__connect.errors.*``.

    The originals come first, in order, made sendable by kafka-python: a null value is
    sent as ``b""`` and listed in :data:`NULL_HEADERS_HEADER`; a name given as bytes is
    read as UTF-8 (undecodable bytes as backslash escapes). Headers of an earlier failure
    (``__connect.errors.*`` and ``__stream_dec.*``, on a record replayed out of a DLQ)
    are replaced, so each name appears once. ``max_header_bytes`` (None: no bound) caps
    the copied originals; those left off are counted in :data:`DROPPED_HEADERS_HEADER`.
    The message is ``"<reason>: <detail>"``, and ``__stream_dec.errors.reason`` carries
    the bare code.
    """
    kept, notes = _copied_headers(original_headers, max_header_bytes)
    detail = detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "..."
    added = [
        (_CONNECT + "topic", str(topic)),
        (_CONNECT + "partition", str(int(partition))),
        (_CONNECT + "offset", str(int(offset))),
        (_CONNECT + "stage", stage),
        (_CONNECT + "exception.class.name", exception_class),
        (_CONNECT + "exception.message", f"{reason}: {detail}"),
        (REASON_HEADER, reason),
    ]
    return kept + [(k, v.encode("utf-8", "backslashreplace")) for k, v in added] + notes


def dlq_headers_for(
    error: DecodeError, original_headers, topic: str, partition: int, offset: int, *, max_header_bytes: int | None = None
) -> list[tuple[str, bytes]]:
    """:func:`dlq_headers` for a :class:`DecodeError`."""
    return dlq_headers(
        original_headers, topic, partition, offset, error.stage, error.reason, error.detail, max_header_bytes=max_header_bytes
    )


class DeadLetter(NamedTuple):
    """The record to send to the dead-letter topic for one failure.

    Send it with keywords (``KafkaProducer.send`` takes the value before the key):
    ``producer.send(dlq_topic, key=dl.key, value=dl.value, headers=dl.headers)``.
    """

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter_max_bytes(
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_value_bytes: int = DEFAULT_DLQ_MAX_VALUE_BYTES,
    max_header_bytes: int = DEFAULT_DLQ_MAX_HEADER_BYTES,
) -> int:
    """Most bytes a :func:`dead_letter` built with these bounds takes, as kafka-python sizes a
    record: the producer's ``max_request_size`` and the DLQ topic's ``max.message.bytes``
    must be at least this.

    >>> dead_letter_max_bytes() <= 1_048_588  # Kafka's default max.message.bytes
    True
    """
    return max(max_key_bytes, _KEY_DIGEST_BYTES) + max_value_bytes + max_header_bytes + DLQ_OVERHEAD_BYTES


def _value_stub(value: bytes, max_bytes: int) -> bytes:
    """The JSON stub standing for a value over ``max_bytes`` (schemas/dlq-value-stub.schema.json)."""
    stub = {"truncated": True, "original_bytes": len(value), "sha256": hashlib.sha256(value).hexdigest(), "head_base64": ""}
    room = max_bytes - len(orjson.dumps(stub))  # base64 takes 4 characters for every 3 bytes
    stub["head_base64"] = base64.b64encode(value[: min(_STUB_HEAD_BYTES, room // 4 * 3)]).decode("ascii")
    return orjson.dumps(stub)


def dead_letter(
    error: DecodeError,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | None,
    topic: str,
    partition: int,
    offset: int,
    *,
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_value_bytes: int = DEFAULT_DLQ_MAX_VALUE_BYTES,
    max_header_bytes: int = DEFAULT_DLQ_MAX_HEADER_BYTES,
) -> DeadLetter:
    """The dead letter for a record (read at ``topic``/``partition``/``offset``) that failed with ``error``.

    Whatever the record, kafka-python's ``send`` accepts the result, its size is at most
    :func:`dead_letter_max_bytes` of the bounds, and the same arguments give the same
    bytes (a replayed batch dead-letters exact copies).

    * headers: :func:`dlq_headers` with ``max_header_bytes``: null values sent as ``b""``
      and listed, names made sendable, the error headers added;
    * key: copied, unless longer than ``max_key_bytes``: then ``b"sha256:"`` and the hex
      digest of the original, whose length :data:`KEY_REPLACED_HEADER` gives;
    * value: copied, unless longer than ``max_value_bytes``: then a JSON stub
      ``{"truncated": true, "original_bytes", "sha256", "head_base64"}`` (its first bytes;
      schemas/dlq-value-stub.schema.json) and :data:`VALUE_REPLACED_HEADER`. A null value
      (a tombstone) stays null when the dead letter has a key, and is ``b""`` otherwise
      (Kafka clients refuse a record with neither).

    >>> err = DecodeError("decode", "null_value", "the record has no value")
    >>> dl = dead_letter(err, None, None, [("trace", None)], "embeddings", 0, 7)
    >>> dl.key, dl.value, dl.headers[0], dict(dl.headers)[NULL_HEADERS_HEADER]
    (None, b'', ('trace', b''), b'0')
    """
    if max_value_bytes < MIN_DLQ_VALUE_BYTES:
        raise ValueError(f"max_value_bytes must be at least {MIN_DLQ_VALUE_BYTES}, got {max_value_bytes}")
    out_headers = dlq_headers_for(error, headers, topic, partition, offset, max_header_bytes=max_header_bytes)
    if key is not None:
        key = bytes(key)
        if len(key) > max_key_bytes:
            out_headers.append((KEY_REPLACED_HEADER, str(len(key)).encode("ascii")))
            key = _KEY_DIGEST_PREFIX + hashlib.sha256(key).hexdigest().encode("ascii")
    if value is None:
        value = None if key is not None else b""
    else:
        value = bytes(value)
        if len(value) > max_value_bytes:
            out_headers.append((VALUE_REPLACED_HEADER, str(len(value)).encode("ascii")))
            value = _value_stub(value, max_value_bytes)
    return DeadLetter(key, value, out_headers)

"""The feed topic: what predictors send the learner (latent codes of labelled items, never raw records).

A record holds up to :data:`FEED_MAX_ROWS` latent rows as raw little-endian float32,
row-major, with the headers

=============  ===============================================================
header         value
=============  ===============================================================
content-type   ``application/x-stream-dec-latents``
rows           number of rows, decimal (>= 1)
dim            latent dimension, decimal (>= 1)
model-version  the model version whose encoder made the rows, decimal
encoder        fingerprint string of that encoder
=============  ===============================================================

so ``len(value) == 4 * rows * dim``. docs/contracts.md has the format. A malformed
record raises (or, in :func:`decode_feed_batch`, reports) a
:class:`stream_dec.io.codecs.DecodeError` with one of the reasons in
:data:`FEED_REASONS`, so the learner can dead-letter it like an input record.

>>> Z = np.arange(6, dtype=np.float32).reshape(3, 2)
>>> [(value, headers)] = encode_latents(Z, model_version=7, encoder="enc-1")
>>> chunk = decode_latents(value, headers)
>>> chunk.Z.tolist(), chunk.model_version, chunk.encoder
([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], 7, 'enc-1')

:func:`sample_mask` picks the same items in every process (a hash of the item id), so
a sampled feed is reproducible whichever predictor labelled an item.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_dec.io.codecs import STAGE_DECODE, STAGE_VALIDATE, DecodeError

__all__ = [
    "FEED_CONTENT_TYPE",
    "FEED_MAX_ROWS",
    "FEED_REASONS",
    "FeedChunk",
    "decode_feed_batch",
    "decode_latents",
    "encode_latents",
    "sample_mask",
]

FEED_CONTENT_TYPE = b"application/x-stream-dec-latents"
#: Rows per record: 1,024 rows of 128 float32 are 512 KiB, under Kafka's default 1 MB limits.
FEED_MAX_ROWS = 1024

#: Every reason a feed record can fail with: (stage, meaning). The names shared with
#: ``stream_dec.io.codecs.REASONS`` mean the same there.
FEED_REASONS: dict[str, tuple[str, str]] = {
    "null_value": (STAGE_DECODE, "the record has no value (tombstone)"),
    "unsupported_content_type": (STAGE_DECODE, "the content-type header is missing or not application/x-stream-dec-latents"),
    "bad_header": (STAGE_DECODE, "rows, dim, model-version or encoder is missing or not valid"),
    "bad_length": (STAGE_DECODE, "the value's length is not 4 * rows * dim bytes"),
    "wrong_dimension": (STAGE_VALIDATE, "dim differs from the learner's latent dimension"),
    "wrong_encoder": (STAGE_VALIDATE, "the rows come from another encoder than the learner asked for"),
    "non_finite": (STAGE_VALIDATE, "a value is NaN or infinite"),
}

_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class FeedChunk:
    """One decoded feed record: ``Z`` float32 ``[rows, dim]``, and the model version and encoder that made it."""

    Z: np.ndarray
    model_version: int
    encoder: str


def _fail(reason: str, detail: str) -> DecodeError:
    return DecodeError(FEED_REASONS[reason][0], reason, detail)


def encode_latents(Z: Any, *, model_version: int, encoder: str) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """``(value, headers)`` of each record for the latent rows ``Z`` (``[n, d]``), at most :data:`FEED_MAX_ROWS` rows each.

    No records for ``n == 0``. Refuses what the learner would reject: non-finite values,
    ``d == 0``, a negative version, an empty encoder fingerprint.

    >>> [len(v) for v, _ in encode_latents(np.zeros((2500, 4)), model_version=1, encoder="e")]
    [16384, 16384, 7232]
    """
    Z = np.ascontiguousarray(Z, dtype=_F32)
    if Z.ndim != 2 or Z.shape[1] == 0:
        raise ValueError(f"Z must be a [n, d] matrix with d >= 1, got shape {Z.shape}")
    if isinstance(model_version, bool) or not isinstance(model_version, (int, np.integer)) or model_version < 0:
        raise ValueError(f"model_version must be an int >= 0, got {model_version!r}")
    if not isinstance(encoder, str) or not encoder:
        raise ValueError(f"encoder must be a non-empty str, got {encoder!r}")
    if not np.isfinite(Z).all():
        raise ValueError("Z holds NaN or infinite values")
    common = [("dim", b"%d" % Z.shape[1]), ("model-version", b"%d" % model_version), ("encoder", encoder.encode("utf-8"))]
    out = []
    for start in range(0, Z.shape[0], FEED_MAX_ROWS):
        block = Z[start:start + FEED_MAX_ROWS]
        out.append((block.tobytes(), [("content-type", FEED_CONTENT_TYPE), ("rows", b"%d" % block.shape[0]), *common]))
    return out


def _headers(headers: Iterable[tuple[Any, Any]] | None) -> dict[str, bytes]:
    """First value of each header name, names lower case (kafka-python gives str names, bytes values)."""
    out: dict[str, bytes] = {}
    for name, value in headers or ():
        if value is None:
            continue
        name = name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)
        out.setdefault(name.lower(), bytes(value))
    return out


def _count(h: dict[str, bytes], name: str, minimum: int) -> int:
    raw = h.get(name)
    if raw is None:
        raise _fail("bad_header", f"no {name!r} header")
    text = raw.decode("ascii", "replace")
    if not text.isdigit() or int(text) < minimum:  # isdigit: no sign, no spaces, no underscores
        raise _fail("bad_header", f"{name!r} must be a decimal integer >= {minimum}, got {text[:40]!r}")
    return int(text)


def decode_latents(value: bytes | None, headers: Iterable[tuple[Any, Any]] | None, *, dim: int | None = None) -> FeedChunk:
    """The :class:`FeedChunk` of one feed record; a :class:`DecodeError` (a ``ValueError``) says why not.

    ``dim``: when given, a record of another latent dimension fails (``wrong_dimension``).

    >>> try:
    ...     decode_latents(b"\\0" * 12, [("content-type", FEED_CONTENT_TYPE), ("rows", b"2"), ("dim", b"2"),
    ...                                   ("model-version", b"1"), ("encoder", b"e")])
    ... except ValueError as err:
    ...     print(err.reason, "-", err.detail)
    bad_length - 12 bytes for 2 rows of 2 float32 (16 bytes expected)
    """
    if value is None:
        raise _fail("null_value", "the record has no value")
    h = _headers(headers)
    ctype = h.get("content-type")
    if ctype is None or ctype.split(b";", 1)[0].strip().lower() != FEED_CONTENT_TYPE:
        raise _fail("unsupported_content_type", f"content-type {ctype!r}, expected {FEED_CONTENT_TYPE.decode()}")
    rows, d, version = _count(h, "rows", 1), _count(h, "dim", 1), _count(h, "model-version", 0)
    try:
        encoder = h["encoder"].decode("utf-8") if h.get("encoder") else ""
    except UnicodeDecodeError:
        encoder = ""
    if not encoder:
        raise _fail("bad_header", "no 'encoder' header, or not UTF-8 text")
    if len(value) != 4 * rows * d:
        raise _fail("bad_length", f"{len(value)} bytes for {rows} rows of {d} float32 ({4 * rows * d} bytes expected)")
    if dim is not None and d != dim:
        raise _fail("wrong_dimension", f"expected dim {dim}, got {d}")
    # A bytearray keeps the matrix writable (torch.from_numpy warns on read-only memory).
    Z = np.frombuffer(bytearray(value), dtype=_F32).reshape(rows, d)
    if not np.isfinite(Z).all():
        raise _fail("non_finite", f"{int((~np.isfinite(Z)).sum())} of {Z.size} values are NaN or infinite")
    return FeedChunk(Z, version, encoder)


def decode_feed_batch(records: Sequence[Any], dim: int, *, encoder: str | None = None) -> tuple[np.ndarray, list[tuple[int, DecodeError]]]:
    """The rows of every valid record of ``records`` (kafka-python ``ConsumerRecord``s) as one float32 ``[n, dim]``
    matrix, in record order, and the failures as ``(position, DecodeError)``, as ``decode_batch`` in
    stream_dec/io/codecs.py reports them.

    ``encoder``: when given, records made by another encoder fail with ``wrong_encoder``
    (their rows live in another latent space).

    >>> from stream_dec.io.modeltopic import _Rec
    >>> recs = [_Rec(i, None, v, h) for i, (v, h) in enumerate(encode_latents(np.ones((3, 2)), model_version=1, encoder="e"))]
    >>> recs.append(_Rec(1, None, None, []))
    >>> Z, failures = decode_feed_batch(recs, dim=2)
    >>> Z.shape, [(pos, err.reason) for pos, err in failures]
    ((3, 2), [(1, 'null_value')])
    """
    blocks: list[np.ndarray] = []
    failures: list[tuple[int, DecodeError]] = []
    for i, record in enumerate(records):
        try:
            chunk = decode_latents(record.value, record.headers, dim=dim)
            if encoder is not None and chunk.encoder != encoder:
                raise _fail("wrong_encoder", f"made by encoder {chunk.encoder!r}, expected {encoder!r}")
        except DecodeError as err:
            failures.append((i, err))
            continue
        blocks.append(chunk.Z)
    Z = np.concatenate(blocks) if blocks else np.empty((0, dim), dtype=np.float32)
    return Z, failures


def sample_mask(ids: Sequence[str], rate: float) -> np.ndarray:
    """Which items a sample at ``rate`` keeps: the CRC-32 of each id's UTF-8 bytes below ``rate * 2**32``.

    Deterministic per id, so every process samples the same items; rate 1 keeps all,
    0 none, and the samples of a lower rate are inside those of a higher one.

    >>> sample_mask(["a", "b", "c", "d"], 0.5).tolist(), sample_mask(["a"], 1.0).tolist(), sample_mask(["a"], 0.0).tolist()
    ([False, True, True, False], [True], [False])
    """
    rate = float(rate)
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"rate must be within [0, 1], got {rate}")
    crc = np.fromiter((zlib.crc32(i.encode("utf-8")) for i in ids), dtype=np.uint64, count=len(ids))
    return crc < np.uint64(round(rate * 2**32))

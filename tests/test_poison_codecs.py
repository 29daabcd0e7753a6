"""Any record in, a label or a dead letter out: poison records at the codec level.

Records a real upstream sends -- null header values, tombstones with and without a key,
keys, ids and values of any size -- decode to a reason, and the dead letter built for
each is one kafka-python sends and a broker stores, bounded in size and byte-for-byte
the same on a replay. The poison records go over the wire with librdkafka (confluent-
kafka), since kafka-python's producer refuses null header values and records with
neither key nor value.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources

import jsonschema
import numpy as np
import orjson
import pytest
from conftest_kafka import consume
from kafka import KafkaProducer
from kafka.record.default_records import DefaultRecordBatchBuilder

from stream_dec.io.codecs import (
    CONTENT_TYPE_FLOAT32,
    DEFAULT_DLQ_MAX_HEADER_BYTES,
    DEFAULT_DLQ_MAX_VALUE_BYTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ID_BYTES,
    DEFAULT_MAX_KEY_BYTES,
    DROPPED_HEADERS_HEADER,
    KEY_REPLACED_HEADER,
    MIN_DLQ_VALUE_BYTES,
    NULL_HEADERS_HEADER,
    REASON_HEADER,
    REASONS,
    VALUE_REPLACED_HEADER,
    DecodeError,
    dead_letter,
    dead_letter_max_bytes,
    decode_batch,
    decode_record,
    encode_float32,
    encode_json,
)

DIM = 4
F32 = [("content-type", CONTENT_TYPE_FLOAT32.encode())]
VEC = np.arange(DIM, dtype=np.float32)
#: Kafka's default max.message.bytes (broker and topic): what a DLQ topic takes unless configured.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one of the package's JSON Schemas."""
    return jsonschema.Draft202012Validator(json.loads(resources.files("stream_dec").joinpath("schemas", f"{name}.schema.json").read_text()))


def record_size(key, value, headers) -> int:
    """A record's size as kafka-python counts it against ``max_request_size``."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def err(reason: str = "bad_json", detail: str = "detail") -> DecodeError:
    """A decode failure with ``reason`` and its stage."""
    return DecodeError(REASONS[reason][0], reason, detail)


# (expected reason or None for a good record, key, value, headers): at least one per reason,
# plus the shapes that broke or were untested on the dead-letter path.
POISON = [
    (None, b"good-1", encode_float32(VEC), F32 + [("trace", None)]),
    ("null_value", b"tomb", None, None),
    ("null_value", None, None, None),  # neither key nor value
    ("null_value", None, None, [("trace", None), ("b3", b"1")]),
    ("too_large", b"big", b"\x00" * (2 * DEFAULT_MAX_BYTES), F32),
    ("key_too_large", b"k" * 300_000, encode_json("a", VEC), [("trace", None)]),
    ("key_too_large", b"k" * 300_000, b"", None),  # an empty value is a value, not a tombstone
    ("unsupported_content_type", b"ct", b"{}", [("content-type", b"text/plain"), ("x", None)]),
    ("bad_json", None, b'{"id": "a", "embedding": [1, 2', [("x", None)]),
    ("bad_json", b"huge", b"[" * 1_000_000, None),  # under max_bytes, over the dead letter's value bound
    ("not_object", None, b"[1, 2, 3]", None),
    ("missing_id", None, b'{"embedding": [1, 2, 3, 4]}', None),
    ("bad_id", None, b'{"id": 17, "embedding": [1, 2, 3, 4]}', None),
    ("id_too_large", None, encode_json("i" * 300_000, VEC), None),
    ("id_too_large", b"i" * (DEFAULT_MAX_ID_BYTES + 1), encode_float32(VEC), F32),
    ("missing_embedding", None, b'{"id": "a"}', None),
    ("bad_embedding", None, b'{"id": "a", "embedding": "1,2"}', None),
    ("missing_key", None, encode_float32(VEC), F32 + [("trace", None)]),
    ("bad_key", b"\xff\xfe", encode_float32(VEC), F32),
    ("bad_length", b"k", encode_float32(VEC)[:-1], F32),
    ("empty", None, b'{"id": "a", "embedding": []}', None),
    ("wrong_dimension", None, encode_json("a", np.ones(DIM + 1)), [("trace", None)]),
    ("non_finite", b"nan", np.array([1, np.nan, 2, 3], "<f4").tobytes(), F32),
    # headers past the header bound, and stale error headers from an earlier dead-lettering
    ("bad_json", b"hdrs", b"{", [(f"h{i}", b"v" * 1000) for i in range(40)] + [("__connect.errors.stage", b"stale"), ("__stream_dec.errors.reason", b"x")]),
    (None, None, encode_json("good-2", VEC), [("content-type", None)]),
]


def test_every_reason_appears_among_the_poison_records():
    assert {reason for reason, *_ in POISON} - {None} == set(REASONS)


@pytest.mark.parametrize("row", range(len(POISON)), ids=[f"{row[0]}-{i}" for i, row in enumerate(POISON)])
def test_poison_decodes_to_its_reason(row):
    reason, key, value, headers = POISON[row]
    got = decode_batch([(key, value, headers)], dim=DIM)
    assert [e.reason for _, e in got.failures] == ([reason] if reason else [])
    if reason:
        with pytest.raises(DecodeError, match=f"^{reason}: "):
            decode_record(key, value, headers, dim=DIM)


# -- dead letters, without a broker -----------------------------------------------------------


@pytest.mark.parametrize("row", range(len(POISON)), ids=[f"{row[0]}-{i}" for i, row in enumerate(POISON)])
def test_dead_letter_is_sendable_bounded_and_deterministic(row):
    reason, key, value, headers = POISON[row]
    error = err(reason or "wrong_dimension")
    dl = dead_letter(error, key, value, headers, "embeddings", 3, 2**62)
    assert dl == dead_letter(error, key, value, headers, "embeddings", 3, 2**62)  # a replay sends the same bytes
    # kafka-python's send() argument checks, and its size check against Kafka's default limit
    assert dl.key is not None or dl.value is not None
    assert all(type(k) is bytes or k is None for k in (dl.key, dl.value))
    assert isinstance(dl.headers, list) and all(type(h) is tuple and len(h) == 2 and type(h[0]) is str and type(h[1]) is bytes for h in dl.headers)
    assert record_size(dl.key, dl.value, dl.headers) <= dead_letter_max_bytes() <= KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    h = {k: v.decode() for k, v in dl.headers}
    schema_validator("dlq-headers").validate(h)
    assert h[REASON_HEADER] == error.reason and h["__connect.errors.offset"] == str(2**62)
    if key is not None and len(key) > DEFAULT_MAX_KEY_BYTES:
        assert dl.key == b"sha256:" + hashlib.sha256(key).hexdigest().encode() and h[KEY_REPLACED_HEADER] == str(len(key))
    else:
        assert dl.key == key and KEY_REPLACED_HEADER not in h
    if value is not None and len(value) > DEFAULT_DLQ_MAX_VALUE_BYTES:
        assert h[VALUE_REPLACED_HEADER] == str(len(value))
    else:
        assert dl.value == (value if value is not None or key is not None else b"") and VALUE_REPLACED_HEADER not in h


def test_value_stub_identifies_the_value_within_the_bound():
    value = bytes(range(256)) * 40_000
    stub_schema = schema_validator("dlq-value-stub")
    for bound in (MIN_DLQ_VALUE_BYTES, 300, 1000, 4096, DEFAULT_DLQ_MAX_VALUE_BYTES):
        dl = dead_letter(err(), b"k", value, None, "t", 0, 0, max_value_bytes=bound)
        assert len(dl.value) <= bound and dict(dl.headers)[VALUE_REPLACED_HEADER] == b"10240000"
        stub = orjson.loads(dl.value)
        stub_schema.validate(stub)
        head = base64.b64decode(stub["head_base64"])
        assert stub["original_bytes"] == len(value) and stub["sha256"] == hashlib.sha256(value).hexdigest()
        assert value.startswith(head) and (len(head) == 1024 or bound - len(dl.value) < 4)  # the head fills the room
    assert len(head) == 1024  # a roomy bound carries the first KiB
    assert dead_letter(err(), b"k", value[:300], None, "t", 0, 0, max_value_bytes=300).value == value[:300]  # at the bound: copied
    with pytest.raises(ValueError, match=f"at least {MIN_DLQ_VALUE_BYTES}"):
        dead_letter(err(), b"k", b"v", None, "t", 0, 0, max_value_bytes=MIN_DLQ_VALUE_BYTES - 1)


def test_tombstones_and_keys():
    tomb = err("null_value")
    assert dead_letter(tomb, b"k", None, None, "t", 0, 0)[:2] == (b"k", None)  # a keyed tombstone stays one
    assert dead_letter(tomb, b"", None, None, "t", 0, 0)[:2] == (b"", None)  # an empty key is a key
    assert dead_letter(tomb, None, None, None, "t", 0, 0)[:2] == (None, b"")  # kafka-python refuses neither
    dl = dead_letter(tomb, b"k" * 9, None, None, "t", 0, 0, max_key_bytes=8)
    assert dl.key == b"sha256:" + hashlib.sha256(b"k" * 9).hexdigest().encode() and dl.value is None
    assert dead_letter(tomb, bytearray(b"k"), memoryview(b"v"), None, "t", 0, 0)[:2] == (b"k", b"v")


def test_headers_are_made_sendable():
    headers = [
        ("trace", None),
        (b"bytes-name", b"1"),
        (b"\xff-bad-utf8", b"2"),
        ("\udcff-surrogate", bytearray(b"3")),
        ("str-value", "ü"),
        ("__connect.errors.stage", b"stale"),  # an earlier failure's
        ("__stream_dec.dlq.key.replaced", b"99"),
        ("dup", None),
        ("dup", b""),
    ]
    dl = dead_letter(err(), b"k", b"{", headers, "embeddings", 0, 5)
    original = dl.headers[:7]
    assert original == [
        ("trace", b""),
        ("bytes-name", b"1"),
        ("\\xff-bad-utf8", b"2"),
        ("\\udcff-surrogate", b"3"),
        ("str-value", "ü".encode()),
        ("dup", b""),
        ("dup", b""),
    ]
    h = dict(dl.headers)
    assert h[NULL_HEADERS_HEADER] == b"0,5" and h["__connect.errors.stage"] == b"decode" and KEY_REPLACED_HEADER not in h
    assert len([k for k, _ in dl.headers if k == "__connect.errors.stage"]) == 1
    for name, _ in dl.headers:
        name.encode("utf-8")  # what kafka-python does with every name


def test_header_bound_keeps_what_fits_in_order():
    headers = [("small-1", b"a"), ("big", b"x" * 5000), ("small-2", None), ("small-3", b"c")]
    dl = dead_letter(err(), None, b"{", headers, "t", 0, 0, max_header_bytes=100)
    assert dl.headers[:3] == [("small-1", b"a"), ("small-2", b""), ("small-3", b"c")]
    h = dict(dl.headers)
    assert h[DROPPED_HEADERS_HEADER] == b"1" and h[NULL_HEADERS_HEADER] == b"1"
    # Many tiny null headers: their count and their position list stay within the bound.
    many = [("", None)] * 100_000
    dl = dead_letter(err(), None, b"{", many, "t", 0, 0)
    kept = dl.headers.index(("__connect.errors.topic", b"t"))
    assert 0 < kept < 100_000 and int(dict(dl.headers)[DROPPED_HEADERS_HEADER]) == 100_000 - kept
    assert record_size(dl.key, dl.value, dl.headers) <= dead_letter_max_bytes()


def test_size_bound_holds_in_the_worst_case():
    """Every part at its bound, the longest topic name Kafka allows and a detail of 4-byte characters."""
    bounds = dict(max_key_bytes=100, max_value_bytes=5000, max_header_bytes=2000)
    headers = [(f"h{i}", b"v" * 50) for i in range(30)] + [("n", None)] * 10
    error = err("wrong_dimension", "\U0001f600" * 2000)
    dl = dead_letter(error, b"k" * 100, b"v" * 5000, headers, "t" * 249, 2**31 - 1, 2**63 - 1, **bounds)
    assert len(dl.key) == 100 and len(dl.value) == 5000
    size = record_size(dl.key, dl.value, dl.headers)
    assert size <= dead_letter_max_bytes(**bounds) and size > 100 + 5000 + 2000 - 200  # the bound is not loose by much
    assert dead_letter_max_bytes() == DEFAULT_MAX_KEY_BYTES + DEFAULT_DLQ_MAX_VALUE_BYTES + DEFAULT_DLQ_MAX_HEADER_BYTES + 4096


# -- over the wire ----------------------------------------------------------------------------


def test_poison_from_a_librdkafka_producer_goes_to_the_dlq(broker):
    """The reported crash and its fix, end to end: records as librdkafka sends them, read by
    kafka-python, decoded, dead-lettered with the service's producer settings, read back."""
    from confluent_kafka import Producer

    bootstrap, src, dlq = broker.bootstrap_servers, "poison-in", "poison-dlq"
    broker.create_topics([src, dlq])  # one partition each: order kept
    upstream = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4 * DEFAULT_MAX_BYTES, "linger.ms": 0})
    errors = []
    try:
        for _, key, value, headers in POISON:
            upstream.produce(src, key=key, value=value, headers=headers, on_delivery=lambda e, _m: errors.append(e))
        assert upstream.flush(30) == 0 and errors == [None] * len(POISON)
    finally:
        upstream.close()

    records = consume(bootstrap, src, len(POISON))
    assert [(r.key, r.value) for r in records] == [(key, value) for _, key, value, _ in POISON]
    assert records[0].headers[-1] == ("trace", None)  # what librdkafka sent, as kafka-python hands it over
    decoded = decode_batch([(r.key, r.value, r.headers) for r in records], dim=DIM)
    assert decoded.ids == ["good-1", "good-2"]
    assert {pos: e.reason for pos, e in decoded.failures} == {i: row[0] for i, row in enumerate(POISON) if row[0]}

    # The service's producer, held to a DLQ topic with Kafka's default record limit.
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
    try:
        nulls = records[3]
        with pytest.raises(TypeError, match="headers items must be"):  # the original headers, copied verbatim
            producer.send(dlq, key=nulls.key, value=b"", headers=nulls.headers)
        letters = []
        for pos, error in decoded.failures:
            r = records[pos]
            letters.append(dead_letter(error, r.key, r.value, r.headers, r.topic, r.partition, r.offset))
            producer.send(dlq, key=letters[-1].key, value=letters[-1].value, headers=letters[-1].headers).get(timeout=30)
    finally:
        producer.close()

    back = consume(bootstrap, dlq, len(letters))
    assert len(back) == len(letters)
    headers_schema = schema_validator("dlq-headers")
    for (pos, error), dl, r in zip(decoded.failures, letters, back):
        assert (r.key, r.value, r.headers) == (dl.key, dl.value, dl.headers)  # stored as built
        h = {k: v.decode() for k, v in r.headers}
        headers_schema.validate(h)
        assert h[REASON_HEADER] == error.reason and h["__connect.errors.offset"] == str(records[pos].offset)
        assert record_size(r.key, r.value, r.headers) <= dead_letter_max_bytes()
    replaced = {pos: orjson.loads(dl.value) for (pos, _), dl in zip(decoded.failures, letters) if VALUE_REPLACED_HEADER in dict(dl.headers)}
    assert sorted(replaced) == [4, 9]  # the 2 MiB value and the 1 MB bad JSON
    for pos, stub in replaced.items():
        assert stub["sha256"] == hashlib.sha256(records[pos].value).hexdigest() and stub["original_bytes"] == len(records[pos].value)

"""Record codecs and the published JSON Schemas: round trips, every rejection reason, schema checks."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import orjson
import pytest

from stream_dec.io.codecs import (
    CONTENT_TYPE_FLOAT32,
    DEFAULT_MAX_ID_BYTES,
    DEFAULT_MAX_KEY_BYTES,
    REASON_HEADER,
    REASONS,
    STAGE_DECODE,
    STAGE_VALIDATE,
    DecodeError,
    content_type,
    decode_batch,
    decode_record,
    dlq_headers,
    dlq_headers_for,
    encode_assignment,
    encode_assignments,
    encode_drift,
    encode_float32,
    encode_json,
    encode_lifecycle,
)
from stream_dec.io.feed import FEED_REASONS

F32 = [("content-type", CONTENT_TYPE_FLOAT32.encode())]


def schema(name: str) -> dict:
    """A schema file as shipped in the package data."""
    return json.loads(resources.files("stream_dec").joinpath("schemas", f"{name}.schema.json").read_text())


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(name))


def headers_as_json(headers) -> dict:
    """Headers as the JSON object dlq-headers.schema.json describes."""
    return {k: v.decode("utf-8") for k, v in headers}


# -- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3, 384, 768])
def test_round_trips_are_bit_exact(dim):
    rng = np.random.default_rng(dim)
    vec = (rng.standard_normal(dim) * 10.0 ** rng.integers(-6, 6, dim)).astype(np.float32)
    item_id, out = decode_record(None, encode_json("item-1", vec), dim=dim)
    assert item_id == "item-1" and out.dtype == np.float32 and np.array_equal(out, vec)
    item_id, out = decode_record(b"item-2", encode_float32(vec), F32, dim=dim)
    assert item_id == "item-2" and out.dtype == np.float32 and out.shape == (dim,) and np.array_equal(out, vec)
    assert len(encode_float32(vec)) == 4 * dim
    assert encode_float32(vec.astype(np.float64)) == vec.astype("<f4").tobytes()


def test_json_accepts_plain_numbers_extra_fields_and_any_dim():
    value = b'{"id": "a", "embedding": [1, -2, 3.5e-3], "source": "upstream", "ts": 17}'
    item_id, vec = decode_record(b"ignored-key", value, [("content-type", b"application/json; charset=utf-8")])
    assert item_id == "a" and vec.tolist() == [1.0, -2.0, np.float32(3.5e-3)]
    assert decode_record(None, value, None, dim=None)[1].shape == (3,)


def test_content_type_header_lookup():
    assert content_type(None) is None and content_type([]) is None
    assert content_type([("trace", b"x"), ("Content-Type", b" Application/X-Float32 ; v=1")]) == CONTENT_TYPE_FLOAT32
    assert decode_record(b"k", encode_float32([1.0, 2.0]), [("Content-Type", b"application/x-float32")])[0] == "k"


# -- every rejection reason ------------------------------------------------------------

GOOD = encode_float32(np.ones(4))
REJECT = [
    # (reason, key, value, headers, dim, max_bytes)
    ("null_value", b"k", None, None, 4, 1024),
    ("too_large", b"k", encode_json("a", np.ones(100)), None, None, 256),
    ("too_large", b"k", encode_float32(np.ones(100)), F32, None, 256),
    ("key_too_large", b"k" * (DEFAULT_MAX_KEY_BYTES + 1), encode_json("a", np.ones(4)), None, 4, 1024),
    ("key_too_large", b"k" * (DEFAULT_MAX_KEY_BYTES + 1), GOOD, F32, 4, 1024),
    ("unsupported_content_type", b"k", b"{}", [("content-type", b"text/plain")], None, 1024),
    ("bad_json", None, b'{"id": "a", "embedding": [1, 2', None, None, 1024),
    ("bad_json", None, b"\xff\xfe{}", None, None, 1024),
    ("bad_json", None, b'{"id": "a", "embedding": [NaN, 1]}', None, None, 1024),
    ("bad_json", None, b'{"id": "a", "embedding": [1e400]}', None, None, 1024),
    ("bad_json", None, b"", None, None, 1024),
    ("not_object", None, b"[1, 2, 3]", None, None, 1024),
    ("not_object", None, b'"just a string"', None, None, 1024),
    ("missing_id", None, b'{"embedding": [1, 2]}', None, None, 1024),
    ("bad_id", None, b'{"id": 17, "embedding": [1, 2]}', None, None, 1024),
    ("bad_id", None, b'{"id": "", "embedding": [1, 2]}', None, None, 1024),
    ("bad_id", None, b'{"id": null, "embedding": [1, 2]}', None, None, 1024),
    ("id_too_large", None, encode_json("i" * (DEFAULT_MAX_ID_BYTES + 1), np.ones(4)), None, 4, 4096),
    ("id_too_large", None, encode_json("\U0001f600" * (DEFAULT_MAX_ID_BYTES // 4 + 1), np.ones(4)), None, 4, 4096),  # counted in UTF-8 bytes
    ("id_too_large", b"i" * (DEFAULT_MAX_ID_BYTES + 1), GOOD, F32, 4, 1024),  # a float32 record's id is its key
    ("missing_embedding", None, b'{"id": "a"}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": "1,2"}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": {"x": 1}}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": ["1", 2]}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": [null, 2]}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": [true, false]}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": [[1, 2], [3, 4]]}', None, None, 1024),
    ("bad_embedding", None, b'{"id": "a", "embedding": [[1], 2]}', None, None, 1024),
    ("missing_key", None, GOOD, F32, 4, 1024),
    ("missing_key", b"", GOOD, F32, 4, 1024),
    ("bad_key", b"\xff\xfe", GOOD, F32, 4, 1024),
    ("bad_length", b"k", GOOD[:-1], F32, None, 1024),
    ("empty", None, b'{"id": "a", "embedding": []}', None, None, 1024),
    ("empty", b"k", b"", F32, None, 1024),
    ("wrong_dimension", None, b'{"id": "a", "embedding": [1, 2, 3]}', None, 4, 1024),
    ("wrong_dimension", b"k", encode_float32(np.ones(5)), F32, 4, 1024),
    ("non_finite", b"k", np.array([1, np.nan, 2, 3], "<f4").tobytes(), F32, 4, 1024),
    ("non_finite", b"k", np.array([1, np.inf, 2, -np.inf], "<f4").tobytes(), F32, 4, 1024),
    ("non_finite", None, b'{"id": "a", "embedding": [1e39, 0, 0, 0]}', None, 4, 1024),  # finite JSON, inf as float32
]


@pytest.mark.parametrize("reason,key,value,headers,dim,max_bytes", REJECT, ids=[f"{c[0]}-{i}" for i, c in enumerate(REJECT)])
def test_rejection(reason, key, value, headers, dim, max_bytes):
    with pytest.raises(DecodeError) as info:
        decode_record(key, value, headers, dim=dim, max_bytes=max_bytes)
    err = info.value
    assert err.reason == reason and err.stage == REASONS[reason][0] and err.detail
    assert str(err) == f"{reason}: {err.detail}" and isinstance(err, ValueError)


@pytest.mark.parametrize("reason,key,value,headers,dim,max_bytes", REJECT, ids=[f"{c[0]}-{i}" for i, c in enumerate(REJECT)])
def test_rejection_in_a_batch(reason, key, value, headers, dim, max_bytes):
    """The batch decoder gives the same reason, alone and between two good records."""
    good = (b"g", encode_float32(np.ones(dim or 4)), F32)
    got = decode_batch([good, (key, value, headers), good], dim=dim or 4, max_bytes=max_bytes)
    assert got.valid == [0, 2] and [(pos, err.reason) for pos, err in got.failures] == [(1, reason)]


def test_every_reason_is_tested_and_stages_are_known():
    import stream_dec.io.codecs as codecs

    assert {c[0] for c in REJECT} == set(REASONS)
    assert {stage for stage, _ in REASONS.values()} == {STAGE_DECODE, STAGE_VALIDATE}
    table = {line.split()[0]: line.split()[1] for line in codecs.__doc__.splitlines() if line.split()[:1] and line.split()[0] in REASONS}
    assert table == {reason: stage for reason, (stage, _) in REASONS.items()}  # the module docstring's table


def test_size_limits_are_inclusive_and_parameters():
    vec = np.ones(4, np.float32)
    at_key, at_id = b"k" * DEFAULT_MAX_KEY_BYTES, "\U0001f600" * (DEFAULT_MAX_ID_BYTES // 4)
    assert decode_record(at_key, encode_json("a", vec), dim=4)[0] == "a"  # a JSON record's key is not its id
    assert decode_record(None, encode_json(at_id, vec), dim=4, max_bytes=1 << 16)[0] == at_id
    assert decode_record(b"i" * DEFAULT_MAX_ID_BYTES, GOOD, F32, dim=4)[0] == "i" * DEFAULT_MAX_ID_BYTES
    assert decode_record(b"", encode_json("a", vec), dim=4)[0] == "a"  # an empty key is a key, not a missing one
    with pytest.raises(DecodeError, match="key_too_large: the key is 9 bytes, over the limit of 8"):
        decode_record(b"123456789", encode_json("a", vec), max_key_bytes=8)
    with pytest.raises(DecodeError, match="id_too_large: the item id is 4 bytes as UTF-8, over the limit of 3"):
        decode_record(None, encode_json("abcd", vec), max_id_bytes=3)
    with pytest.raises(DecodeError, match="id_too_large: the item id is 4 bytes"):
        decode_record(b"\xc3\xbc\xc3\xbc", GOOD, F32, max_id_bytes=3)  # "üü": 2 characters, 4 bytes
    got = decode_batch([(b"abcd", GOOD, F32), (b"abc", GOOD, F32), (None, encode_json("abcd", vec), None)], dim=4, max_id_bytes=3)
    assert got.ids == ["abc"] and [(p, e.reason) for p, e in got.failures] == [(0, "id_too_large"), (2, "id_too_large")]
    got = decode_batch([(b"abcd", GOOD, F32), (b"abc", GOOD, F32)], dim=4, max_key_bytes=3)
    assert got.ids == ["abc"] and [(p, e.reason) for p, e in got.failures] == [(0, "key_too_large")]


def test_null_header_values_and_bytes_header_names():
    vec = np.arange(4, dtype=np.float32)
    ok = [
        (b"f", encode_float32(vec), [("trace", None), ("content-type", CONTENT_TYPE_FLOAT32.encode()), ("x", None)]),
        (None, encode_json("j", vec), [("content-type", None)]),  # a null content-type is no content-type: JSON
        (b"b", encode_float32(vec), [(b"content-type", CONTENT_TYPE_FLOAT32.encode())]),
        (None, encode_json("n", vec), None),
        (None, encode_json("e", vec), []),
    ]
    got = decode_batch(ok, dim=4)
    assert got.ids == ["f", "j", "b", "n", "e"] and not got.failures and np.array_equal(got.X, np.tile(vec, (5, 1)))
    assert content_type([("content-type", None), ("Content-Type", b"application/json")]) == "application/json"
    tombstones = [(None, None, None), (b"k", None, [("trace", None)]), (b"k" * 100_000, None, None)]
    got = decode_batch(tombstones, dim=4)
    assert [e.reason for _, e in got.failures] == ["null_value"] * 3 and got.X.shape == (0, 4)


def test_decode_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(DecodeError("validate", "empty", "0 values")))
    assert (err.stage, err.reason, err.detail) == ("validate", "empty", "0 values")


def test_encoders_refuse_non_vectors():
    with pytest.raises(ValueError, match="1-d"):
        encode_float32(np.ones((2, 2)))
    with pytest.raises(ValueError, match="1-d"):
        encode_json("a", 3.0)


# -- output records and the schemas ------------------------------------------------------


def test_schemas_are_valid_draft_2020_12():
    for name in ("input", "assignment", "drift", "lifecycle", "dlq-headers", "dlq-value-stub"):
        s = schema(name)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(s)


def test_input_schema():
    v = validator("input")
    v.validate(orjson.loads(encode_json("doc-1", np.arange(5, dtype=np.float32))))
    for bad in ({"embedding": [1.0]}, {"id": "a", "embedding": []}, {"id": "", "embedding": [1.0]}, {"id": "a", "embedding": ["1"]}, [1.0]):
        assert not v.is_valid(bad), bad


def test_assignment_record():
    raw = encode_assignment("doc-1", np.int64(3), np.float32(0.875), 2, "embeddings", 1, 41, source_timestamp_ms=1700000000000)
    rec = orjson.loads(raw)
    assert rec == {
        "kind": "assignment", "id": "doc-1", "cluster": 3, "confidence": 0.875, "model_version": 2,
        "topic": "embeddings", "partition": 1, "offset": 41, "source_timestamp_ms": 1700000000000,
    }  # fmt: skip
    v = validator("assignment")
    v.validate(rec)
    for field, bad in (("cluster", -1), ("confidence", 1.5), ("kind", "drift"), ("offset", "41"), ("id", "")):
        assert not v.is_valid({**rec, field: bad}), field
    assert not v.is_valid({k: val for k, val in rec.items() if k != "model_version"})
    with pytest.raises(ValueError, match="may not replace"):
        encode_assignment("doc-1", 3, 0.5, 2, "embeddings", 1, 41, kind="other")


def test_batch_assignment_encoding_gives_the_same_bytes():
    conf = np.array([0.875, 0.1, 1.0, 0.33333334], dtype=np.float32)
    ids, clusters, parts, offs = ["a", "b\"q", "ü", "d"], [0, 5, 17, 3], [0, 1, 2, 0], [9, 10, 11, 12]
    got = encode_assignments(ids, clusters, conf, 7, "in", parts, offs)
    assert got == [encode_assignment(i, c, q, 7, "in", p, o) for i, c, q, p, o in zip(ids, clusters, conf, parts, offs)]
    assert orjson.loads(got[3])["confidence"] == 0.33333334 and encode_assignments([], [], conf[:0], 1, "in", [], []) == []


def test_drift_record_from_a_real_report():
    from stream_dec.online.report import DriftReport

    report = DriftReport(
        model_version=5, n_items=1024, steps=3, update_ms=41.5, churn=0.0012, centre_shift=0.03,
        novelty_rate=0.02, new_cluster_ids=[7, 8], n_clusters=9, buffer_size=12, guard_action="shrunk",
    )  # fmt: skip
    rec = orjson.loads(encode_drift(report, topic="embeddings", offset_ranges={1: (10, 520), 0: (0, 511)}, batch=17))
    assert rec["kind"] == "drift" and rec["new_cluster_ids"] == [7, 8] and rec["n_clusters"] == 9 and rec["batch"] == 17
    assert rec["offset_ranges"] == [
        {"partition": 0, "first_offset": 0, "last_offset": 511},
        {"partition": 1, "first_offset": 10, "last_offset": 520},
    ]
    assert (rec["churn"], rec["guard_action"], rec["budget_exhausted"], rec["model_version"]) == (0.0012, "shrunk", False, 5)
    assert rec["plan"] == report.plan  # what of the update ran, for an exact replay
    v = validator("drift")
    v.validate(rec)
    for field, bad in (("churn", 1.5), ("new_cluster_ids", [3, 3]), ("n_items", -1), ("offset_ranges", [{"partition": 0}]),
                       ("plan", "all"), ("plan", {"steps": -1})):
        assert not v.is_valid({**rec, field: bad}), field

    # A mapping works too; undefined metrics become null and still validate.
    d = {**report.to_dict(), "centre_shift": float("nan"), "update_ms": float("inf")}
    rec2 = orjson.loads(encode_drift(d, topic="embeddings", offset_ranges={}))
    assert rec2["centre_shift"] is None and rec2["update_ms"] is None and rec2["offset_ranges"] == []
    v.validate(rec2)
    with pytest.raises(ValueError, match="lacks churn"):
        encode_drift({k: val for k, val in d.items() if k != "churn"}, topic="t", offset_ranges={})


def test_dlq_headers():
    original = [("content-type", b"application/json"), ("traceparent", b"00-abc-01"), ("__connect.errors.stage", b"stale")]
    err = DecodeError("validate", "wrong_dimension", "expected 384 values, got 768")
    headers = dlq_headers_for(err, original, "embeddings", 2, 12345)
    assert headers[:2] == original[:2]  # originals kept, in order; stale error headers replaced
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    h = headers_as_json(headers)
    assert len([k for k, _ in headers if k == "__connect.errors.stage"]) == 1
    assert h["__connect.errors.topic"] == "embeddings" and h["__connect.errors.partition"] == "2" and h["__connect.errors.offset"] == "12345"
    assert h["__connect.errors.stage"] == "validate" and h[REASON_HEADER] == "wrong_dimension"
    assert h["__connect.errors.exception.class.name"] == "stream_dec.io.codecs.DecodeError"
    assert h["__connect.errors.exception.message"] == "wrong_dimension: expected 384 values, got 768"
    validator("dlq-headers").validate(h)

    # A null header value (legal in Kafka, sent by librdkafka producers) is sent empty and
    # its position noted; kafka-python's send() refuses None.
    nulls = dlq_headers_for(err, [("a", None), ("b", b"x"), ("c", None)], "embeddings", 0, 1)
    assert nulls[:3] == [("a", b""), ("b", b"x"), ("c", b"")] and dict(nulls)["__stream_dec.dlq.null.headers"] == b"0,2"
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in nulls)
    validator("dlq-headers").validate(headers_as_json(nulls))

    long = dlq_headers(None, "t", 0, 0, "decode", "bad_json", "x" * 5000)
    assert len(headers_as_json(long)["__connect.errors.exception.message"]) <= 520

    v = validator("dlq-headers")
    assert not v.is_valid({k: val for k, val in h.items() if k != "__connect.errors.offset"})
    assert not v.is_valid({**h, "__connect.errors.partition": "-1"})
    assert not v.is_valid({**h, REASON_HEADER: "made_up"})


def test_dlq_schema_lists_every_reason_and_stage():
    props = schema("dlq-headers")["properties"]
    assert set(props[REASON_HEADER]["enum"]) == set(REASONS) | set(FEED_REASONS)
    assert set(props["__connect.errors.stage"]["enum"]) == {STAGE_DECODE, STAGE_VALIDATE}
    v = validator("dlq-headers")
    for reason, (stage, _) in {**REASONS, **FEED_REASONS}.items():
        v.validate(headers_as_json(dlq_headers([], "embeddings", 0, 1, stage, reason, "detail")))


# -- batch decoding gives what one-by-one decoding gives ----------------------------------


def _one_by_one(records, dim, max_bytes):
    out = []
    for key, value, headers in records:
        try:
            out.append(decode_record(key, value, headers, dim=dim, max_bytes=max_bytes))
        except DecodeError as err:
            out.append(err.reason)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_batch_equals_decode_record(seed):
    rng = np.random.default_rng(seed)
    good = []
    for i in range(40):
        v = rng.normal(size=4).astype(np.float32)
        good.append((f"f{i}".encode(), encode_float32(v), F32) if i % 2 else (None, encode_json(f"j{i}", v), None))
    # usable, but only through the one-by-one path: ints, a bool among numbers
    good.append((None, b'{"id": "ints", "embedding": [1, 2, 3, 4]}', None))
    good.append((None, b'{"id": "mixed", "embedding": [true, 1.5, 2, 3]}', None))
    bad = [(key, value, headers) for _, key, value, headers, _, _ in REJECT]
    records = good + bad
    order = rng.permutation(len(records))
    records = [records[j] for j in order]
    want = _one_by_one(records, 4, 256)
    got = decode_batch(records, dim=4, max_bytes=256)
    assert got.X.dtype == np.float32 and got.X.shape == (len(got.valid), 4) and got.X.flags.writeable
    assert got.valid == sorted(got.valid) and len(got.valid) + len(got.failures) == len(records)
    for row, (pos, item_id) in enumerate(zip(got.valid, got.ids)):
        wid, wvec = want[pos]
        assert item_id == wid and np.array_equal(got.X[row], wvec)
    for pos, err in got.failures:
        assert err.reason == want[pos]
    assert sorted([p for p, _ in got.failures] + got.valid) == list(range(len(records)))


def test_decode_batch_one_bad_json_row_does_not_spoil_the_rest():
    rows = [(None, encode_json(f"j{i}", np.full(3, i, np.float32)), None) for i in range(5)]
    rows.insert(2, (None, b'{"id": "s", "embedding": ["1", 2, 3]}', None))
    got = decode_batch(rows, dim=3)
    assert got.ids == [f"j{i}" for i in range(5)] and [e.reason for _, e in got.failures] == ["bad_embedding"]
    assert np.array_equal(got.X[:, 0], np.arange(5, dtype=np.float32))
    empty = decode_batch([], dim=3)
    assert empty.X.shape == (0, 3) and not empty.ids and not empty.failures


def test_assignment_root_follows_cluster_in_both_encoders():
    conf = np.array([0.5, 0.25], dtype=np.float32)
    got = encode_assignments(["a", "b"], [7, 2], conf, 3, "in", [0, 1], [5, 6], roots=[2, 2])
    assert got == [encode_assignment(i, c, q, 3, "in", p, o, root=r) for i, c, r, q, p, o in zip(["a", "b"], [7, 2], [2, 2], conf, [0, 1], [5, 6])]
    rec = orjson.loads(got[0])
    assert list(rec)[:4] == ["kind", "id", "cluster", "root"] and rec["root"] == 2
    v = validator("assignment")
    v.validate(rec)
    assert not v.is_valid({**rec, "root": -1}) and not v.is_valid({**rec, "root": "2"})


def test_lifecycle_records_from_a_real_update_validate(tmp_path):
    """The born events of a real spawn encode to records the lifecycle schema accepts."""
    from stream_dec import StreamDEC

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 8

    def blobs(k, n):
        return (centres[rng.integers(0, k, n)] + rng.normal(size=(n, 8))).astype(np.float32)

    m = StreamDEC(n_clusters=3, hidden_dims=(), pretrain_epochs=5, refine_max_iter=0, n_init=1, random_state=0, verbose=False,
                  device="cpu").fit(blobs(3, 300))
    events = []
    for _ in range(6):
        events += m.partial_fit(np.concatenate([blobs(3, 60), centres[3] + rng.normal(size=(30, 8)).astype(np.float32)])).lifecycle
    # The novel blob is born first, as a root; a fitted id may also get a child (refinement).
    assert events[0]["cluster"] == 3 and events[0]["parent"] is None
    assert all(e["event"] == "born" and (e["parent"] is None or e["parent"] in (0, 1, 2)) for e in events)
    v = validator("lifecycle")
    for e in events:
        v.validate(orjson.loads(encode_lifecycle(e, topic="embeddings")))
    rec = orjson.loads(encode_lifecycle(events[0], topic="embeddings"))
    assert rec["kind"] == "lifecycle" and rec["event"] == "born" and rec["cluster"] == 3 and rec["topic"] == "embeddings"
    assert rec["root"] == (3 if rec["parent"] is None else rec["parent"]) and rec["parent"] == m.parent_ids_[3]
    for field, bad in (("cluster", -1), ("parent", "2"), ("source_share", 1.5), ("kind", "drift"), ("gate", 0.5)):
        assert not v.is_valid({**rec, field: bad}), field
    assert not v.is_valid({k: val for k, val in rec.items() if k != "support"})
    with pytest.raises(ValueError, match="unknown lifecycle event"):
        encode_lifecycle({**events[0], "event": "merged"})
    with pytest.raises(ValueError, match="lacks support"):
        encode_lifecycle({k: val for k, val in events[0].items() if k != "support"})
    with pytest.raises(ValueError, match="own root"):
        encode_lifecycle({**events[0], "parent": None, "root": 0})

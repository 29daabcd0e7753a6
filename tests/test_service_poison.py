"""Any record in, the stream goes on: poison records through the running service.

Records as a real upstream sends them (librdkafka via confluent-kafka: null header
values, tombstones with and without a key, values larger than the service's producer
accepts, keys and ids of hundreds of KB, and one record for every decode reason),
interleaved with valid ones. One run of ``stream-dec run`` labels every valid record,
dead-letters every other with its reason, exits 0 and logs no traceback. A dead letter
the broker refuses is counted and skipped, and the offsets still move. The codec side
of these records is tests/test_poison_codecs.py.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import stat
import subprocess
import sys
from importlib import resources

import jsonschema
import numpy as np
import orjson
import pytest
from kafka_helpers import committed, consume, consumer_record, run_env, send_items, service_settings, setup_stream

from stream_dec.io import REASONS, dead_letter, decode_batch, encode_float32, encode_json
from stream_dec.io.broker import EmbeddedBroker, _resolve_binary
from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, KEY_REPLACED_HEADER, NULL_HEADERS_HEADER, REASON_HEADER, VALUE_REPLACED_HEADER
from stream_dec.service import StreamService
from stream_dec.service.batcher import Batcher, record_bytes
from stream_dec.service.hooks import BatchInfo, ServiceHooks
from stream_dec.service.progress import Progress

DIM = 24  # the blobs' dimension (tests/conftest.py)
F32 = [("content-type", CONTENT_TYPE_FLOAT32.encode())]
MiB = 1_048_576
#: Larger than the service producer's max_request_size (4 MiB): forwarded whole, it could not be sent.
HUGE_VALUE = 5 * MiB


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one of the package's JSON Schemas."""
    return jsonschema.Draft202012Validator(json.loads(resources.files("stream_dec").joinpath("schemas", f"{name}.schema.json").read_text()))


def poison_records() -> list[tuple[str, bytes | None, bytes | None, list | None]]:
    """``(reason, key, value, headers)``: every reason of codecs.REASONS, and the shapes that crashed the DLQ send."""
    vec = np.arange(DIM, dtype=np.float32)
    return [
        ("null_value", b"tomb", None, None),
        ("null_value", None, None, [("trace", None), ("b3", b"1")]),  # neither key nor value
        ("too_large", b"big", b"\x00" * HUGE_VALUE, F32 + [("trace", None)]),
        ("key_too_large", b"k" * 300_000, encode_json("a", vec), [("trace", None)]),
        ("unsupported_content_type", b"ct", b"{}", [("content-type", b"text/plain"), ("x", None)]),
        ("bad_json", None, b'{"id": "a", "embedding": [1, 2', [("x", None)]),
        ("bad_json", b"huge-json", b"[" * 1_000_000, None),  # under max_record_bytes, over the dead letter's value bound
        ("not_object", None, b"[1, 2, 3]", None),
        ("missing_id", None, orjson.dumps({"embedding": vec.tolist()}), None),
        ("bad_id", None, orjson.dumps({"id": 17, "embedding": vec.tolist()}), None),
        ("id_too_large", None, encode_json("i" * 300_000, vec), None),
        ("id_too_large", b"i" * 2049, encode_float32(vec), F32),
        ("missing_embedding", None, b'{"id": "a"}', None),
        ("bad_embedding", None, b'{"id": "a", "embedding": "1,2"}', [("trace", None)]),
        ("missing_key", None, encode_float32(vec), F32 + [("trace", None)]),
        ("bad_key", b"\xff\xfe", encode_float32(vec), F32),
        ("bad_length", b"k", encode_float32(vec)[:-1], F32),
        ("empty", None, b'{"id": "a", "embedding": []}', None),
        ("wrong_dimension", None, encode_json("a", np.ones(DIM + 1)), [("trace", None)]),
        ("non_finite", b"nan", np.array([1, np.nan] + [0] * (DIM - 2), "<f4").tobytes(), F32),
    ]


def test_the_poison_covers_every_reason():
    assert {reason for reason, *_ in poison_records()} == set(REASONS)


def _stream(X: np.ndarray) -> tuple[list[tuple], list[str], dict[int, str]]:
    """Valid records (JSON and float32, some with null headers) with a poison record after every 25th.

    Returns the records ``(key, value, headers)`` in order, the valid ids, and the reason
    expected at each poison record's offset.
    """
    poison = poison_records()
    records, ids, reasons = [], [], {}
    for i, vec in enumerate(X):
        item_id = f"item-{i}"
        trace = [("trace", None)] if i % 7 == 0 else []
        if i % 2:
            records.append((item_id.encode(), encode_float32(vec), F32 + trace))
        else:
            records.append((item_id.encode(), encode_json(item_id, vec), trace or None))
        ids.append(item_id)
        if i % 25 == 24 and poison:
            reason, key, value, headers = poison.pop(0)
            reasons[len(records)] = reason
            records.append((key, value, headers))
    assert not poison, "the stream is too short for every poison record"
    return records, ids, reasons


def _produce_with_librdkafka(bootstrap: str, topic: str, records: list[tuple]) -> None:
    """Produce records as librdkafka does (kafka-python's producer refuses null header values and keyless tombstones)."""
    from confluent_kafka import Producer

    upstream = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 8 * MiB, "linger.ms": 5})
    errors = []
    try:
        for key, value, headers in records:
            upstream.produce(topic, key=key, value=value, headers=headers, on_delivery=lambda e, _m: errors.append(e))
            upstream.poll(0)
        assert upstream.flush(60) == 0 and errors == [None] * len(records)
    finally:
        upstream.close()


def _run_env(broker, tag: str, ckpt) -> dict:
    return run_env(
        broker, tag, ckpt, STREAM_DEC_BATCH__MAX_SIZE=64,
        STREAM_DEC_BATCH__MAX_BYTES=2 * MiB,  # the 5 MiB record comes, and is batched, alone
        STREAM_DEC_PROGRESS__EVERY_BATCHES=3,
    )


def test_one_run_labels_every_valid_record_and_dead_letters_every_other(broker, blobs, tmp_path):
    tag = "poison"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    records, ids, reasons = _stream(blobs["X"][:550])
    _produce_with_librdkafka(broker.bootstrap_servers, f"in-{tag}", records)

    proc = subprocess.run([sys.executable, "-m", "stream_dec.cli", "run", "--exit-when-idle", "3"], env=_run_env(broker, tag, ckpt),
                          capture_output=True, text=True, timeout=300)
    log = proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]

    # Every valid record labelled, once.
    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", len(ids), timeout_s=60)]
    labelled = [v["id"] for v in out if v["kind"] == "assignment"]
    assert sorted(labelled) == sorted(ids)
    assert sorted(v["offset"] for v in out if v["kind"] == "assignment") == sorted(set(range(len(records))) - set(reasons))

    # Every other record in the DLQ with its reason, exactly as dead_letter() builds it from the input.
    inputs = consume(broker.bootstrap_servers, f"in-{tag}", len(records), timeout_s=60)
    decoded = decode_batch([(r.key, r.value, r.headers) for r in inputs], dim=DIM)
    assert {inputs[pos].offset: e.reason for pos, e in decoded.failures} == reasons
    expected = {inputs[pos].offset: dead_letter(e, inputs[pos].key, inputs[pos].value, inputs[pos].headers, f"in-{tag}", 0, inputs[pos].offset)
                for pos, e in decoded.failures}
    dlq = consume(broker.bootstrap_servers, f"dlq-{tag}", len(reasons), timeout_s=60)
    assert len(dlq) == len(reasons)
    headers_schema, stub_schema = schema_validator("dlq-headers"), schema_validator("dlq-value-stub")
    by_offset = {}
    for r in dlq:
        h = {k: v.decode() for k, v in r.headers}
        headers_schema.validate(h)
        offset = int(h["__connect.errors.offset"])
        by_offset[offset] = (r, h)
        assert h[REASON_HEADER] == reasons[offset] and h["__connect.errors.topic"] == f"in-{tag}"
        assert (r.key, r.value, r.headers) == tuple(expected[offset])
    assert sorted(by_offset) == sorted(reasons)

    huge = next(o for o, reason in reasons.items() if reason == "too_large")
    r, h = by_offset[huge]
    stub = orjson.loads(r.value)
    stub_schema.validate(stub)
    assert h[VALUE_REPLACED_HEADER] == str(HUGE_VALUE) and stub["original_bytes"] == HUGE_VALUE
    assert stub["sha256"] == hashlib.sha256(b"\x00" * HUGE_VALUE).hexdigest()
    assert h[NULL_HEADERS_HEADER] == "1" and r.headers[1] == ("trace", b"")  # the null header, sent empty
    big_key = next(o for o, reason in reasons.items() if reason == "key_too_large")
    assert by_offset[big_key][0].key == b"sha256:" + hashlib.sha256(b"k" * 300_000).hexdigest().encode()
    assert by_offset[big_key][1][KEY_REPLACED_HEADER] == "300000"
    tombstones = [by_offset[o][0] for o, reason in reasons.items() if reason == "null_value"]
    assert [(t.key, t.value) for t in tombstones] == [(b"tomb", None), (None, b"")]
    assert max(len(r.value or b"") for r in dlq) < MiB

    # The log: progress lines and a summary with the run's counts.
    assert len(re.findall(r"INFO stream_dec.service: progress: ", log)) >= 2
    summary = re.search(r"summary: (\d+) batches, (\d+) records: (\d+) labelled, (\d+) dead-lettered.*by reason \{(.*?)\}", log)
    assert summary, log[-3000:]
    assert [int(g) for g in summary.groups()[1:4]] == [len(records), len(ids), len(reasons)]
    assert dict(kv.split(": ") for kv in summary.group(5).split(", ")) == {k: str(n) for k, n in collections.Counter(reasons.values()).items()}
    assert "not delivered" not in log
    assert committed(broker, f"g-{tag}", f"in-{tag}") == len(records)
    print(*[line for line in log.splitlines() if "progress: " in line or "summary: " in line], sep="\n")


# -- a dead letter the broker refuses ---------------------------------------------------------


#: Stream tag of each delivery guarantee in the refused-dead-letter test.
REFUSED_TAGS = {"at_least_once": "refuse-alo", "exactly_once": "refuse-eos"}


@pytest.fixture(scope="module")
def refusing_broker(tmp_path_factory):
    """A broker whose DLQ topics (``dlq-<guarantee>``) have a JSON Schema no dead letter meets, so
    it refuses every one (tansu validates records against ``<topic>.json`` in its schema registry)."""
    d = tmp_path_factory.mktemp("refusing")
    (d / "schemas").mkdir()
    schema = json.dumps({"type": "object", "properties": {"value": {"type": "object", "required": ["never"]}}})
    for tag in REFUSED_TAGS.values():
        (d / "schemas" / f"dlq-{tag}.json").write_text(schema)
    wrapper = d / "tansu-with-schemas"
    wrapper.write_text(f'#!/bin/sh\ncd "{d}"\nexec "{_resolve_binary()}" "$@" --schema-registry file://./schemas\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    with EmbeddedBroker(binary=wrapper) as b:
        yield b


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_refused_dead_letter_is_counted_and_skipped(refusing_broker, blobs, tmp_path, guarantee, caplog):
    broker, tag = refusing_broker, REFUSED_TAGS[guarantee]
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    items = [(f"item-{i}", blobs["X"][i]) for i in range(150)]
    bad = [(b"b1", b"{not json", None), (b"b2", encode_json("x", np.ones(3)), None), (b"b3", b"[1]", None)]
    send_items(broker, f"in-{tag}", items, bad)

    settings = service_settings(broker, ckpt, tag, kafka__processing_guarantee=guarantee)
    service = StreamService(settings)
    caplog.set_level("INFO", logger="stream_dec.service")
    assert service.run(max_idle_s=2.5, install_signals=False) == 0

    out = [json.loads(r.value) for r in consume(broker.bootstrap_servers, f"out-{tag}", len(items), timeout_s=60)]
    assert sorted(v["id"] for v in out if v["kind"] == "assignment") == sorted(i for i, _ in items)  # the output producer is unharmed
    expected = collections.Counter({"bad_json": 1, "wrong_dimension": 1, "not_object": 1})
    assert service.dead_letters.failed == expected and not service.dead_letters.delivered
    registry = service.metrics.registry
    for reason, n in expected.items():
        assert registry.get_sample_value("stream_dec_dlq_send_failures_total", {"reason": reason}) == n
        assert registry.get_sample_value("stream_dec_dlq_records_total", {"reason": reason}) is None
    assert registry.get_sample_value("stream_dec_records_total", {"outcome": "dead_lettered"}) == 3
    total = len(items) + len(bad)
    assert service.offsets == {0: total} and committed(broker, f"g-{tag}", f"in-{tag}") == total  # the offsets moved
    assert any(f"dead letter(s) not delivered to dlq-{tag}" in m for m in caplog.messages)
    assert any(m.startswith("summary: ") and "not delivered: {" in m for m in caplog.messages)


# -- bounds before memory: the batcher and the progress tally, without a broker ----------------


def _sized(offset: int, nbytes: int):
    return consumer_record(0, offset, key=b"k", value=b"v" * (nbytes - 1))


def test_batches_are_cut_by_bytes_and_an_oversized_record_goes_alone():
    b = Batcher(100, 60_000, max_bytes=1_000)
    b.add([_sized(0, 400), _sized(1, 400), _sized(2, 400), _sized(3, 5_000), _sized(4, 100), _sized(5, 100)])
    assert b.pending_bytes == 6_400 and record_bytes(b.pending[3]) == 5_000
    cuts = [[r.offset for r in b.cut({}).records] for _ in range(3)]
    assert cuts == [[0, 1], [2], [3]]  # within the byte bound; the 5,000-byte record alone
    assert b.pending_bytes == 200 and b.cut({}) is None  # 200 bytes and 2 records: still filling
    assert [r.offset for r in b.cut({}, now=True).records] == [4, 5] and b.pending_bytes == 0


def test_the_count_bound_still_applies_and_headers_count():
    b = Batcher(2, 60_000, max_bytes=10_000)
    with_headers = consumer_record(0, 0, key=b"k", value=b"v")._replace(serialized_header_size=500)
    b.add([with_headers, _sized(1, 10), _sized(2, 10)])
    assert b.pending_bytes == 2 + 500 + 20
    assert [r.offset for r in b.cut({}).records] == [0, 1] and b.pending_bytes == 10


def test_progress_sees_what_the_hooks_see_and_passes_it_on():
    seen = []
    p = Progress(every_batches=2, every_s=0)
    hooks = p.observe(ServiceHooks(on_batch=seen.append))
    info = BatchInfo(records=[consumer_record(0, o) for o in range(5)], end={0: 5}, labelled=4, dead_lettered=1, relearnt=False, started=0.0)
    hooks.on_batch(info)
    assert seen == [info] and not p.due()
    hooks.on_batch(info)

    class Report:
        new_cluster_ids, churn = [7], 0.004

    hooks.on_update(Report, 0.0, 1.0)
    hooks.on_checkpoint(3, 0.1)
    assert p.due()
    line = p.line(lag=12)
    assert line.startswith("progress: 2 batches, 10 records: 8 labelled, 2 dead-lettered; 1 updates, 1 new id, churn mean 0.40%")
    assert line.endswith("lag 12") and not p.due()
    summary = p.summary(delivered={"bad_json": 2}, failed={"empty": 1}, first_version=0, last_version=1)
    assert "by reason {bad_json: 2} (not delivered: {empty: 1}); model versions 0 -> 1; 1 checkpoints" in summary

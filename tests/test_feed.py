"""Feed records (latents from predictors to the learner): round trip, chunking, each failure reason, sampling."""

from __future__ import annotations

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka_helpers import consume

from stream_dec.io.codecs import DecodeError
from stream_dec.io.feed import (
    FEED_CONTENT_TYPE,
    FEED_MAX_ROWS,
    FEED_REASONS,
    decode_feed_batch,
    decode_latents,
    encode_latents,
    sample_mask,
)
from stream_dec.io.modeltopic import ensure_topics


def latents(n, d=128, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def headers(rows=2, dim=3, version=b"4", encoder=b"enc", ctype=FEED_CONTENT_TYPE):
    out = [("content-type", ctype), ("rows", rows), ("dim", dim), ("model-version", version), ("encoder", encoder)]
    return [(k, v if isinstance(v, bytes) or v is None else b"%d" % v) for k, v in out]


def test_round_trip_and_chunking():
    Z = latents(2 * FEED_MAX_ROWS + 5)
    recs = encode_latents(Z, model_version=12, encoder="sha:abc")
    assert len(recs) == 3
    chunks = [decode_latents(v, h) for v, h in recs]
    assert [c.Z.shape for c in chunks] == [(FEED_MAX_ROWS, 128), (FEED_MAX_ROWS, 128), (5, 128)]
    assert {(c.model_version, c.encoder) for c in chunks} == {(12, "sha:abc")}
    np.testing.assert_array_equal(np.concatenate([c.Z for c in chunks]), Z)
    assert chunks[0].Z.flags.writeable and chunks[0].Z.dtype == np.float32
    v, h = recs[2]
    assert v == Z[-5:].astype("<f4").tobytes()
    assert dict(h) == {"content-type": FEED_CONTENT_TYPE, "rows": b"5", "dim": b"128", "model-version": b"12", "encoder": b"sha:abc"}
    assert encode_latents(np.empty((0, 8), np.float32), model_version=0, encoder="e") == []


def test_encode_refuses_what_the_learner_would_reject():
    for Z, kw in [(np.zeros(4), {}), (np.zeros((2, 0)), {}), (np.array([[1.0, np.nan]]), {}),
                  (np.zeros((1, 2)), {"model_version": -1}), (np.zeros((1, 2)), {"encoder": ""})]:
        with pytest.raises(ValueError):
            encode_latents(Z, **{"model_version": 1, "encoder": "e", **kw})


@pytest.mark.parametrize("value, hdrs, reason", [
    (None, headers(), "null_value"),
    (bytes(24), [], "unsupported_content_type"),
    (bytes(24), headers(ctype=b"application/x-float32"), "unsupported_content_type"),
    (bytes(24), headers(rows=None), "bad_header"),
    (bytes(24), headers(rows=0), "bad_header"),
    (bytes(24), headers(dim=b"-3"), "bad_header"),
    (bytes(24), headers(version=b"1.5"), "bad_header"),
    (bytes(24), headers(encoder=None), "bad_header"),
    (bytes(24), headers(encoder=b"\xff\xfe"), "bad_header"),
    (bytes(20), headers(), "bad_length"),
    (np.array([1, 2, np.inf, 4, 5, 6], "<f4").tobytes(), headers(), "non_finite"),
])
def test_each_malformed_record_has_its_reason(value, hdrs, reason):
    with pytest.raises(DecodeError) as err:
        decode_latents(value, hdrs)
    assert err.value.reason == reason and err.value.stage == FEED_REASONS[reason][0]
    assert isinstance(err.value, ValueError) and err.value.detail


def test_batch_keeps_valid_rows_in_order_and_reports_failures(broker):
    """Through a real topic: what kafka-python hands the learner decodes as sent."""
    ensure_topics(broker.bootstrap_servers, {"feed-batch": 1})
    A, B, C = latents(3, 16, 1), latents(FEED_MAX_ROWS + 2, 16, 2), latents(4, 8, 3)
    sent = [*encode_latents(A, model_version=1, encoder="e1"),
            (bytes(7), headers()),  # bad_length
            *encode_latents(B, model_version=2, encoder="e1"),  # two records
            *encode_latents(C, model_version=2, encoder="e1"),  # wrong dimension
            *encode_latents(A, model_version=2, encoder="e2")]  # another encoder
    p = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for value, hdrs in sent:
        p.send("feed-batch", key=b"predictor-0", value=value, headers=hdrs)
    p.flush()
    p.close()
    records = consume(broker.bootstrap_servers, "feed-batch", len(sent))

    Z, failures = decode_feed_batch(records, dim=16)
    np.testing.assert_array_equal(Z, np.concatenate([A, B, A]))
    assert [(i, e.reason) for i, e in failures] == [(1, "bad_length"), (4, "wrong_dimension")]
    Z, failures = decode_feed_batch(records, dim=16, encoder="e1")
    np.testing.assert_array_equal(Z, np.concatenate([A, B]))
    assert [(i, e.reason) for i, e in failures] == [(1, "bad_length"), (4, "wrong_dimension"), (5, "wrong_encoder")]
    Z, failures = decode_feed_batch(records[1:2], dim=16)
    assert Z.shape == (0, 16) and Z.dtype == np.float32 and len(failures) == 1


def test_sample_mask_is_deterministic_and_accurate():
    ids = [f"item-{i}" for i in range(100_000)]
    m10 = sample_mask(ids, 0.1)
    assert abs(m10.mean() - 0.1) < 0.005
    assert abs(sample_mask(ids, 0.5).mean() - 0.5) < 0.005
    np.testing.assert_array_equal(m10, sample_mask(list(ids), 0.1))  # same ids, same picks
    # Per id, not per position: a shuffled list picks the same ids.
    perm = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(sample_mask([ids[i] for i in perm], 0.1), m10[perm])
    assert not (m10 & ~sample_mask(ids, 0.2)).any()  # a lower rate's sample lies inside a higher one's
    assert sample_mask(ids, 1.0).all() and not sample_mask(ids, 0.0).any()
    assert sample_mask([], 0.5).shape == (0,)
    assert sample_mask(["é"], 1.0).tolist() == [True]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            sample_mask(ids[:3], bad)


def test_sample_mask_agrees_across_processes():
    """Another interpreter (another hash seed) samples the same ids: the mask hashes bytes, not Python objects."""
    import subprocess
    import sys

    code = "from stream_dec.io.feed import sample_mask; print(''.join('1' if b else '0' for b in sample_mask([f'id{i}' for i in range(2000)], 0.3)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    here = "".join("1" if b else "0" for b in sample_mask([f"id{i}" for i in range(2000)], 0.3))
    assert out == here and 500 < out.count("1") < 700

"""The batch histogram exposes exactly what prometheus-client's Histogram would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream_dec.service.metrics import BatchHistogram

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _lines(registry):
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_batch_histogram_matches_the_client_histogram():
    values = np.concatenate([np.random.default_rng(0).exponential(0.2, 500), BUCKETS, [0.0, 99.0]])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = BatchHistogram("lat_seconds", "Latency.", BUCKETS, ours)
    ref = Histogram("lat_seconds", "Latency.", buckets=BUCKETS, registry=theirs)
    h.observe_many(values[:300])
    h.observe_many(values[300:-1])
    h.observe_many([])
    h.observe(values[-1])
    for v in values:
        ref.observe(v)
    a, b = _lines(ours), _lines(theirs)
    split = [i for i, line in enumerate(a) if line.startswith("lat_seconds_sum")]
    assert len(split) == 1 and a[: split[0]] == b[: split[0]] and a[split[0] + 1 :] == b[split[0] + 1 :]
    assert abs(float(a[split[0]].split()[1]) - float(b[split[0]].split()[1])) < 1e-9  # summation order differs
    assert 'lat_seconds_bucket{le="0.01"}' in "\n".join(a) and "lat_seconds_count 510.0" in a

"""Clustering metrics (stream_dec.evaluation), and the scale-out metrics of the service (stream_dec.service.metrics)."""

from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_dec.evaluation import ari, churn, cluster_acc, nmi
from stream_dec.service import metrics as service_metrics
from stream_dec.service.metrics import ROLES, ServiceMetrics


def test_acc_is_permutation_invariant():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_acc(y, np.array([5, 5, 3, 3, 9, 9])) == 1.0


def test_acc_rectangular_counts_unmatched_as_errors():
    y = np.array([0, 0, 0, 1, 1, 1])
    # 3 clusters for 2 classes: the best one-to-one matching covers 2+3 items.
    assert cluster_acc(y, np.array([0, 0, 2, 1, 1, 1])) == pytest.approx(5 / 6)
    # 1 cluster for 2 classes: only one class can be matched.
    assert cluster_acc(y, np.zeros(6, dtype=int)) == pytest.approx(0.5)


def test_nmi_ari_perfect_and_random():
    y = np.repeat(np.arange(4), 50)
    assert nmi(y, y) == pytest.approx(1.0)
    assert ari(y, y) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert abs(ari(y, rng.integers(0, 4, size=len(y)))) < 0.1


def test_churn_counts_raw_id_changes():
    assert churn(np.array([1, 2, 3, 4]), np.array([1, 2, 4, 3])) == 0.5
    with pytest.raises(ValueError):
        churn(np.array([1]), np.array([1, 2]))


# ----------------------------------------------------------------------------- service metrics of the scale-out roles
def _value(m: ServiceMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.fixture
def clock(monkeypatch):
    """The metrics module's clock, set by the test (propagation times are measured against it)."""
    now = SimpleNamespace(t=1_000_000.0)
    monkeypatch.setattr(service_metrics, "time", SimpleNamespace(time=lambda: now.t))
    return now


def test_every_process_exports_one_role_default_all():
    m = ServiceMetrics()
    assert {r: _value(m, "stream_dec_role_info", role=r) for r in ROLES} == {"all": 1, "learner": 0, "predictor": 0}
    m.set_role("predictor")
    assert {r: _value(m, "stream_dec_role_info", role=r) for r in ROLES} == {"all": 0, "learner": 0, "predictor": 1}
    m.set_role("learner")
    assert {r: _value(m, "stream_dec_role_info", role=r) for r in ROLES} == {"all": 0, "learner": 1, "predictor": 0}
    with pytest.raises(ValueError, match="unknown role 'owner'"):
        m.set_role("owner")
    assert _value(m, "stream_dec_role_info", role="learner") == 1  # unchanged by the refused role


def test_a_predictor_swapping_versions_records_version_snapshot_time_and_propagation(clock):
    m = ServiceMetrics()
    m.set_role("predictor")
    assert _value(m, "stream_dec_snapshot_published_timestamp_seconds") == 0
    m.newest_known_version(7)
    m.model_swapped(7, published_at=clock.t - 3.0)  # in use 3 s after its publication
    m.newest_known_version(9)
    m.model_swapped(9, published_at=clock.t - 0.2)
    assert _value(m, "stream_dec_model_version") == 9
    assert _value(m, "stream_dec_model_newest_known_version") == 9
    assert _value(m, "stream_dec_snapshot_published_timestamp_seconds") == clock.t - 0.2
    assert _value(m, "stream_dec_model_propagation_seconds_count") == 2
    assert _value(m, "stream_dec_model_propagation_seconds_sum") == pytest.approx(3.2)
    assert _value(m, "stream_dec_model_propagation_seconds_bucket", le="0.25") == 1
    assert _value(m, "stream_dec_model_propagation_seconds_bucket", le="2.5") == 1
    assert _value(m, "stream_dec_model_propagation_seconds_bucket", le="5.0") == 2
    # A version whose publication time is unknown: the version moves, nothing is observed.
    m.model_swapped(10, published_at=None)
    assert _value(m, "stream_dec_model_version") == 10
    assert _value(m, "stream_dec_model_propagation_seconds_count") == 2
    assert _value(m, "stream_dec_snapshot_published_timestamp_seconds") == clock.t - 0.2
    # A publisher's clock ahead of this machine's: observed as 0, never negative.
    m.model_swapped(11, published_at=clock.t + 5.0)
    assert _value(m, "stream_dec_model_propagation_seconds_count") == 3
    assert _value(m, "stream_dec_model_propagation_seconds_bucket", le="0.05") == 1
    assert _value(m, "stream_dec_model_propagation_seconds_sum") == pytest.approx(3.2)


def test_the_learner_publishing_snapshots_counts_them_with_size_time_and_version():
    m = ServiceMetrics()
    m.set_role("learner")
    assert _value(m, "stream_dec_snapshots_published_total") == 0
    m.snapshot_published(41, nbytes=310_000, published_at=1_700_000_000.5)
    m.snapshot_published(42, nbytes=312_345, published_at=1_700_000_001.25)
    assert _value(m, "stream_dec_snapshots_published_total") == 2
    assert _value(m, "stream_dec_snapshot_bytes") == 312_345
    assert _value(m, "stream_dec_snapshot_published_timestamp_seconds") == 1_700_000_001.25
    assert _value(m, "stream_dec_model_version") == 42
    assert _value(m, "stream_dec_model_propagation_seconds_count") == 0  # a predictor's figure


def test_rejected_snapshots_add_up_from_zero():
    m = ServiceMetrics()
    assert _value(m, "stream_dec_snapshots_rejected_total") == 0
    m.snapshot_rejected(1)
    m.snapshot_rejected(0)
    m.snapshot_rejected(2)
    assert _value(m, "stream_dec_snapshots_rejected_total") == 3


def test_feed_sampling_counts_sent_and_skipped_and_keeps_the_last_rate():
    m = ServiceMetrics()
    # Before any rate is known, every item is learnt (always so in role all), and both
    # outcome series exist at 0 so that increase() sees their first items.
    assert _value(m, "stream_dec_feed_sample_rate") == 1
    assert _value(m, "stream_dec_feed_items_total", outcome="sent") == 0
    assert _value(m, "stream_dec_feed_items_total", outcome="skipped") == 0
    m.feed_sampled(1.0, sent=4096, skipped=0)
    m.feed_sampled(0.25, sent=1000, skipped=3096)
    assert _value(m, "stream_dec_feed_sample_rate") == 0.25
    assert _value(m, "stream_dec_feed_items_total", outcome="sent") == 5096
    assert _value(m, "stream_dec_feed_items_total", outcome="skipped") == 3096
    learner = ServiceMetrics()
    learner.advised_sample_rate(0.5)
    assert _value(learner, "stream_dec_feed_sample_rate") == 0.5
    assert _value(learner, "stream_dec_feed_items_total", outcome="sent") == 0


def test_waiting_for_model_is_a_flag():
    m = ServiceMetrics()
    assert _value(m, "stream_dec_waiting_for_model") == 0
    m.waiting_for_model(True)
    assert _value(m, "stream_dec_waiting_for_model") == 1
    m.waiting_for_model(False)
    assert _value(m, "stream_dec_waiting_for_model") == 0


def test_forgotten_partitions_leave_no_lag_behind():
    m = ServiceMetrics()
    m.record_positions({0: (100, 150), 1: (10, 10), 2: (5, None)})
    m.forget_partitions([0, 2, 7])  # 7 was never assigned here
    assert _value(m, "stream_dec_consumer_lag_records", partition="0") is None
    assert _value(m, "stream_dec_input_position_offset", partition="0") is None
    assert _value(m, "stream_dec_input_highwater_offset", partition="0") is None
    assert _value(m, "stream_dec_input_position_offset", partition="2") is None
    assert _value(m, "stream_dec_consumer_lag_records", partition="1") == 0
    assert _value(m, "stream_dec_input_position_offset", partition="1") == 10


def test_the_scale_out_metrics_are_exposed_with_their_types():
    m = ServiceMetrics()
    m.set_role("predictor")
    m.model_swapped(3, published_at=None)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    expected = {
        "stream_dec_role_info": "gauge",
        "stream_dec_model_newest_known_version": "gauge",
        "stream_dec_snapshot_published_timestamp_seconds": "gauge",
        "stream_dec_snapshot_bytes": "gauge",
        "stream_dec_snapshots_published": "counter",
        "stream_dec_snapshots_rejected": "counter",
        "stream_dec_model_propagation_seconds": "histogram",
        "stream_dec_feed_sample_rate": "gauge",
        "stream_dec_feed_items": "counter",
        "stream_dec_waiting_for_model": "gauge",
    }
    assert {name: families[name].type for name in expected if name in families} == expected
    roles = {s.labels["role"]: s.value for s in families["stream_dec_role_info"].samples}
    assert roles == {"all": 0.0, "learner": 0.0, "predictor": 1.0}
    assert [s.value for s in families["stream_dec_model_version"].samples] == [3.0]

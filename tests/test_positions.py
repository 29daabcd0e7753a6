"""Input positions against the log without a broker: what is outside, what the policy does, what is counted.

stream_dec/service/positions.py decides from positions, high watermarks and log starts;
the Kafka side (tansu's silent fetch past the end, Apache Kafka's refusal) is in
tests/test_service_outage.py.
"""

from __future__ import annotations

import logging

import pytest

from stream_dec.service.metrics import ServiceMetrics
from stream_dec.service.outage import Outage, OffsetsOutOfRangeError
from stream_dec.service.positions import InputPositions, outside_log, refused_outside
from stream_dec.settings import load_settings


def _positions(policy):
    settings = load_settings(kafka__input_topic="in", kafka__offset_reset_policy=policy)
    metrics = ServiceMetrics()
    return InputPositions(settings, metrics, Outage(settings, metrics)), metrics


def test_a_position_past_the_high_watermark_is_past_the_end():
    # tansu answers such a fetch with no records and no error: only the watermark shows it.
    assert outside_log({0: (500, 120), 1: (120, 120), 2: (7, None)}) == {0: ("past_end", 500, 120)}


def test_log_starts_are_compared_only_when_looked_up():
    seen = {0: (10, 300), 1: (250, 300), 2: (5, 300)}
    assert outside_log(seen) == {}
    assert outside_log(seen, starts={0: 100, 1: 100}) == {0: ("before_start", 10, 100)}
    assert outside_log({0: (900, 300)}, starts={0: 1000}) == {0: ("past_end", 900, 300)}  # past the end wins


def test_a_refused_fetch_is_placed_against_the_log_start():
    assert refused_outside({0: 3, 1: 3, 2: 3}, starts={0: 10, 1: 0}, highwaters={1: 2}) == {
        0: ("before_start", 3, 10), 1: ("past_end", 3, 2), 2: ("past_end", 3, None)}


def test_policy_fail_counts_logs_and_raises_naming_every_partition(caplog):
    positions, metrics = _positions("fail")
    outside = {1: ("before_start", 5, 40), 0: ("past_end", 900, 300)}
    with caplog.at_level(logging.ERROR, logger="stream_dec.service"), pytest.raises(OffsetsOutOfRangeError) as exc:
        positions.report(outside)
    assert str(exc.value).startswith("input positions outside the log of 'in': partition 0 at 900 (past end 300), "
                                     "partition 1 at 5 (before start 40);")
    assert [r.getMessage() for r in caplog.records] == [
        "input in[0]: position 900 is past the log's end 300: the log was truncated, the topic recreated or the broker restored empty",
        "input in[1]: position 5 is before the log's start 40: 35 records were deleted (retention) before the service read them",
    ]
    assert metrics.offset_resets.labels("past_end")._value.get() == 1
    assert metrics.offset_resets.labels("before_start")._value.get() == 1


def test_policy_earliest_counts_and_lets_the_service_reset():
    positions, metrics = _positions("earliest")
    positions.report({0: ("past_end", 900, 300)})
    assert metrics.offset_resets.labels("past_end")._value.get() == 1


def test_an_assignment_asks_for_the_log_start_check_and_an_empty_one_does_not():
    positions, _ = _positions("earliest")
    positions.assigned([0])
    assert positions.check_log_starts
    positions.assigned([])
    assert not positions.check_log_starts

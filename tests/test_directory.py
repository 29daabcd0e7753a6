"""Refused writes to the checkpoint directory: counted, backed off up to a ceiling, recovery logged (stream_dec/service/directory.py)."""

from __future__ import annotations

import logging

from stream_dec.service.directory import MAX_BACKOFF_S, DirectoryHealth
from stream_dec.service.metrics import ServiceMetrics


def test_failures_double_the_wait_up_to_the_ceiling_and_count(caplog):
    metrics = ServiceMetrics()
    health = DirectoryHealth("/ckpt", metrics)
    assert not health.waiting()
    waits = []
    with caplog.at_level(logging.ERROR, logger="stream_dec.service"):
        for _ in range(8):
            health.failed(PermissionError("read-only file system"))
            waits.append(health.backoff_s)
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert metrics.ckpt_failures._value.get() == 8 and health.waiting()
    assert caplog.records[0].getMessage() == ("checkpoint directory /ckpt unusable (read-only file system); nothing is "
                                              "published until the journal can be written, retrying in 0.1s")


def test_the_first_success_after_failures_is_logged_once(caplog):
    health = DirectoryHealth("/ckpt", ServiceMetrics())
    with caplog.at_level(logging.WARNING, logger="stream_dec.service"):
        health.ok()
        health.failed(OSError("gone"))
        health.ok()
        health.ok()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "checkpoint directory /ckpt usable again; resuming"]
    assert health.backoff_s == 0.0

"""Kafka fixtures: a fresh embedded tansu broker per test module, and the consume helper as a fixture.

Imported by ``conftest.py``. Memory storage never frees data, so each module gets its
own broker. The helpers themselves (settings, sending, consuming) live in
kafka_helpers.py; ``consume`` is re-exported here for the modules that import it from
this file.
"""

from __future__ import annotations

import pytest
from kafka_helpers import consume

from stream_dec.io.broker import EmbeddedBroker

__all__ = ["broker", "consume", "kafka_consume"]


@pytest.fixture(scope="module")
def broker():
    """A running embedded broker, fresh for each test module (``broker.bootstrap_servers``)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def kafka_consume():
    """The :func:`kafka_helpers.consume` helper, as a fixture for modules that prefer not to import it."""
    return consume

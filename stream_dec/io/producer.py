"""The one tuned Kafka producer configuration of stream-dec.

Every producer of the package (``stream-dec produce``, the demo, the compose demo
producer, the service) starts from :func:`producer_config`, so a fix to the tuning
reaches all of them. Why each default differs from kafka-python's is in
docs/kafka-notes.md:

- a short linger and large batches: the client's defaults (linger 0, 16 KB batches)
  send several times fewer records per second, and the batch size chosen at produce
  time also decides how fast consumers read the topic back;
- a ``max_request_size`` sized from the largest record: the client's 1 MB default
  rejects a 1 MB value;
- idempotence only with ``acks="all"``, the one setting it works with (the client
  would otherwise warn and turn it off).

Callers override what they must differ in: ``linger_ms`` (:data:`PACED_LINGER_MS` for a
rate-limited producer), ``acks``, ``transactional_id``, ``client_id``...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # kafka is imported only by make_producer, so the config stays cheap to build
    from kafka import KafkaProducer

MB = 1_048_576
#: Linger of a throughput producer: long enough to fill large batches under load.
LINGER_MS = 20
#: Linger of a rate-limited producer: a paced record should leave at once, as its batch will not fill.
PACED_LINGER_MS = 5
#: Bytes per batch and partition; large batches also make the topic faster to consume.
BATCH_BYTES = MB
#: Floor of ``max_request_size``, above kafka-python's 1 MB default that rejects 1 MB values.
MIN_REQUEST_BYTES = 4 * MB
#: Room for the key, headers and batch framing beside the largest value.
REQUEST_HEADROOM_BYTES = 65_536


def max_request_size(max_record_bytes: int) -> int:
    """The ``max_request_size`` that admits values of up to ``max_record_bytes`` bytes.

    >>> max_request_size(1_048_576)
    4194304
    >>> max_request_size(4_000_000)
    8065536
    """
    return max(MIN_REQUEST_BYTES, 2 * int(max_record_bytes) + REQUEST_HEADROOM_BYTES)


def producer_config(
    bootstrap_servers: str | Sequence[str],
    *,
    client_id: str = "stream-dec",
    acks: str | int = "all",
    max_record_bytes: int = MB,
    timeout_s: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``kafka.KafkaProducer`` for the tuned stream-dec producer.

    ``bootstrap_servers``: ``"host:port,host:port"`` or a list. ``acks``: ``"all"``,
    ``0``/``1`` (also as strings); idempotence is on exactly when it is ``"all"``.
    ``max_record_bytes``: the largest value this producer sends. ``timeout_s``: when
    given, the producer gives up on connecting, on a full buffer and on a request after
    this long, and on delivering a record after ``max(3 * timeout_s, 30)`` seconds, so a
    command line tool fails with a message instead of waiting for minutes; ``None``
    keeps the client's own timeouts (a long-running service that rides out a broker
    restart). ``overrides`` are any other ``KafkaProducer`` settings and win over all
    of the above.

    >>> cfg = producer_config("a:9092, b:9092", acks="1", timeout_s=2)
    >>> cfg["bootstrap_servers"], cfg["acks"], cfg["enable_idempotence"], cfg["linger_ms"]
    (['a:9092', 'b:9092'], 1, False, 20)
    >>> cfg["max_block_ms"], cfg["delivery_timeout_ms"]
    (2000, 30000)
    >>> producer_config("a:9092", linger_ms=PACED_LINGER_MS)["linger_ms"]
    5
    """
    servers = bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
    servers = [s.strip() for s in servers if s.strip()]
    if not servers:
        raise ValueError("bootstrap_servers: expected host:port, got nothing")
    acks_value: str | int = "all" if str(acks) in ("all", "-1") else int(acks)
    config: dict[str, Any] = {
        "bootstrap_servers": servers,
        "client_id": client_id,
        "acks": acks_value,
        "enable_idempotence": acks_value == "all",
        "linger_ms": LINGER_MS,
        "batch_size": BATCH_BYTES,
        "max_request_size": max_request_size(max_record_bytes),
    }
    if timeout_s is not None:
        timeout_ms = int(timeout_s * 1000)
        config.update(
            bootstrap_timeout_ms=timeout_ms,
            max_block_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            delivery_timeout_ms=max(3 * timeout_ms, 30_000),
        )
    config.update(overrides)
    return config


def make_producer(bootstrap_servers: str | Sequence[str], **overrides: Any) -> KafkaProducer:
    """A ``kafka.KafkaProducer`` with :func:`producer_config` (same arguments).

    Raises a ``kafka.errors.KafkaError`` (a timeout) when no broker answers within the
    bootstrap timeout.
    """
    from kafka import KafkaProducer

    return KafkaProducer(**producer_config(bootstrap_servers, **overrides))

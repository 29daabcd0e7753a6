"""The service's Kafka clients: consumer and producer settings, the assignor, the rebalance listener.

Why the settings differ from kafka-python's defaults is in docs/kafka-notes.md.

Invariants:

* Offsets are never committed automatically: the outputs decide when (after the
  batch's outputs are acknowledged, or inside its transaction).
* The service positions every assigned partition itself (the checkpoint's offset, or
  the beginning), never at the end. The client resets nothing on its own
  (``auto_offset_reset="none"``): a position outside the log raises, and the service
  applies ``STREAM_DEC_KAFKA__OFFSET_RESET_POLICY`` and says so.
* Under exactly-once the input is read ``read_committed``.
* Every input partition goes to one member of the group (:class:`AllToOneAssignor`):
  one model per stream; the other members stand by.
* Rebalance callbacks run on the client's IO thread (kafka-python 3), which also sends
  the heartbeats: the listener only forwards them, and the service only records them
  there; the loop's thread does the work.
* Partitions *lost* (the session expired, the group moved on) are told apart from
  partitions *revoked* (a rebalance this member takes part in): kafka-python's default
  ``on_partitions_lost`` calls ``on_partitions_revoked``, which would let a member that
  was away for its whole session flush and commit as if it still owned them.
"""

from __future__ import annotations

from typing import Any, Callable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.abstract import (
    AbstractPartitionAssignor,
    ConsumerProtocolAssignment,
    ConsumerProtocolSubscription,
)

from stream_dec.io.producer import producer_config

#: Floor of the per-partition fetch size (a fetch takes at most ``batch.max_bytes`` in all).
MIN_PARTITION_FETCH_BYTES = 8 * 1024 * 1024
#: Linger of the output producer: short, as the loop flushes (or commits) once per micro-batch,
#: so its batches are whole micro-batches already.
OUTPUT_LINGER_MS = 5
#: Seconds one try to reach the broker may take (start-up, metadata, one output's delivery
#: within three times this): short, so an outage is noticed, reported and retried with
#: backoff (stream_dec/service/outage.py) instead of blocking the loop for minutes.
CONNECT_TIMEOUT_S = 10


class AllToOneAssignor(AbstractPartitionAssignor):
    """Every partition to one member (the lowest member id); the others stand by.

    A second instance in the group must not grow a second model that hands out
    conflicting ids for the same stream; with this assignor it idles until the owner
    leaves, then takes over from the newest checkpoint.
    """

    name = "stream-dec-all-to-one"
    version = 0

    @classmethod
    def assign(cls, cluster, members):
        """Map every subscribed partition to the first member by member id."""
        owner = min(m.member_id for m in members)
        topics = sorted({t for m in members for t in m.metadata.topics})
        owned = [(t, sorted(cluster.partitions_for_topic(t) or [])) for t in topics]
        return {
            m.member_id: ConsumerProtocolAssignment(cls.version, owned if m.member_id == owner else [], b"")
            for m in members
        }

    @classmethod
    def metadata(cls, topics):
        """Subscription metadata: just the topics."""
        return ConsumerProtocolSubscription(cls.version, list(topics), b"")

    @classmethod
    def on_assignment(cls, assignment, generation):
        """Nothing to remember between generations."""


class RebalanceListener(ConsumerRebalanceListener):
    """Forwards the group's partition changes (as lists) to three callables; they must return at once.

    Without ``on_lost``, lost partitions go to ``on_revoked`` (kafka-python's default).
    """

    def __init__(self, on_assigned: Callable[[list[TopicPartition]], None], on_revoked: Callable[[list[TopicPartition]], None],
                 on_lost: Callable[[list[TopicPartition]], None] | None = None):
        self._assigned, self._revoked, self._lost = on_assigned, on_revoked, on_lost or on_revoked

    def on_partitions_revoked(self, revoked):
        """Partitions leave this member in a rebalance it takes part in (client's IO thread)."""
        self._revoked(list(revoked))

    def on_partitions_assigned(self, assigned):
        """Partitions come to this member (client's IO thread)."""
        self._assigned(list(assigned))

    def on_partitions_lost(self, lost):
        """The group took the partitions away without this member (its session expired); client's IO thread."""
        self._lost(list(lost))


def session_expired(consumer: KafkaConsumer) -> bool:
    """Whether this member has had no successful heartbeat for a whole session timeout.

    The coordinator has then evicted it, or is about to: the partitions count as lost
    even before the client notices. kafka-python keeps the heartbeat times on its
    coordinator (``heartbeat.session_timeout_expired``: the last heartbeat response,
    or the last (re)join, older than ``session_timeout_ms``); there is no public API.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    heartbeat = getattr(coordinator, "heartbeat", None)
    return bool(heartbeat is not None and heartbeat.session_timeout_expired())


def group_generation(consumer: KafkaConsumer) -> tuple[int, str]:
    """(generation id, member id) of this member's current group membership."""
    meta = consumer.group_metadata()
    return int(meta.generation_id), str(meta.member_id)


def request_rejoin(consumer: KafkaConsumer) -> None:
    """Ask the coordinator to rejoin the group at the next poll (a member that fenced itself gets a fresh assignment)."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None:
        coordinator.request_rejoin()


def consumer_config(settings) -> dict[str, Any]:
    """Keyword arguments of the service's ``KafkaConsumer``.

    >>> from stream_dec.settings import load_settings
    >>> cfg = consumer_config(load_settings(batch__max_size=1024, batch__max_wait_ms=500))
    >>> cfg["max_poll_records"], cfg["fetch_max_wait_ms"], cfg["enable_auto_commit"]
    (1024, 100, False)
    >>> cfg = consumer_config(load_settings(batch__max_bytes=1_000_000))
    >>> cfg["fetch_max_bytes"], cfg["max_partition_fetch_bytes"]
    (1000000, 1000000)
    >>> cfg["auto_offset_reset"], cfg["isolation_level"]
    ('none', 'read_uncommitted')
    >>> consumer_config(load_settings(kafka__processing_guarantee="exactly_once"))["isolation_level"]
    'read_committed'
    """
    k = settings.kafka
    return dict(
        bootstrap_servers=k.bootstrap_list,
        group_id=k.group_id,
        client_id=k.client_id,
        enable_auto_commit=False,
        auto_offset_reset="none",
        isolation_level="read_committed" if k.processing_guarantee == "exactly_once" else "read_uncommitted",
        bootstrap_timeout_ms=CONNECT_TIMEOUT_S * 1000,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_interval_ms=k.max_poll_interval_ms,
        max_poll_records=settings.batch.max_size,
        # The client's 500 ms default would sit on top of the micro-batch wait.
        fetch_max_wait_ms=max(10, min(100, settings.batch.max_wait_ms // 2)),
        # One poll holds at most a batch's bytes, plus one larger record that the broker
        # returns alone: the batch byte bound holds before the records are in memory.
        fetch_max_bytes=settings.batch.max_bytes,
        max_partition_fetch_bytes=min(max(k.max_record_bytes * 2, MIN_PARTITION_FETCH_BYTES), settings.batch.max_bytes),
        partition_assignment_strategy=[AllToOneAssignor],
    )


def make_consumer(settings) -> KafkaConsumer:
    """The service's consumer (not yet subscribed)."""
    return KafkaConsumer(**consumer_config(settings))


def output_producer_config(settings, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of the producer of assignments, drift records and dead letters.

    ``overrides``: e.g. the exactly-once ``transactional_id``.

    >>> from stream_dec.settings import load_settings
    >>> cfg = output_producer_config(load_settings())
    >>> cfg["acks"], cfg["linger_ms"], cfg["max_request_size"]
    ('all', 5, 4194304)
    >>> cfg["max_block_ms"], cfg["delivery_timeout_ms"]
    (10000, 30000)
    """
    k = settings.kafka
    return producer_config(
        k.bootstrap_list, client_id=k.client_id, acks="all", max_record_bytes=k.max_record_bytes,
        linger_ms=OUTPUT_LINGER_MS, timeout_s=CONNECT_TIMEOUT_S, **overrides,
    )


def make_output_producer(settings, **overrides: Any) -> KafkaProducer:
    """The producer of :func:`output_producer_config`."""
    return KafkaProducer(**output_producer_config(settings, **overrides))


def transactional_id(settings) -> str:
    """The exactly-once producer's transactional id: stable per consumer group and input topic,
    so a restarted instance fences its zombie.

    >>> from stream_dec.settings import load_settings
    >>> transactional_id(load_settings(kafka__group_id="g", kafka__input_topic="in"))
    'stream-dec-g-in'
    """
    return f"stream-dec-{settings.kafka.group_id}-{settings.kafka.input_topic}"


def highwater_lag(consumer: KafkaConsumer) -> dict[int, int]:
    """Records behind the high watermark, per assigned partition whose watermark is known.

    ``highwater()`` (known after a fetch) rather than ``end_offsets()``, which tansu
    answers wrongly (docs/kafka-notes.md).
    """
    lag = {}
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is not None:
            lag[tp.partition] = max(0, hw - consumer.position(tp))
    return lag


def positions(consumer: KafkaConsumer) -> dict[int, tuple[int, int | None]]:
    """``{partition: (position, high watermark or None)}`` of the assigned partitions.

    ``highwater()`` (known after a fetch) rather than ``end_offsets()``, which tansu
    answers wrongly (docs/kafka-notes.md). A position above the high watermark means the
    log no longer holds what the service read: tansu then answers the fetch with no
    records and no error.
    """
    out = {}
    for tp in consumer.assignment():
        position = consumer.position(tp, timeout_ms=0)
        if position is not None:
            out[tp.partition] = (position, consumer.highwater(tp))
    return out


def broker_connected(consumer: KafkaConsumer) -> bool:
    """Whether the consumer holds at least one open broker connection (it reconnects on its own).

    From the client's public ``metrics()`` (``connection-count``), which drops to 0 while
    no broker answers.
    """
    metrics = consumer.metrics().get("consumer-metrics", {})
    return metrics.get("connection-count", 1.0) > 0

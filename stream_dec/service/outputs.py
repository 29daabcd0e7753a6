"""Outputs: how a batch's records leave and its input offsets are committed, one class per delivery mode.

The loop calls the same methods whatever the mode::

    outputs.skip_publishing(records)      # exactly-once replay: learn only?
    outputs.open_batch()
    outputs.send(...)                     # dead letters, assignments, drift records
    outputs.close_batch(end, settle)      # exactly-once: the transaction commits here
    outputs.await_acks()                  # every output acknowledged (raises if one was not)
    outputs.batch_done(offsets)           # at-least-once: commit the offsets (asynchronously)

Invariants:

* :class:`AtLeastOnceOutputs`: a batch's offsets are committed only after every one of
  its outputs is acknowledged; a lost asynchronous commit is superseded by the next
  (resuming relies on the checkpoint's offsets, not the group's).
* :class:`ExactlyOnceOutputs`: a batch's outputs, its previous update's drift record and
  its offsets become visible in one transaction, or not at all. After an assignment,
  batches the group committed beyond the checkpoint are relearnt, never republished,
  until the first batch that was not committed.
* :attr:`committed` is what the group has (or will have) for the offsets given last.
* An outage (stream_dec/service/outage.py) is ridden out, never committed through:
  at-least-once retries the outputs not acknowledged with a new producer (the old one
  may be dead for good after a broker restart, docs/kafka-notes.md) until they are, or
  until ``STREAM_DEC_KAFKA__MAX_OUTAGE_S`` ends the run (exit status 3); exactly-once
  ends the run at the first failed transaction, which commits nothing, and the restart
  waits for the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from stream_dec.service.clients import (
    CONNECT_TIMEOUT_S,
    make_output_producer,
    transactional_id,
)
from stream_dec.service.outage import Outage, OutageError, is_outage

log = logging.getLogger("stream_dec.service")

#: Seconds to wait for the broker to acknowledge one output.
ACK_TIMEOUT_S = 30


def _log_commit_failure(offsets, response) -> None:
    if isinstance(response, Exception):
        log.warning("offset commit failed (the next one supersedes it): %s", response)


class AtLeastOnceOutputs:
    """Send, flush and wait for the acknowledgements, then commit the offsets asynchronously."""

    #: Journal lines need no fsync: a lost line only makes a replay cut by size.
    durable_journal = False

    def __init__(self, settings, producer, consumer: KafkaConsumer, outage: Outage | None = None):
        self.settings = settings
        self.producer = producer
        self.consumer = consumer
        #: Where outages are reported; None: a failed output raises at once.
        self.outage = outage
        self.committed: dict[int, int] = {}
        self._unacked: list = []  # futures of outputs sent and not yet acknowledged (None: not sent)
        self._sent: list = []  # (topic, key, value, headers, partition) of each, to send them again
        self._broken: BaseException | None = None  # the outage error a send raised; later sends wait
        self._failed = False  # the last delivery try failed: the next one starts with a new producer

    @classmethod
    def producer_overrides(cls, settings) -> dict:
        """Producer settings this mode needs."""
        return {}

    def start(self) -> None:
        """Once, after the clients are built."""

    def on_assigned(self) -> None:
        """Partitions were assigned (called on the client's IO thread: nothing blocking)."""

    def after_poll(self, offsets: dict[int, int]) -> None:
        """Called on the loop's thread after each poll, with the model's next offsets."""

    def skip_publishing(self, records: list) -> bool:
        """Whether this batch's outputs were published before a crash (then it is only relearnt)."""
        return False

    def forget_published(self) -> None:
        """The journal no longer describes the input: publish whatever comes."""

    def send(self, topic: str, *, key: bytes | None, value: bytes, headers=None, partition: int | None = None) -> None:
        """Send one output record; :meth:`await_acks` waits for it."""
        self._send_all([(topic, key, value, headers, partition)])

    def send_many(self, topic: str, keys: list, values: list, partitions: list) -> None:
        """Send one record per (key, value, partition): the assignments of a batch."""
        self._send_all([(topic, k, v, None, p) for k, v, p in zip(keys, values, partitions)])

    def partitions_for(self, topic: str) -> set[int]:
        """The partitions of an output topic, waiting out an outage (its metadata may be unreachable)."""
        if self.outage is None:
            return self.producer.partitions_for(topic)
        return self.outage.retry(f"output topic {topic!r}", lambda: self._partitions_for(topic))

    def _partitions_for(self, topic: str) -> set[int]:
        if self._failed:  # a producer that lost the broker may never recover (docs/kafka-notes.md)
            self._reconnect()
        self._failed = True
        parts = self.producer.partitions_for(topic)
        self._failed = False
        return parts

    def _send_all(self, args: list) -> None:
        """Send each ``(topic, key, value, headers, partition)``; in an outage, keep them for the retry."""
        self._sent.extend(args)
        if self._broken is None:
            send = self.producer.send
            try:
                for topic, key, value, headers, partition in args:
                    self._unacked.append(send(topic, key=key, value=value, headers=headers, partition=partition))
            except Exception as exc:
                # Metadata out of reach (max_block_ms): every further send would block as long.
                if self.outage is None or not is_outage(exc):
                    raise
                self._broken = exc
        self._unacked.extend([None] * (len(self._sent) - len(self._unacked)))

    def open_batch(self) -> None:
        """A batch's outputs start."""

    def close_batch(self, end: dict[int, int], settle: Callable[[], None]) -> None:
        """A batch's outputs are all sent; ``settle`` publishes its update's drift record.

        Under at-least-once the update keeps running: its drift record goes with the next batch.
        """

    def await_acks(self) -> None:
        """Block until every output sent so far is acknowledged.

        In an outage the outputs not acknowledged are sent again by a new producer after
        a backoff, until they are acknowledged or the outage is too old (OutageError).
        Without an outage tracker, or for an error no retry cures, it raises at once.
        """
        if not self._unacked:
            return
        if self.outage is None:
            self.producer.flush()
            self._get_all()
            return
        self.outage.retry(f"output topic {self.settings.kafka.output_topic!r}", self._deliver)

    def _deliver(self) -> None:
        """One try at getting every output acknowledged."""
        if self._failed:
            self._reconnect()
        self._failed = True
        if self._broken is not None:
            exc, self._broken = self._broken, None
            raise exc
        self.producer.flush(timeout=ACK_TIMEOUT_S)
        self._get_all()
        self._failed = False

    def _reconnect(self) -> None:
        """Replace the producer and send again every output it did not get acknowledged."""
        self.producer.close(timeout=0)  # its unacknowledged records fail now; they are sent again below
        self.producer = make_output_producer(self.settings, **self.producer_overrides(self.settings))
        again = [a for a, f in zip(self._sent, self._unacked) if f is None or not f.succeeded()]
        log.info("outage: new output producer; sending %d unacknowledged outputs again", len(again))
        self._sent, self._unacked = [], []
        self._send_all(again)

    def batch_done(self, offsets: dict[int, int]) -> None:
        """A batch is fully processed and acknowledged; ``offsets``: the model's next offsets."""
        self.commit(offsets)

    def commit(self, offsets: dict[int, int], *, wait: bool = False) -> None:
        """Commit the offsets of the assigned partitions: asynchronously, or synchronously with ``wait``.

        Never ``wait`` on the client's IO thread (a rebalance callback): it would deadlock.
        Waiting for every commit would block the loop for a broker round trip per batch.
        """
        if not offsets:
            return
        topic = self.settings.kafka.input_topic
        assigned = {tp.partition for tp in self.consumer.assignment()}
        to_commit = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items() if p in assigned}
        if not to_commit:
            return
        if wait:
            self.consumer.commit(to_commit)
        else:
            self.consumer.commit_async(to_commit, callback=_log_commit_failure)
        self.committed = dict(offsets)

    def _get_all(self) -> None:
        for f in self._unacked:
            f.get(timeout=ACK_TIMEOUT_S)  # raises if the broker did not take an output: nothing is committed then
        self._unacked.clear()
        self._sent.clear()


class ExactlyOnceOutputs(AtLeastOnceOutputs):
    """One Kafka transaction per batch: outputs, drift record and input offsets together."""

    #: Journal lines are fsynced: a restart relearns committed batches at exactly these boundaries.
    durable_journal = True

    def __init__(self, settings, producer, consumer: KafkaConsumer, outage: Outage | None = None):
        super().__init__(settings, producer, consumer, outage)
        self._read_commits = False  # look up the group's commits at the next poll
        self._published: dict[int, int] = {}  # offsets below which outputs are committed already

    @classmethod
    def producer_overrides(cls, settings) -> dict:
        """A transactional id stable per group and input topic: a restarted instance fences its zombie."""
        return {"transactional_id": transactional_id(settings)}

    def start(self) -> None:
        """Register the transactional id (fences an older producer with the same id)."""
        self.producer.init_transactions()

    def on_assigned(self) -> None:
        """Batches after the checkpoint may have been published and committed already.

        Their commits are read at the next poll, on the loop's thread: this callback may
        run on the client's IO thread, where a blocking call would deadlock.
        """
        self._read_commits = True

    def after_poll(self, offsets: dict[int, int]) -> None:
        """After an assignment: the group's commits beyond the checkpoint mark published batches."""
        if not self._read_commits:
            return
        self._read_commits = False
        self._published = {}
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is not None and committed > offsets.get(tp.partition, 0):
                self._published[tp.partition] = committed
        if self._published:
            log.info("exactly-once: outputs up to offsets %s are committed already; replaying them without publishing", self._published)

    def skip_publishing(self, records: list) -> bool:
        """True for a batch wholly below the group's commits; the first other batch ends the replay."""
        if self._published and all(r.offset < self._published.get(r.partition, 0) for r in records):
            return True
        self._published = {}
        return False

    def forget_published(self) -> None:
        """Batches cut by size differ from the published ones: publish them."""
        self._published = {}

    def open_batch(self) -> None:
        """Begin the batch's transaction."""
        self.producer.begin_transaction()

    def close_batch(self, end: dict[int, int], settle: Callable[[], None]) -> None:
        """Publish the update's drift record, add the batch's offsets, commit the transaction.

        A failure (e.g. this producer was fenced by a newer instance) ends the run, and
        the restart resumes from the checkpoint. An outage ends it as :class:`OutageError`
        (exit status 3): the transaction commits nothing, and the restart waits for the broker.
        """
        settle()
        topic = self.settings.kafka.input_topic
        offsets = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in end.items()}
        try:
            if self._broken is not None:
                raise self._broken
            # kafka-python waits for a transaction's end without a deadline: the outputs are
            # flushed first, with one, so a broker that is away is noticed here.
            self.producer.flush(timeout=3 * CONNECT_TIMEOUT_S)
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
        except Exception as exc:
            if not is_outage(exc):
                raise
            if self.outage is not None:
                self.outage.failed(f"output topic {self.settings.kafka.output_topic!r}", exc)
            raise OutageError(f"exactly-once: the transaction of the batch ending at {end} did not commit "
                              f"({type(exc).__name__}: {exc}); nothing of it is visible, and the restart resumes "
                              f"from the checkpoint once {self.settings.kafka.bootstrap_servers} answers") from exc

    def await_acks(self) -> None:
        """The committed transaction flushed everything: only collect the acknowledgements."""
        self._get_all()

    def batch_done(self, offsets: dict[int, int]) -> None:
        """The offsets went with the transaction: just remember them."""
        self.committed = dict(offsets)

    def commit(self, offsets: dict[int, int], *, wait: bool = False) -> None:
        """Nothing to do: offsets are committed inside each batch's transaction."""


#: The outputs class of each ``kafka.processing_guarantee``.
OUTPUTS: dict[str, type[AtLeastOnceOutputs]] = {"at_least_once": AtLeastOnceOutputs, "exactly_once": ExactlyOnceOutputs}


def open_outputs(settings, outputs_class: type[AtLeastOnceOutputs], consumer: KafkaConsumer, outage: Outage) -> AtLeastOnceOutputs:
    """The outputs of ``outputs_class`` on a new producer, started, with the output topic reachable.

    An unreachable broker is waited for (with backoff, up to ``max_outage_s``), with
    ``/healthz`` answering 503 meanwhile, rather than failing on the first try.
    """
    k = settings.kafka
    producer = outage.retry(f"broker (output topic {k.output_topic!r})", lambda: make_output_producer(
        settings, **outputs_class.producer_overrides(settings)))
    outputs = outputs_class(settings, producer, consumer, outage=outage)
    outage.retry(f"output topic {k.output_topic!r}", outputs.start)
    outputs.partitions_for(k.output_topic)  # reachable before any input is read
    return outputs


def close_outputs(outputs: AtLeastOnceOutputs | None, outage: Outage) -> None:
    """Close the outputs' producer (idempotent); in an outage what is left cannot be delivered, and nothing of it was committed."""
    if outputs is not None and outputs.producer is not None:
        outputs.producer.close(timeout=0 if outage.active else None)
        outputs.producer = None

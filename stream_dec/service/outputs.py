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
"""

from __future__ import annotations

import logging
from typing import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from stream_dec.service.clients import transactional_id

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

    def __init__(self, settings, producer, consumer: KafkaConsumer):
        self.settings = settings
        self.producer = producer
        self.consumer = consumer
        self.committed: dict[int, int] = {}
        self._unacked: list = []  # futures of outputs sent and not yet acknowledged

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
        self._unacked.append(self.producer.send(topic, key=key, value=value, headers=headers, partition=partition))

    def send_many(self, topic: str, keys: list, values: list, partitions: list) -> None:
        """Send one record per (key, value, partition): the assignments of a batch."""
        send = self.producer.send
        self._unacked.extend(send(topic, key=k, value=v, partition=p) for k, v, p in zip(keys, values, partitions))

    def open_batch(self) -> None:
        """A batch's outputs start."""

    def close_batch(self, end: dict[int, int], settle: Callable[[], None]) -> None:
        """A batch's outputs are all sent; ``settle`` publishes its update's drift record.

        Under at-least-once the update keeps running: its drift record goes with the next batch.
        """

    def await_acks(self) -> None:
        """Block until every output sent so far is acknowledged (raises if one was not)."""
        if not self._unacked:
            return
        self.producer.flush()
        self._get_all()

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


class ExactlyOnceOutputs(AtLeastOnceOutputs):
    """One Kafka transaction per batch: outputs, drift record and input offsets together."""

    #: Journal lines are fsynced: a restart relearns committed batches at exactly these boundaries.
    durable_journal = True

    def __init__(self, settings, producer, consumer: KafkaConsumer):
        super().__init__(settings, producer, consumer)
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
        the restart resumes from the checkpoint.
        """
        settle()
        topic = self.settings.kafka.input_topic
        offsets = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in end.items()}
        self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
        self.producer.commit_transaction()

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

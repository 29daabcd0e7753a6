"""The outputs of each delivery mode on a real (embedded) broker: what leaves, and what the group commits."""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from kafka_helpers import committed, consume, consumer_record, service_settings

from stream_dec.service.clients import make_consumer, make_output_producer
from stream_dec.service.outputs import OUTPUTS, AtLeastOnceOutputs, ExactlyOnceOutputs


@pytest.fixture
def clients(broker, tmp_path, request):
    """(settings, producer, consumer) of one delivery mode; the consumer is assigned in-<tag> partition 0."""
    guarantee, tag = request.param
    broker.create_topics([f"in-{tag}", f"out-{tag}", f"dlq-{tag}"])
    settings = service_settings(broker, tmp_path, tag, kafka__processing_guarantee=guarantee)
    producer = make_output_producer(settings, **OUTPUTS[guarantee].producer_overrides(settings))
    consumer = make_consumer(settings)
    consumer.assign([TopicPartition(f"in-{tag}", 0)])
    yield settings, producer, consumer
    producer.close()
    consumer.close(autocommit=False)


@pytest.mark.parametrize("clients", [("at_least_once", "alo")], indirect=True)
def test_at_least_once_sends_then_commits_the_assigned_partitions(broker, clients):
    settings, producer, consumer = clients
    outputs = AtLeastOnceOutputs(settings, producer, consumer)
    outputs.start()
    outputs.open_batch()
    outputs.send("out-alo", key=b"dead", value=b"letter", headers=[("reason", b"x")])
    outputs.send_many("out-alo", [b"a", b"b"], [b"1", b"2"], [0, 0])
    settled = []
    outputs.close_batch({0: 3}, lambda: settled.append(1))
    assert settled == []  # the update keeps running: its drift record goes with the next batch
    outputs.await_acks()
    assert [(r.key, r.value) for r in consume(broker.bootstrap_servers, "out-alo", 3)] == [(b"dead", b"letter"), (b"a", b"1"), (b"b", b"2")]
    outputs.commit({0: 3, 7: 1}, wait=True)  # partition 7 is not assigned here: not committed
    assert committed(broker, "g-alo", "in-alo") == 3
    assert committed(broker, "g-alo", "in-alo", partition=7) is None
    assert outputs.committed == {0: 3, 7: 1}


@pytest.mark.parametrize("clients", [("exactly_once", "eo")], indirect=True)
def test_exactly_once_commits_outputs_drift_and_offsets_in_one_transaction(broker, clients):
    settings, producer, consumer = clients
    outputs = ExactlyOnceOutputs(settings, producer, consumer)
    assert OUTPUTS["exactly_once"] is ExactlyOnceOutputs and outputs.durable_journal
    outputs.start()
    outputs.open_batch()
    outputs.send_many("out-eo", [b"a", b"b"], [b"1", b"2"], [0, 0])
    outputs.close_batch({0: 2}, lambda: outputs.send("out-eo", key=b"__drift__", value=b"d"))
    outputs.await_acks()
    assert committed(broker, "g-eo", "in-eo") == 2  # with the transaction, not by a commit call
    outputs.batch_done({0: 2})
    outputs.commit({0: 99}, wait=True)  # nothing outside a transaction
    assert committed(broker, "g-eo", "in-eo") == 2 and outputs.committed == {0: 2}
    assert [r.key for r in consume(broker.bootstrap_servers, "out-eo", 3)][:3] == [b"a", b"b", b"__drift__"]

    # A restart from a checkpoint at offset 1: the batches below the group's commit (2)
    # are relearnt without publishing, until the first batch that reaches past it.
    outputs.on_assigned()
    outputs.after_poll({0: 1})
    assert outputs.skip_publishing([consumer_record(0, 1, topic="in-eo")])
    assert not outputs.skip_publishing([consumer_record(0, 2, topic="in-eo"), consumer_record(0, 3, topic="in-eo")])
    assert not outputs.skip_publishing([consumer_record(0, 1, topic="in-eo")])  # the replay is over
    outputs.on_assigned()
    outputs.after_poll({0: 1})
    outputs.forget_published()  # the journal did not match: publish whatever comes
    assert not outputs.skip_publishing([consumer_record(0, 1, topic="in-eo")])

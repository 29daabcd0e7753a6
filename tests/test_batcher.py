"""The batcher without a broker: batches cut by size, by wait, and at journaled ends when replaying."""

from __future__ import annotations

from kafka_helpers import consumer_record as rec

from stream_dec.service.batcher import REPLAY_LOOKAHEAD, Batcher, end_offsets
from stream_dec.service.journal import JournalLine


def recs(partition: int, start: int, stop: int) -> list:
    """Records ``start..stop-1`` of one partition."""
    return [rec(partition, o) for o in range(start, stop)]


class Clock:
    """A settable monotonic clock, in seconds."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def keys(batch) -> list[tuple[int, int]]:
    """(partition, offset) of each record of a batch, in order."""
    return [(r.partition, r.offset) for r in batch.records]


def test_batches_are_cut_by_size_in_arrival_order():
    b = Batcher(4, 60_000, clock=Clock())
    b.add(recs(0, 0, 6))
    b.add(recs(1, 0, 4))
    first, second = b.cut({}), b.cut({})
    assert keys(first) == [(0, 0), (0, 1), (0, 2), (0, 3)] and first.end == {0: 4}
    assert keys(second) == [(0, 4), (0, 5), (1, 0), (1, 1)] and second.end == {0: 6, 1: 2}
    assert first.journaled is None and second.journaled is None  # new batches: to be journaled
    assert b.cut({}) is None  # two records, neither full nor waited
    last = b.cut({}, now=True)  # shutdown: what is pending goes now
    assert keys(last) == [(1, 2), (1, 3)] and b.pending == []
    assert b.cut({}, now=True) is None


def test_records_of_several_partitions_are_learnt_in_partition_offset_order():
    # However the polls interleaved the partitions, a batch of the same records is the same batch.
    a, b = Batcher(6, 60_000, clock=Clock()), Batcher(6, 60_000, clock=Clock())
    a.add(recs(1, 0, 3))
    a.add(recs(0, 0, 3))
    b.add(recs(0, 0, 1))
    b.add(recs(1, 0, 3))
    b.add(recs(0, 1, 3))
    assert keys(a.cut({})) == keys(b.cut({})) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_a_batch_closes_after_the_wait_from_its_first_record():
    clock = Clock()
    b = Batcher(100, 500, clock=clock)
    assert b.poll_budget() == (500, 100)
    b.add(recs(0, 0, 3))
    clock.t += 0.25
    b.add(recs(0, 3, 5))  # does not restart the wait
    assert b.poll_budget() == (250, 95)
    assert b.cut({}) is None
    clock.t += 0.25
    assert b.poll_budget() == (0, 95)
    assert keys(b.cut({})) == [(0, o) for o in range(5)]
    clock.t += 10
    b.add(recs(0, 5, 6))  # the next batch's wait starts at its own first record
    assert b.cut({}) is None and b.poll_budget() == (500, 99)


def test_replay_cuts_exactly_at_the_journaled_ends_across_partitions():
    clock = Clock()
    b = Batcher(1000, 0, clock=clock)  # by size or wait alone, everything would go at once
    b.replay_from([
        JournalLine(0, 0, {0: 3, 1: 2}),
        JournalLine(0, 1, {0: 5}),
        JournalLine(0, 2, {1: 6, 0: 6}),
    ])
    b.add(recs(0, 0, 4))
    assert b.cut({}) is None  # partition 1 has not been read up to its end yet
    b.add(recs(1, 0, 6))
    b.add(recs(0, 4, 8))
    first, second, third = b.cut({}), b.cut({}), b.cut({})
    assert keys(first) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert keys(second) == [(0, 3), (0, 4)]
    assert keys(third) == [(0, 5), (1, 2), (1, 3), (1, 4), (1, 5)]  # (partition, offset) order
    assert [x.journaled.labelled_by for x in (first, second, third)] == [0, 1, 2]
    assert third.end == {1: 6, 0: 6} and not b.replay
    rest = b.cut({})  # journal used up: by size or wait again
    assert keys(rest) == [(0, 6), (0, 7)] and rest.journaled is None


def test_lines_the_model_is_past_cut_nothing():
    b = Batcher(1000, 60_000, clock=Clock())
    b.replay_from([JournalLine(0, 0, {0: 10}), JournalLine(0, 1, {0: 20}), JournalLine(0, 2, {0: 25})])
    b.add(recs(0, 20, 30))
    batch = b.cut({0: 20})  # resumed at 20: the first two batches are in the model already
    assert keys(batch) == [(0, o) for o in range(20, 25)] and batch.journaled.labelled_by == 2


def test_a_journal_that_does_not_match_the_input_falls_back_to_size():
    abandoned = []
    b = Batcher(4, 60_000, on_replay_abandoned=lambda: abandoned.append(1), clock=Clock())
    b.replay_from([JournalLine(0, 0, {0: 2, 3: 1})])  # partition 3 never comes
    b.add(recs(0, 0, REPLAY_LOOKAHEAD * 4 - 1))
    assert b.cut({}) is None and not abandoned  # it may still come
    b.add([rec(0, REPLAY_LOOKAHEAD * 4 - 1)])
    batch = b.cut({})
    assert abandoned == [1] and not b.replay
    assert keys(batch) == [(0, o) for o in range(4)] and batch.journaled is None


def test_records_that_must_go_abandon_a_replay_not_read_back():
    abandoned = []
    b = Batcher(4, 60_000, on_replay_abandoned=lambda: abandoned.append(1), clock=Clock())
    b.replay_from([JournalLine(0, 0, {0: 6})])
    b.add(recs(0, 0, 5))
    assert b.cut({}) is None
    batch = b.cut({}, now=True)
    assert abandoned == [1] and keys(batch) == [(0, o) for o in range(4)]
    assert keys(b.cut({}, now=True)) == [(0, 4)]


def test_end_offsets():
    assert end_offsets([rec(0, 4), rec(2, 9), rec(0, 7)]) == {0: 8, 2: 10}
    assert end_offsets([]) == {}


def test_clear_forgets_pending_records_and_the_replay():
    b = Batcher(4, 60_000, clock=Clock())
    b.add(recs(0, 0, 3))
    b.replay_from([JournalLine(base=1, labelled_by=1, end={0: 2})])
    b.clear()
    assert b.pending == [] and b.pending_bytes == 0 and not b.replay
    assert b.cut({}, now=True) is None  # nothing left to cut
    b.add(recs(0, 5, 7))  # the partition was repositioned: cut by size again, not at the old replay end
    assert keys(b.cut({}, now=True)) == [(0, 5), (0, 6)]

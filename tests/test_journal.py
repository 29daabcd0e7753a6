"""The batch journal on real files, without a broker: append, read back, torn lines, prune."""

from __future__ import annotations

import json
import threading

from stream_dec.service.journal import JOURNAL, Journal, JournalLine


def _journal(tmp_path, base=0, durable=False):
    return Journal(tmp_path / JOURNAL, base=base, durable=durable)


def test_lines_are_written_in_order_with_the_current_base(tmp_path):
    j = _journal(tmp_path, base=5)
    j.append({0: 64}, labelled_by=5)
    j.append({0: 128, 1: 3}, labelled_by=6)
    raw = [json.loads(line) for line in (tmp_path / JOURNAL).read_text().splitlines()]
    assert raw == [
        {"base": 5, "labelled_by": 5, "end": {"0": 64}},
        {"base": 5, "labelled_by": 6, "end": {"0": 128, "1": 3}},
    ]
    assert [line.end for line in j.following(5)] == [{0: 64}, {0: 128, 1: 3}]
    assert j.following(4) == []  # written after another checkpoint: describes nothing that follows 4


def test_further_fields_round_trip(tmp_path):
    j = _journal(tmp_path, durable=True)
    j.append({2: 10}, labelled_by=1, epoch=7, plan={"steps": 3, "spawn": False})
    (line,) = j.lines()
    assert line.fields == {"epoch": 7, "plan": {"steps": 3, "spawn": False}}
    assert JournalLine.from_json(line.to_json()) == line


def test_a_torn_last_line_is_skipped_and_sealed(tmp_path):
    j = _journal(tmp_path)
    j.append({0: 10}, labelled_by=0)
    j.append({0: 20}, labelled_by=1)
    path = tmp_path / JOURNAL
    path.write_bytes(path.read_bytes()[:-9])  # a crash in the middle of the second line
    assert [line.end for line in j.following(0)] == [{0: 10}]
    assert j.seal() is True and j.seal() is False
    j.append({0: 30}, labelled_by=2)  # starts on a line of its own: readable
    assert [line.end for line in j.following(0)] == [{0: 10}, {0: 30}]


def test_prune_keeps_only_the_lines_after_the_checkpoint_rebased(tmp_path):
    j = _journal(tmp_path, base=3)
    (tmp_path / JOURNAL).write_text(json.dumps({"base": 1, "labelled_by": 1, "end": {"0": 999}}) + "\n")  # an older lineage
    for end in (10, 20, 30, 40):
        j.append({0: end, 1: end // 10}, labelled_by=3 + end // 10)
    with open(tmp_path / JOURNAL, "a") as fh:
        fh.write('{"base": 3, "lab')  # torn
    inode = (tmp_path / JOURNAL).stat().st_ino
    # Checkpoint 5 holds the batches up to offset 20 of partition 0 and 2 of partition 1.
    kept = j.prune(5, {0: 20, 1: 2})
    assert kept == 2 and j.base == 5
    assert [(line.base, line.end) for line in j.lines()] == [(5, {0: 30, 1: 3}), (5, {0: 40, 1: 4})]
    assert (tmp_path / JOURNAL).stat().st_ino != inode  # replaced by a rename, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL]  # no temp file left behind
    j.append({0: 50, 1: 5}, labelled_by=8)
    assert [line.base for line in j.lines()] == [5, 5, 5]
    assert j.following(3) == []


def test_prune_keeps_a_batch_on_a_partition_the_checkpoint_does_not_know(tmp_path):
    j = _journal(tmp_path)
    j.append({0: 10}, labelled_by=0)
    j.append({4: 1}, labelled_by=1)
    assert j.prune(1, {0: 10}) == 1
    assert [line.end for line in j.following(1)] == [{4: 1}]


def test_prune_without_a_journal_file_writes_an_empty_one(tmp_path):
    j = _journal(tmp_path, base=2)
    assert j.prune(3, {0: 1}) == 0
    assert (tmp_path / JOURNAL).read_text() == "" and j.base == 3


def test_appends_during_a_prune_are_never_lost(tmp_path):
    j = _journal(tmp_path)
    stop = threading.Event()
    written: list[int] = []

    def writer():
        end = 0
        while not stop.is_set():
            end += 1
            j.append({0: end}, labelled_by=end)
            written.append(end)

    t = threading.Thread(target=writer)
    t.start()
    for version in range(1, 30):
        j.prune(version, {0: 0})  # covers nothing: every line must survive every prune
    stop.set()
    t.join()
    assert [line.end[0] for line in j.lines()] == written
    assert {line.base for line in j.lines()} == {29}

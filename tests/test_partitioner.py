"""The vectorised murmur2 partitioner picks the partition kafka-python's DefaultPartitioner picks."""

from __future__ import annotations

import random

import numpy as np
import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2

from stream_dec.io.partitioner import default_partitions, murmur2


def test_murmur2_matches_the_kafka_client_on_every_key_length():
    rng = random.Random(0)
    keys = [bytes(rng.randrange(256) for _ in range(n % 41)) for n in range(2000)]
    keys += [b"item-%07d" % i for i in range(500)] + ["é-ü-ß".encode()]
    assert murmur2(keys).tolist() == [kafka_murmur2(k) for k in keys]


@pytest.mark.parametrize("partitions", [[0], [0, 1, 2], list(range(7)), [3, 1, 2, 0]])
def test_partition_choice_matches_the_default_partitioner(partitions):
    keys = [b"id-%d" % i for i in range(300)]
    ordered = sorted(partitions)
    want = [ordered[(kafka_murmur2(k) & 0x7FFFFFFF) % len(ordered)] for k in keys]
    got = default_partitions(keys, partitions)
    assert got.tolist() == want
    if len(partitions) > 1:
        assert len(set(got.tolist())) > 1  # the keys do spread


def test_no_partitions_is_an_error():
    with pytest.raises(ValueError, match="no partitions"):
        default_partitions([b"a"], [])
    assert murmur2([]).shape == (0,) and isinstance(murmur2([b"x"])[0], np.uint32)

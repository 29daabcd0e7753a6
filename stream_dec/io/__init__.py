"""Kafka-facing input/output of the service: record codecs and an embedded broker.

Nothing here imports torch, so producers and tooling start fast.
"""

from stream_dec.io.codecs import (
    CONTENT_TYPE_FLOAT32,
    CONTENT_TYPE_JSON,
    REASONS,
    DeadLetter,
    DecodeError,
    dead_letter,
    dead_letter_max_bytes,
    decode_batch,
    decode_record,
    dlq_headers,
    encode_assignment,
    encode_assignments,
    encode_drift,
    encode_float32,
    encode_json,
    encode_lifecycle,
)

__all__ = [
    "CONTENT_TYPE_FLOAT32",
    "CONTENT_TYPE_JSON",
    "REASONS",
    "DeadLetter",
    "DecodeError",
    "dead_letter",
    "dead_letter_max_bytes",
    "decode_batch",
    "decode_record",
    "dlq_headers",
    "encode_assignment",
    "encode_assignments",
    "encode_drift",
    "encode_float32",
    "encode_json",
    "encode_lifecycle",
]

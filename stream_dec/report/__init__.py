"""Pictures of the stream: ``stream-dec report`` turns an output topic (or a file of its records) into one HTML page.

Reading (:mod:`~stream_dec.report.reader` for Kafka, :mod:`~stream_dec.report.records`
for parsing and files) is kept apart from computing (:mod:`~stream_dec.report.analysis`)
and drawing (:mod:`~stream_dec.report.figures`, :mod:`~stream_dec.report.page`).
matplotlib, the optional extra ``stream_dec[report]``, is imported only to draw.
"""

from __future__ import annotations

from stream_dec.report.page import FIGURES, render_html, write_report
from stream_dec.report.records import KINDS, ReportError, Stream, parse_records, read_records_file

__all__ = ["FIGURES", "KINDS", "ReportError", "Stream", "parse_records", "read_records_file", "render_html",
           "stream_from_kafka", "write_report"]


def stream_from_kafka(records, source: str, dlq=None, allow_empty: bool = False) -> Stream:
    """A :class:`Stream` from Kafka records of the output topic (and of the dead-letter topic, when given).

    ``records`` and ``dlq`` are anything with ``partition``, ``offset``, ``value``,
    ``headers`` and ``timestamp`` (kafka-python's ``ConsumerRecord`` or
    :class:`~stream_dec.report.reader.RawRecord`).
    """
    from stream_dec.io.codecs import REASON_HEADER
    from stream_dec.report.reader import dlq_reasons

    records = list(records)
    stream = parse_records(((f"{source} partition {r.partition} offset {r.offset}", r.value) for r in records),
                           source, allow_empty=allow_empty)
    stamps = [r.timestamp for r in records if r.timestamp is not None and r.timestamp >= 0]
    stream.time_ms = (min(stamps), max(stamps)) if stamps else None
    if dlq is not None:
        stream.dlq = dlq_reasons(list(dlq), REASON_HEADER)
    return stream

"""Online learning: the StreamDEC estimator, its novelty buffer, reservoir and drift report."""

from stream_dec.online.estimator import StreamDEC
from stream_dec.online.report import DriftReport

__all__ = ["DriftReport", "StreamDEC"]

"""Online learning: the StreamDEC estimator and its parts (cluster table, centre rules, EWC,
gates, spawning, churn guard, novelty window, reservoir, persistence) and its drift report."""

from stream_dec.online.estimator import StreamDEC
from stream_dec.online.report import DriftReport, UpdatePlan

__all__ = ["DriftReport", "StreamDEC", "UpdatePlan"]

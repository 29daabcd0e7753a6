"""The Kafka service layer: the poll/label/learn/publish loop and its metrics endpoint."""

from stream_dec.service.app import AllToOneAssignor, NoCheckpointError, StreamService
from stream_dec.service.metrics import MetricsServer, ServiceMetrics

__all__ = ["AllToOneAssignor", "MetricsServer", "NoCheckpointError", "ServiceMetrics", "StreamService"]

"""The Kafka service layer: the poll/label/learn/publish loop, its rooms and its metrics endpoint.

:class:`StreamService` (app.py) is the loop; it hands each batch to the batcher, the
journal, the learner, the outputs of its delivery mode and the checkpointer (one module
each), and tells :class:`ServiceHooks` what happened. Beside the loop: ownership.py
(rebalances, owner epochs, fencing), positions.py (input positions against the log),
outage.py (an unreachable broker), directory.py (refused writes to the checkpoint
directory), deadletters.py, metrics.py and progress.py.
"""

from stream_dec.service.app import StreamService
from stream_dec.service.checkpointer import NoCheckpointError
from stream_dec.service.clients import AllToOneAssignor
from stream_dec.service.hooks import BatchInfo, ServiceHooks
from stream_dec.service.metrics import MetricsServer, ServiceMetrics

__all__ = ["AllToOneAssignor", "BatchInfo", "MetricsServer", "NoCheckpointError", "ServiceHooks", "ServiceMetrics", "StreamService"]

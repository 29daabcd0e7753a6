"""stream_dec: Deep Embedded Clustering that keeps learning from a stream with stable ids."""

from stream_dec.checkpoint import CheckpointError
from stream_dec.online import DriftReport, StreamDEC

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DriftReport", "StreamDEC", "__version__"]

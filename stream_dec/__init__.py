"""stream_dec: Deep Embedded Clustering that keeps learning from a stream with stable ids.

The public names are imported lazily so that ``stream-dec --help`` and the settings
layer start without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DriftReport", "StreamDEC", "UpdatePlan", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from stream_dec.checkpoint import CheckpointError
    from stream_dec.online import DriftReport, StreamDEC, UpdatePlan


def __getattr__(name: str):
    if name == "CheckpointError":
        from stream_dec.checkpoint import CheckpointError

        return CheckpointError
    if name in ("DriftReport", "StreamDEC", "UpdatePlan"):
        from stream_dec import online

        return getattr(online, name)
    raise AttributeError(f"module 'stream_dec' has no attribute {name!r}")

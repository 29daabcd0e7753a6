"""The drift report that every online update returns (and the service publishes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DriftReport:
    """What one ``partial_fit`` did to the model."""

    model_version: int
    n_items: int
    steps: int
    update_ms: float
    churn: float  # share of the model's reservoir relabelled by this update
    centre_shift: float  # mean distance moved by the centres, in units of the mean cluster radius
    novelty_rate: float  # share of the batch no existing cluster explains
    new_cluster_ids: list[int] = field(default_factory=list)
    n_clusters: int = 0
    buffer_size: int = 0
    budget_exhausted: bool = False
    guard_action: str = "none"  # "none", "shrunk", "rolled_back", "dropped_new"

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

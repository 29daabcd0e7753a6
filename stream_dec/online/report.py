"""What every online update returns (and the service publishes): its drift report and its plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class UpdatePlan:
    """How much of one ``partial_fit`` ran: the part of an update that depends on the clock.

    An update under a wall-clock budget (``max_update_ms``) is cut where the time runs
    out, so the same batch on the same model can give a different update on a slower
    run. The plan records the cuts; ``partial_fit(X, plan=...)`` redoes exactly the
    recorded update, ignoring the clock and the current ``online_steps`` and
    ``max_update_ms``, so a replayed batch (after a crash) gives an exact copy.

    >>> p = UpdatePlan(steps=2, steps_cut=True)
    >>> p.cut, UpdatePlan.from_dict(p.to_dict()) == p
    (True, True)
    """

    learn: bool = True  # False: online_steps was 0, the update only labelled the batch
    steps: int = 0  # centre-rule steps taken
    steps_cut: bool = False  # the clock stopped the centre steps before their step budget
    spawn_skipped: bool = False  # a due spawn search did not start: no time left (a later batch tries)
    proposals: int | None = None  # proposals the spawn search checked before the clock stopped it (None: all)
    guard_cut: bool = False  # the churn guard ran out of time and rolled the update back

    @property
    def cut(self) -> bool:
        """Whether the clock cut any part of the update."""
        return self.steps_cut or self.spawn_skipped or self.proposals is not None or self.guard_cut

    def to_dict(self) -> dict:
        """Plain, JSON-ready data (what the service journals)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: "Mapping[str, Any] | UpdatePlan") -> "UpdatePlan":
        """The plan of :meth:`to_dict` (or a plan); raises ``ValueError`` for anything else."""
        if isinstance(data, UpdatePlan):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"plan must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan has unknown fields {unknown}")
        plan = cls(**data)
        ok = isinstance(plan.steps, int) and not isinstance(plan.steps, bool) and plan.steps >= 0
        ok &= plan.proposals is None or (isinstance(plan.proposals, int) and not isinstance(plan.proposals, bool) and plan.proposals >= 0)
        ok &= all(isinstance(getattr(plan, f), bool) for f in ("learn", "steps_cut", "spawn_skipped", "guard_cut"))
        if not ok:
            raise ValueError(f"plan has a field of the wrong type or range: {data!r}")
        return plan


@dataclass(frozen=True)
class DriftReport:
    """What one ``partial_fit`` did to the model."""

    model_version: int
    n_items: int
    steps: int
    update_ms: float
    churn: float  # share of the model's reservoir this update moved to an id other than a descendant of its id
    centre_shift: float  # mean distance moved by the centres, in units of the mean cluster radius
    novelty_rate: float  # share of the batch no existing cluster explains
    new_cluster_ids: list[int] = field(default_factory=list)
    n_clusters: int = 0
    buffer_size: int = 0
    budget_exhausted: bool = False  # the clock cut part of the update (see plan)
    guard_action: str = "none"  # "none", "shrunk", "rolled_back", "dropped_new"
    plan: dict = field(default_factory=lambda: UpdatePlan().to_dict())  # UpdatePlan.to_dict(): replay with partial_fit(X, plan=...)
    # One dict per event in an id's life this update made: born, retired, revived
    # (stream_dec/online/lifecycle.py, with their evidence); the service publishes each
    # as a lifecycle record.
    lifecycle: list[dict] = field(default_factory=list)
    # Share of the reservoir held, after the update, by a strict descendant of the id it was
    # first given (announced refinement; not churn).
    refined: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

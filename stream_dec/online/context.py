"""What the phases of one online update share: the batch, the reservoir snapshot, the clock and its cuts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from stream_dec.online.report import UpdatePlan

# Centre steps stop at this share of the time budget: the rest is left for the spawn
# search and the guard, so a large step budget cannot starve them at every batch.
STEP_SHARE = 0.5


@dataclass
class UpdateContext:
    """One ``partial_fit``: its inputs, what earlier phases found, and what the clock cut.

    A fresh update checks the clock between its units of work (a centre step, the
    spawn search, one proposal, one guard iteration) and records each cut; a replay
    (``replay`` set) ignores the clock and cuts where the recorded plan says.
    """

    version: int  # the model version the update produces
    rng: np.random.Generator  # seeded by (seed, version): the same batch gives the same update
    t0: float  # perf_counter at the start
    deadline: float  # perf_counter value by which the update should be done
    replay: UpdatePlan | None  # the plan to redo, or None for a fresh update
    step_budget: int  # centre steps allowed (online_steps, or the plan's steps on a replay)
    z: torch.Tensor  # [n, d] latents of the batch
    z_in: torch.Tensor  # latents of the items an existing cluster explains
    nearest: torch.Tensor  # [n] row of the winning (gated) cluster of each item
    explained: torch.Tensor  # [n] whether that cluster's radius explains the item
    res: torch.Tensor  # [R, d] reservoir latents
    published: torch.Tensor  # [R] id each reservoir item was first given
    before: torch.Tensor  # [R] row each reservoir item is assigned to before the update
    k_old: int  # clusters before the update
    old_centres: torch.Tensor  # [k_old, d] current prototypes before the update
    old_gate_cur: torch.Tensor  # [k_old] their gates before the update
    # What the update did, recorded as it goes (the plan of the update).
    steps: int = 0
    steps_cut: bool = False
    spawn_skipped: bool = False
    proposals: int | None = None
    guard_cut: bool = False
    turnover: int | None = None  # the window's turnover counter before a spawn search reset it
    births: dict = field(default_factory=dict)  # new id -> evidence of its birth (spawn.maybe_spawn)
    given: torch.Tensor | None = None  # [n] row each item was given by the centre step (None: ``nearest``)

    def out_of_time(self) -> bool:
        """Whether a fresh update has used its wall-clock budget (never, on a replay)."""
        return self.replay is None and time.perf_counter() > self.deadline

    def out_of_step_time(self) -> bool:
        """Whether a fresh update has used the share of its budget that centre steps may take."""
        return self.replay is None and time.perf_counter() > self.t0 + STEP_SHARE * (self.deadline - self.t0)

    def plan(self) -> UpdatePlan:
        """The plan of this update: what a replay must redo."""
        return UpdatePlan(
            steps=self.steps, steps_cut=self.steps_cut, spawn_skipped=self.spawn_skipped,
            proposals=self.proposals, guard_cut=self.guard_cut,
        )

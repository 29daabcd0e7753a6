"""What the phases of one online update share: the batch, the reservoir snapshot, the clock."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class UpdateContext:
    """One ``partial_fit``: its inputs and what earlier phases found, for the later ones."""

    version: int  # the model version the update produces
    rng: np.random.Generator  # seeded by (seed, version): the same batch gives the same update
    t0: float  # perf_counter at the start
    deadline: float  # perf_counter value by which the update should be done
    z: torch.Tensor  # [n, d] latents of the batch
    z_in: torch.Tensor  # latents of the items an existing cluster explains
    nearest: torch.Tensor  # [n] row of the winning (gated) cluster of each item
    explained: torch.Tensor  # [n] whether that cluster's radius explains the item
    res: torch.Tensor  # [R, d] reservoir latents
    published: torch.Tensor  # [R] id each reservoir item was first given
    before: torch.Tensor  # [R] row each reservoir item is assigned to before the update
    k_old: int  # clusters before the update
    old_centres: torch.Tensor  # [k_old, d] current prototypes before the update

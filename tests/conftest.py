"""Shared fixtures: synthetic blobs and a small, fast model configuration."""

from __future__ import annotations

import numpy as np
import pytest

# Small network and short schedules keep each fit well under a second on 2 cores.
# The model-level tests check CPU figures and build CPU tensors; on a GPU host they stay on
# the CPU (bench/run_gpu_check.py checks the model on a GPU).
FAST = dict(hidden_dims=(32,), latent_dim=8, pretrain_epochs=8, refine_max_iter=100, n_init=3, verbose=False, device="cpu")


def make_blobs(n_per: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around ``centres`` with labels 0..k-1."""
    X = np.concatenate([c + spread * rng.standard_normal((n_per, centres.shape[1])) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per)
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


@pytest.fixture(scope="session")
def blobs():
    """Five base blobs and one novel blob in 24-d, well separated."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((6, 24)) * 4.0
    X, y = make_blobs(300, centres, 0.5, rng)
    base = y < 5
    return {"X": X[base], "y": y[base], "X_new": X[~base], "centres": centres, "rng_seed": 7}


@pytest.fixture(scope="session")
def fitted(blobs):
    """A StreamDEC fitted on the base blobs (do not mutate: clone via save/load)."""
    from stream_dec import StreamDEC

    return StreamDEC(n_clusters=5, random_state=0, **FAST).fit(blobs["X"])


# Kafka fixtures (embedded broker per module, consume helper) live in conftest_kafka.py.
from conftest_kafka import broker, kafka_consume  # noqa: E402,F401

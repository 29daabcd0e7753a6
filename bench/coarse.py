"""Seeded coarse variants of the shared data sets: a few classes drawn at random.

A name ``SET-cK`` or ``SET-cKsS`` is the set ``SET`` restricted to ``K`` of its classes,
drawn without replacement by ``numpy.random.default_rng(S)`` (``S`` = 0 when omitted);
labels are renumbered 0 .. K-1 in the original class order and stay the true classes
(no class is merged into another). A plain ``SET`` name is the whole set. With few
classes, the 60% base classes of the stream protocol give few fitted clusters, each
broad enough to hold a novel class: the regime where id-stable clustering loses to
MiniBatchKMeans (docs/experiments.md §12).

>>> parse_name("stackoverflow-c8s1")
('stackoverflow', 8, 1)
>>> parse_name("mnist_test")
('mnist_test', None, 0)
>>> pick_classes(20, 4, 0).tolist()
[5, 9, 11, 14]
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^(?P<set>.+?)-c(?P<k>\d+)(?:s(?P<s>\d+))?$")

#: The coarse sets of the hierarchy study: 4 and 8 classes of each text set (three
#: draws of 8), and MNIST's 10.
COARSE_SETS = (
    "stackoverflow-c4",
    "stackoverflow-c8",
    "stackoverflow-c8s1",
    "stackoverflow-c8s2",
    "banking77-c4",
    "banking77-c8",
    "banking77-c8s1",
    "banking77-c8s2",
    "mnist_test",
)


def parse_name(name: str) -> tuple[str, int | None, int]:
    """``(set, classes kept or None for all, subset seed)`` of a coarse set name."""
    m = _NAME.match(name)
    if m is None:
        return name, None, 0
    return m["set"], int(m["k"]), int(m["s"] or 0)


def pick_classes(n_classes: int, k: int, seed: int) -> np.ndarray:
    """The ``k`` classes (sorted) of a set with ``n_classes`` that the subset seed draws."""
    if not 1 <= k <= n_classes:
        raise ValueError(f"cannot keep {k} of {n_classes} classes")
    return np.sort(np.random.default_rng(seed).choice(n_classes, k, replace=False))


def load_coarse(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(X float32, y int64 in 0..K-1, class names)`` of a coarse set name."""
    base, k, seed = parse_name(name)
    with np.load(Path(data_dir) / f"{base}.npz") as d:
        X, y, names = d["X"].astype(np.float32), d["y"].astype(np.int64), [str(s) for s in d["label_names"]]
    if k is None:
        return X, y, names
    keep = pick_classes(len(names), k, seed)
    mask = np.isin(y, keep)
    return X[mask], np.searchsorted(keep, y[mask]), [names[c] for c in keep]

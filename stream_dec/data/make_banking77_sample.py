"""Rebuild ``banking77_sample.npz`` from the full Banking77 embeddings (development tool, not shipped).

Usage: ``python stream_dec/data/make_banking77_sample.py [SOURCE.npz] [OUT.npz]``
(defaults: ``../shared/data/banking77.npz`` next to the checkout, and this folder).
The selection is deterministic: the 24 largest intents (ties broken by class index),
150 items drawn from each with ``numpy.random.default_rng(0)``, rows shuffled with the
same generator. See README.md here for provenance and licence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

N_CLASSES = 24
PER_CLASS = 150
SEED = 0

ATTRIBUTION = (
    "Banking77 by PolyAI (github.com/PolyAI-LDN/task-specific-datasets), CC BY 4.0; "
    "Casanueva et al. 2020, 'Efficient Intent Detection with Dual Sentence Encoders'. "
    "Embedded with sentence-transformers/all-MiniLM-L6-v2, L2-normalised, sampled by stream_dec."
)


def build(src: Path, dst: Path) -> dict:
    """Write the sample to ``dst`` and return a summary of what was selected."""
    with np.load(src, allow_pickle=False) as z:
        X, y, names, src_index = z["X"], z["y"], z["label_names"], z["src_index"]
    counts = np.bincount(y, minlength=len(names))
    # Stable sort: equal counts keep class-index order, so the choice is reproducible.
    classes = np.sort(np.argsort(-counts, kind="stable")[:N_CLASSES])
    rng = np.random.default_rng(SEED)
    rows = np.concatenate([rng.choice(np.flatnonzero(y == c), min(PER_CLASS, counts[c]), replace=False) for c in classes])
    rows = rows[rng.permutation(len(rows))]
    remap = {int(c): i for i, c in enumerate(classes)}
    out = {
        "X": X[rows].astype(np.float16),
        "y": np.array([remap[int(c)] for c in y[rows]], dtype=np.int32),
        "label_names": names[classes],
        "src_index": src_index[rows].astype(np.int32),
        "attribution": np.array(ATTRIBUTION),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **out)
    return {"rows": len(rows), "classes": [str(n) for n in names[classes]], "bytes": dst.stat().st_size}


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parents[2] / "shared" / "data" / "banking77.npz"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "banking77_sample.npz"
    print(build(source, target))

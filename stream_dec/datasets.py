"""Loading embedding arrays from ``.npy`` / ``.npz`` files (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_embeddings(path: str | Path, key: str = "X", labels_key: str = "y") -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(X, y)`` from a ``.npy`` (y is None) or ``.npz`` file (y when present).

    A ``.npz`` without ``key`` but with exactly one array uses that array. Pickled
    object arrays are refused.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file {p} does not exist")
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False), None
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                if key in names:
                    X = z[key]
                elif len(names) == 1:
                    X = z[names[0]]
                else:
                    raise ValueError(f"{p} has no array {key!r} (arrays: {', '.join(names)}); pick one with --key")
                y = z[labels_key] if labels_key in names else None
                return X, y
    except ValueError:
        raise
    except Exception as exc:  # truncated or foreign files raise OSError, BadZipFile, EOFError...
        raise ValueError(f"cannot read {p}: {exc}") from None
    raise ValueError(f"{p}: unsupported file type {p.suffix!r} (use .npy or .npz)")

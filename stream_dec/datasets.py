"""Loading embedding arrays from ``.npy`` / ``.npz`` files (no pickle)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

#: The labelled sample shipped inside the package (stream_dec/data/README.md).
SAMPLE_NAME = "banking77_sample.npz"

# The first bytes of each format: a file that lacks them is refused before numpy reads it,
# since numpy would try pickle on it and answer with a message about pickled data.
_MAGIC = {".npy": (b"\x93NUMPY",), ".npz": (b"PK\x03\x04", b"PK\x05\x06")}


def sample_path() -> Path:
    """Path of the Banking77 sample shipped inside the package (``stream-dec demo``'s data)."""
    return Path(str(resources.files("stream_dec") / "data" / SAMPLE_NAME))


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


def _check_file(p: Path) -> None:
    if not p.exists():
        raise DataFileError(f"data file {p} does not exist")
    if not p.is_file():
        raise DataFileError(f"data file {p} is not a file")
    if p.suffix not in _MAGIC:
        raise DataFileError(f"{p}: unsupported file type {p.suffix!r} (use .npy or .npz)")
    with open(p, "rb") as f:
        head = f.read(6)
    if not head.startswith(_MAGIC[p.suffix]):
        raise DataFileError(f"cannot read {p}: not a {p.suffix} file (see numpy.save / numpy.savez)")


def load_embeddings(path: str | Path, key: str = "X", labels_key: str = "y") -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(X, y)`` from a ``.npy`` (y is None) or ``.npz`` file (y when present).

    A ``.npz`` without ``key`` but with exactly one array uses that array. Pickled
    object arrays are refused. Raises :class:`DataFileError` (a ``ValueError``) naming
    the file and the problem.
    """
    p = Path(path)
    _check_file(p)
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False), None
        with np.load(p, allow_pickle=False) as z:
            names = list(z.files)
            if key in names:
                X = z[key]
            elif len(names) == 1:
                X = z[names[0]]
            else:
                raise DataFileError(f"{p} has no array {key!r} (arrays: {', '.join(names) or 'none'}); pick one with --key")
            y = z[labels_key] if labels_key in names else None
            return X, y
    except DataFileError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataFileError(f"cannot read {p}: it holds Python objects, and pickled data is refused; save numeric arrays") from None
        raise DataFileError(f"cannot read {p}: {exc}") from None
    except Exception as exc:  # truncated or foreign files raise OSError, BadZipFile, EOFError...
        raise DataFileError(f"cannot read {p}: {exc}") from None

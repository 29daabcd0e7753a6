"""Checkpoint files: atomic, checksummed, never unpickling code.

A checkpoint is ``MAGIC + sha256(payload) + payload`` where the payload is a
``torch.save`` of plain containers and tensors, read back with ``weights_only=True``.
Writes go to a temporary file that is fsynced and renamed, so a crash leaves either
the old file or the new one. In a checkpoint directory the newest ``keep`` files are
kept, and loading falls back to the previous one when the newest is corrupt.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAGIC = b"STREAMDEC-CKPT-1\n"
_NAME = re.compile(r"^ckpt-(\d{12})\.sdec$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or of an unknown format."""


def encode(state: dict) -> bytes:
    """The bytes of a checkpoint file holding ``state`` (header, sha256, torch payload)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    return MAGIC + digest + b"\n" + payload


def write_atomic(path: str | os.PathLike, state: dict | bytes) -> Path:
    """Write ``state`` (a dict, or bytes from :func:`encode`) to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = state if isinstance(state, bytes) else encode(state)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read_verified(path: str | os.PathLike) -> dict:
    """Read and verify one checkpoint file; raise :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from None
    head = len(MAGIC) + 65
    if not raw.startswith(MAGIC) or len(raw) < head:
        raise CheckpointError(f"{path} is not a stream_dec checkpoint (bad header)")
    digest, payload = raw[len(MAGIC) : head - 1], raw[head:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be decoded: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds {type(state).__name__}, not a checkpoint dict")
    return state


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files of ``directory``, newest (highest sequence number) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if _NAME.match(p.name)]
    return sorted(files, key=lambda p: p.name, reverse=True)


def save_to_directory(directory: str | os.PathLike, state: dict | bytes, seq: int, keep: int = 3) -> Path:
    """Write ``ckpt-<seq>.sdec`` into ``directory`` and prune all but the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = write_atomic(Path(directory) / f"ckpt-{int(seq):012d}.sdec", state)
    for old in checkpoint_files(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_newest(directory: str | os.PathLike) -> tuple[dict, Path]:
    """Newest checkpoint of ``directory`` that verifies, falling back to older ones."""
    files = checkpoint_files(directory)
    if not files:
        raise CheckpointError(f"no checkpoint found in {directory}")
    errors = []
    for p in files:
        try:
            return read_verified(p), p
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
            errors.append(str(exc))
    raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(errors))


def load_any(path: str | os.PathLike) -> tuple[dict, Path]:
    """Load a checkpoint file, or the newest valid one if ``path`` is a directory."""
    p = Path(path)
    if p.is_dir():
        return load_newest(p)
    return read_verified(p), p

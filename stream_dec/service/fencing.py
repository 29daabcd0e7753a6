"""Fencing: only the newest owner of the stream writes to the shared checkpoint directory.

A member that stops responding (a long GC, a stalled disk, SIGSTOP) loses its group
session; a standby takes the partitions over. When the old owner wakes up it must not
publish, journal, checkpoint or commit anything more: two lineages writing one
directory would collide on ``ckpt-<version>`` files, prune each other's journal lines
and hand out the same new cluster id for different groups.

Every owner therefore claims an **epoch** when it is assigned the partitions: the lease
file ``owner-<epoch>.lease`` in the checkpoint directory, created exclusively, with the
next number after the newest lease there. A writer may write only while its epoch is
the newest (:meth:`OwnerLease.guard`, one directory listing under a lock).

Why a lease file rather than the consumer group's generation: a paused owner cannot
learn the current generation without a round trip to the coordinator (its own copy is
the stale one), while the lease is one local read beside the files it protects; and the
generation restarts when the group is deleted and recreated (every member gone past
the offsets' retention, or a broker with memory storage restarted), whereas lease
epochs only grow. The generation and member id are written into the lease for
diagnosis.

Invariants:

* Epochs are claimed in order, each once: the exclusive create fails for a second
  claimer of the same number, which then claims the next.
* :meth:`OwnerLease.guard` holds an exclusive lock (threads of this process and
  ``flock`` on ``owner.lock`` across processes) while it checks the epoch, so the
  write inside it and a newer owner's claim are ordered: either the write lands before
  the claim (the new owner reads it) or the writer sees the claim and writes nothing.
* The newest lease is never removed; older ones are pruned beyond :data:`KEEP_LEASES`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

#: Lease files kept (the newest and a few before it, for diagnosis).
KEEP_LEASES = 8
#: File whose ``flock`` orders writes and claims across processes (never replaced).
LOCK_FILE = "owner.lock"
_LEASE = re.compile(r"^owner-(\d{12})\.lease$")


class Fenced(RuntimeError):
    """This instance is not the newest owner of the stream: it must write nothing.

    ``reason``: ``lease`` (a newer owner claimed the stream), ``session`` (no successful
    heartbeat for a session timeout), ``lost`` (the group took the partitions away) or
    ``not_owner``.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"fenced ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


def instance_id() -> str:
    """An identity for this process, unique across hosts and restarts (written into leases and checkpoints).

    >>> a, b = instance_id(), instance_id()
    >>> a != b and a.split(":")[1] == str(os.getpid())
    True
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_path(directory: str | os.PathLike, epoch: int) -> Path:
    """The lease file of ``epoch``."""
    return Path(directory) / f"owner-{int(epoch):012d}.lease"


def newest_epoch(directory: str | os.PathLike) -> int:
    """The newest epoch claimed in ``directory`` (0: none yet). Raises ``OSError`` if it cannot be listed."""
    newest = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            m = _LEASE.match(entry.name)
            if m:
                newest = max(newest, int(m.group(1)))
    return newest


class OwnerLease:
    """The owner leases of one checkpoint directory, as seen by one instance.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> a, b = OwnerLease(d, "a"), OwnerLease(d, "b")
    >>> a.claim(), b.claim()
    (1, 2)
    >>> with b.guard(2): pass  # b owns the stream
    >>> with a.guard(1): pass
    Traceback (most recent call last):
    ...
    stream_dec.service.fencing.Fenced: fenced (lease): epoch 1 is stale: the newest owner holds epoch 2
    """

    def __init__(self, directory: str | os.PathLike, instance: str):
        self.directory = Path(directory)
        self.instance = instance
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing one open file

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's write lock (this process's threads and other processes)."""
        with self._thread_lock:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def guard(self, epoch: int | None) -> Iterator[None]:
        """Hold the lock while ``epoch`` is the newest: raises :class:`Fenced` (writing nothing) otherwise.

        ``OSError`` if the directory cannot be used (the write must wait and be retried).
        """
        if epoch is None:
            raise Fenced("not_owner", "this instance holds no epoch")
        with self.locked():
            newest = newest_epoch(self.directory)
            if newest > epoch:
                raise Fenced("lease", f"epoch {epoch} is stale: the newest owner holds epoch {newest}")
            yield

    def claim(self, generation: int = -1, member_id: str = "") -> int:
        """Claim the next epoch for this instance (at assignment); returns it."""
        with self.locked():
            while True:
                epoch = newest_epoch(self.directory) + 1
                body = json.dumps({"epoch": epoch, "instance": self.instance, "generation": generation,
                                   "member_id": member_id, "claimed_at": time.time()})
                try:
                    fd = os.open(lease_path(self.directory, epoch), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:  # another claimer took this number (without the lock: another host's NFS view)
                    continue
                try:
                    os.write(fd, body.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _fsync_dir(self.directory)
                self._prune(epoch)
                return epoch

    def _prune(self, newest: int) -> None:
        for name in os.listdir(self.directory):
            m = _LEASE.match(name)
            if m and int(m.group(1)) <= newest - KEEP_LEASES:
                (self.directory / name).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

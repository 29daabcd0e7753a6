#!/usr/bin/env python
"""Compose demo producer: stream a data set to the input topic forever, at a steady rate.

Installed in the image as ``stream-dec-demo-producer`` and run by the ``demo-producer``
service of docker-compose.yml, so that a fresh ``docker compose up`` shows moving
numbers on the dashboard without a manual step. Each pass over the rows ("round") adds
a little Gaussian noise and uses new keys (``demo-<round>-<row>``); one record in
``--bad-every`` is malformed on purpose (wrong dimension, bad JSON, missing id) so the
dead-letter panels have something to show. Stop it with SIGTERM or Ctrl-C; it flushes.

Defaults come from the service settings (STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS,
STREAM_DEC_KAFKA__INPUT_TOPIC), so it feeds whatever ``stream-dec run`` reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time

import numpy as np

from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON, encode_json

_STOP = False


def _stop(*_args) -> None:
    global _STOP
    _STOP = True


def _bad_records():
    """Malformed records, in turn: each is dead-lettered by the service with its own reason."""
    f32 = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_FLOAT32.encode())]
    js = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON.encode())]
    return itertools.cycle(
        [
            ("wrong_dimension", np.zeros(8, dtype="<f4").tobytes(), f32),
            ("bad_json", b'{"id": "broken", "embedding": [0.1, 0.2', js),
            ("missing_id", json.dumps({"embedding": [0.1, 0.2, 0.3]}).encode(), js),
        ]
    )


def _connect(servers: str, timeout_s: float):
    """A producer for the paced stream, retrying while the broker starts (compose starts both at once)."""
    from kafka.errors import KafkaError

    from stream_dec.io.producer import PACED_LINGER_MS, make_producer

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return make_producer(servers, client_id="stream-dec-demo-producer", linger_ms=PACED_LINGER_MS)
        except KafkaError as exc:
            if time.monotonic() > deadline or _STOP:
                raise SystemExit(f"stream-dec-demo-producer: no broker at {servers} after {timeout_s:g} s ({exc})")
            print(f"stream-dec-demo-producer: waiting for the broker at {servers} ({exc})", file=sys.stderr, flush=True)
            time.sleep(2)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``stream-dec-demo-producer``."""
    p = argparse.ArgumentParser(prog="stream-dec-demo-producer", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap-servers", default=os.environ.get("STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS", "localhost:9092"))
    p.add_argument("--topic", default=os.environ.get("STREAM_DEC_KAFKA__INPUT_TOPIC", "embeddings"))
    p.add_argument("--data", default=None, help=".npy/.npz with array X (default: the sample shipped in the package)")
    p.add_argument("--rate", type=float, default=50.0, help="records per second (default 50)")
    p.add_argument("--format", choices=("float32", "json"), default="float32", help="value format of good records")
    p.add_argument("--noise", type=float, default=0.005, help="std of the Gaussian noise added each round (default 0.005)")
    p.add_argument("--bad-every", type=int, default=500, help="send a malformed record after every N good ones (0 = never)")
    p.add_argument("--max-records", type=int, default=0, help="stop after N good records (0 = run until stopped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to wait for the broker (default 120)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Stream the rows until stopped (or ``--max-records``), then flush and print a JSON summary."""
    args = build_parser().parse_args(argv)
    if args.rate <= 0:
        raise SystemExit("stream-dec-demo-producer: --rate must be > 0")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from stream_dec.datasets import load_embeddings, sample_path

    X, _ = load_embeddings(args.data or sample_path())
    X = np.asarray(X, dtype=np.float32)
    rng = np.random.default_rng(args.seed)
    producer = _connect(args.bootstrap_servers, args.connect_timeout)
    headers = [(CONTENT_TYPE_HEADER, (CONTENT_TYPE_FLOAT32 if args.format == "float32" else CONTENT_TYPE_JSON).encode())]
    bad = _bad_records()
    sent = bad_sent = 0
    t0 = last_report = time.monotonic()
    print(f"stream-dec-demo-producer: {X.shape[0]} rows x {X.shape[1]} to {args.topic!r} at {args.rate:g}/s", flush=True)
    for rnd in itertools.count():
        noisy = X + rng.normal(0.0, args.noise, size=X.shape).astype(np.float32) if args.noise > 0 else X
        for row in range(X.shape[0]):
            if _STOP or (args.max_records and sent >= args.max_records):
                break
            wait = t0 + sent / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            key = f"demo-{rnd}-{row}"
            vec = noisy[row]
            value = vec.astype("<f4").tobytes() if args.format == "float32" else encode_json(key, vec)
            producer.send(args.topic, key=key.encode(), value=value, headers=headers)
            sent += 1
            if args.bad_every and sent % args.bad_every == 0:
                _reason, bad_value, bad_headers = next(bad)
                producer.send(args.topic, key=f"demo-bad-{sent}".encode(), value=bad_value, headers=bad_headers)
                bad_sent += 1
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                print(f"stream-dec-demo-producer: {sent} records sent ({bad_sent} malformed)", flush=True)
        else:
            continue
        break
    producer.flush(timeout=30)
    producer.close(timeout=10)
    print(json.dumps({"records": sent, "malformed": bad_sent, "seconds": round(time.monotonic() - t0, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

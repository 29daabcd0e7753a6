"""The ``stream-dec`` command line: train, evaluate and inspect models; publish data sets to Kafka.

The service commands (``run``, ``demo``) belong to the service layer. Heavy modules
(torch, kafka) are imported inside the commands that need them, so ``--help`` and
``produce`` start without torch. Every error a user can cause (bad files, bad flags,
bad settings, no broker for ``produce``) ends in one ``stream-dec CMD: error: ...`` line
and exit 2. ``run`` also exits 3 when the broker or its output topic stayed unreachable
longer than ``STREAM_DEC_KAFKA__MAX_OUTAGE_S`` (a supervisor may restart it later), and 4
when its input offsets lie outside the log under ``STREAM_DEC_KAFKA__OFFSET_RESET_POLICY=fail``
(an operator must look). The command line options are described in docs/contracts.md.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Hyper-parameters that have their own flag in `train`.
_FLAG_PARAMS = {"n_clusters": "--n-clusters", "random_state": "--seed", "verbose": "--quiet"}


class CommandError(ValueError):
    """A user error of a command: printed as ``stream-dec CMD: error: MESSAGE``, exit 2."""


class ExitError(RuntimeError):
    """A failure that is not the user's input: printed as ``stream-dec CMD: error: MESSAGE``, exit ``status``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- argument types
def parse_value(text: str) -> object:
    """A Python literal if ``text`` is one, else the text itself (hyper-parameter values on command lines).

    >>> parse_value("(64, 32)"), parse_value("0.5"), parse_value("None"), parse_value("mean")
    ((64, 32), 0.5, None, 'mean')
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE as :func:`parse_value` reads it."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(raw)


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _number(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 if positive else value >= 0):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be {'>' if positive else '>='} 0, got {text}")
    return value


def _positive(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def _seconds(text: str) -> float:
    """A number > 0."""
    return _number(text, positive=True)


def _rate(text: str) -> float:
    """A number >= 0."""
    return _number(text, positive=False)


def _port(text: str) -> int:
    """A TCP port, 0 meaning off."""
    value = _integer(text, 0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0-65535, got {value}")
    return value


# ---------------------------------------------------------------- train, evaluate, inspect
def _hyper_parameters(pairs: list[tuple[str, object]] | None) -> dict[str, object]:
    """The ``--param`` pairs as keyword arguments of ``StreamDEC``; unknown names are errors.

    Values are checked by the estimator itself, whose messages name the parameter and
    the expected type.
    """
    import inspect

    from stream_dec import StreamDEC

    known = [n for n in inspect.signature(StreamDEC).parameters if n not in _FLAG_PARAMS]
    params = dict(pairs or [])
    for key in params:
        if key in _FLAG_PARAMS:
            raise CommandError(f"--param {key}: set it with {_FLAG_PARAMS[key]}")
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise CommandError(f"--param {key}: unknown hyper-parameter" + (f" (did you mean {hint[0]}?)" if hint else ""))
    return params


def _checkpoint_dir(path: str) -> Path:
    """``path`` as an existing, writable directory (created when missing), checked before any training."""
    import os

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CommandError(f"--checkpoint-dir {path}: is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--checkpoint-dir {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CommandError(f"--checkpoint-dir {path}: not writable by this user")
    return directory


def _cmd_train(args: argparse.Namespace) -> int:
    from stream_dec import StreamDEC
    from stream_dec.datasets import load_embeddings

    params = _hyper_parameters(args.param)
    ckpt_dir = _checkpoint_dir(args.checkpoint_dir)
    X, _ = load_embeddings(args.data, key=args.key)
    if args.limit:
        X = X[: args.limit]
    model = StreamDEC(n_clusters=args.n_clusters, random_state=args.seed, verbose=not args.quiet, **params)
    model.fit(X)
    try:
        path = model.save(ckpt_dir, keep=args.keep)
    except OSError as exc:
        raise CommandError(f"cannot write the checkpoint to {ckpt_dir}: {exc.strerror or exc}") from None
    print(json.dumps({"checkpoint": str(path), "fit_seconds": round(model.fit_seconds_, 2), **model.summary()}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from stream_dec import StreamDEC
    from stream_dec.datasets import load_embeddings
    from stream_dec.evaluation import score_all

    model = StreamDEC.load(args.checkpoint)
    X, y = load_embeddings(args.data, key=args.key, labels_key=args.labels_key)
    if y is not None and np.shape(y) != (len(X),):
        raise CommandError(f"{args.data}: labels {args.labels_key!r} must be one per row of X ({len(X)}), got shape {np.shape(y)}")
    ids = model.predict(X)
    uniq, counts = np.unique(ids, return_counts=True)
    confidence = model.predict_with_confidence(X)[1]  # what the service publishes
    out: dict = {
        "checkpoint": str(model.checkpoint_path_),
        "items": int(len(ids)),
        "clusters_used": int(len(uniq)),
        "largest_cluster_share": round(float(counts.max() / len(ids)), 4),
        "mean_confidence": round(float(confidence.mean()), 4),
    }
    if y is not None:
        out.update({k: round(v, 4) for k, v in score_all(y, ids).items()})
    else:
        out["note"] = f"no labels array {args.labels_key!r} in the data: only label-free statistics"
    print(json.dumps(out, indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from stream_dec import StreamDEC

    from stream_dec.online.lifecycle import retired_ids

    model = StreamDEC.load(args.checkpoint)
    summary = model.summary()
    retired = retired_ids(model)
    info = {"checkpoint": str(model.checkpoint_path_), **summary, "retired_ids": retired, "extra": model.checkpoint_extra_}
    print(json.dumps(info, indent=2, default=str))
    # stdout stays one JSON document for scripts; the tree is for the person reading.
    print("\n".join(["ids (roots, children indented):", *_tree_lines(summary["tree"], set(retired))]), file=sys.stderr)
    return 0


def _tree_lines(nodes: list[dict], retired: set[int] = frozenset(), depth: int = 0) -> list[str]:
    """One line per id of ``summary()["tree"]``, children indented under their parent; ``retired`` ids marked.

    >>> for line in _tree_lines([{"id": 0, "born": 0, "support": 90, "children": [
    ...         {"id": 5, "born": 3, "support": 40, "children": []}]}, {"id": 1, "born": None, "support": None, "children": []}], {5}):
    ...     print(line)
    0  fitted, support 90
      5  born v3, support 40, retired
    1
    """
    lines = []
    for n in nodes:
        where = [] if n["born"] is None else ["fitted" if n["born"] == 0 else f"born v{n['born']}"]
        where += [] if n["support"] is None else [f"support {n['support']}"]
        where += ["retired"] if n["id"] in retired else []
        lines.append(f"{'  ' * depth}{n['id']}" + (f"  {', '.join(where)}" if where else ""))
        lines += _tree_lines(n["children"], retired, depth + 1)
    return lines


# ---------------------------------------------------------------- produce
def _produce_target(args: argparse.Namespace) -> None:
    """Fill ``--bootstrap-servers`` / ``--topic`` from the service settings when unset, and check the topic name."""
    from stream_dec.settings import check_topic_name, load_settings

    if args.bootstrap_servers is None or args.topic is None:
        # Unset flags fall back to the service settings, so `produce` feeds what `run` reads.
        kafka = load_settings().kafka
        args.bootstrap_servers = args.bootstrap_servers or kafka.bootstrap_servers
        args.topic = args.topic or kafka.input_topic
    try:
        check_topic_name(args.topic)
    except ValueError as exc:
        raise CommandError(f"--topic {args.topic!r}: {exc}") from None


def _rows_to_send(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The row numbers ``--start``/``--limit`` select and those rows as little-endian float32."""
    from stream_dec.datasets import load_embeddings

    X, _ = load_embeddings(args.data, key=args.key)
    if X.ndim != 2 or X.dtype.kind not in "fiu":
        raise CommandError(f"{args.data}: expected a 2-d numeric array, got shape {X.shape} of {X.dtype}")
    rows = np.arange(X.shape[0])[args.start :]
    if args.limit:
        rows = rows[: args.limit]
    if len(rows) == 0:
        raise CommandError(f"{args.data}: no rows to send ({X.shape[0]} rows, --start {args.start})")
    Xf = np.ascontiguousarray(X[rows[0] : rows[-1] + 1], dtype="<f4")
    bad_rows = int(np.count_nonzero(~np.isfinite(Xf).all(axis=1)))
    if bad_rows:
        print(f"warning: {bad_rows} rows hold NaN/inf values; the service will dead-letter them", file=sys.stderr)
    return rows, Xf


def _open_producer(args: argparse.Namespace, row_bytes: int):
    """Create the topic when asked, then a tuned producer; no broker within ``--timeout`` is an error."""
    from kafka.errors import KafkaError

    from stream_dec.io.producer import make_producer

    if args.create_topic or args.partitions is not None:
        from stream_dec.io.broker import BrokerError, create_topics

        try:
            create_topics(args.bootstrap_servers, [args.topic], partitions=args.partitions or 1, timeout_s=args.timeout)
        except BrokerError as exc:
            raise CommandError(str(exc)) from None
    try:
        return make_producer(args.bootstrap_servers, client_id="stream-dec-produce", acks=args.acks,
                             max_record_bytes=row_bytes, timeout_s=args.timeout)
    except KafkaError as exc:
        raise CommandError(f"cannot reach a broker at {args.bootstrap_servers} within {args.timeout:g} s ({exc})") from None


@dataclass
class _Sent:
    """What one ``produce`` run sent, and what the broker refused."""

    records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: list[BaseException] = field(default_factory=list)
    interrupted: bool = False


def _send_rows(producer, args: argparse.Namespace, rows: np.ndarray, Xf: np.ndarray) -> _Sent:
    """Send one record per row, keyed ``--key-prefix`` + row number; stop at the first refused record or Ctrl-C."""
    from kafka.errors import KafkaTimeoutError

    from stream_dec.io.codecs import CONTENT_TYPE_FLOAT32, CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON, encode_json

    headers = [(CONTENT_TYPE_HEADER, (CONTENT_TYPE_FLOAT32 if args.format == "float32" else CONTENT_TYPE_JSON).encode())]
    sent = _Sent()
    t0 = time.perf_counter()
    try:
        for i, row in enumerate(rows):
            key = f"{args.key_prefix}{row}"
            value = Xf[i].tobytes() if args.format == "float32" else encode_json(key, Xf[i])
            producer.send(args.topic, key=key.encode(), value=value, headers=headers).add_errback(sent.failures.append)
            sent.records += 1
            sent.bytes += len(value)
            if args.progress_every and sent.records % args.progress_every == 0:
                rate = sent.records / max(time.perf_counter() - t0, 1e-9)
                print(f"produce: {sent.records}/{len(rows)} records ({rate:,.0f} records/s)", file=sys.stderr, flush=True)
            if sent.failures:
                break
        producer.flush(timeout=max(3 * args.timeout, 30.0))
    except KafkaTimeoutError as exc:
        producer.close(timeout=0)
        raise CommandError(f"timed out sending to {args.topic!r} on {args.bootstrap_servers} after {sent.records} records: {exc}") from None
    except KeyboardInterrupt:
        sent.interrupted = True
        producer.flush(timeout=5)
    finally:
        sent.seconds = time.perf_counter() - t0
    producer.close(timeout=5)
    return sent


def _cmd_produce(args: argparse.Namespace) -> int:
    _produce_target(args)
    rows, Xf = _rows_to_send(args)
    producer = _open_producer(args, row_bytes=Xf.shape[1] * (4 if args.format == "float32" else 24))
    sent = _send_rows(producer, args, rows, Xf)
    delivered = sent.records - len(sent.failures)
    summary = {
        "topic": args.topic,
        "format": args.format,
        "records": delivered,
        "bytes": sent.bytes,
        "seconds": round(sent.seconds, 3),
        "records_per_s": round(delivered / max(sent.seconds, 1e-9), 1),
    }
    print(json.dumps(summary), flush=True)
    if sent.failures:
        first = sent.failures[0]
        print(f"stream-dec produce: error: {len(sent.failures)} records were not delivered (first: {type(first).__name__}: {first})", file=sys.stderr)
        return 1
    return 130 if sent.interrupted else 0


# ---------------------------------------------------------------- run, demo
def _cmd_run(args: argparse.Namespace) -> int:
    import logging

    from stream_dec.settings import check_device, load_settings

    settings = load_settings(
        env_file=args.env_file,
        role=args.role,
        kafka__bootstrap_servers=args.bootstrap_servers,
        kafka__group_id=args.group_id,
        kafka__input_topic=args.input_topic,
        kafka__output_topic=args.output_topic,
        kafka__dlq_topic=args.dlq_topic,
        batch__max_size=args.batch_size,
        batch__max_wait_ms=args.max_wait_ms,
        checkpoint__dir=args.checkpoint_dir,
        metrics__port=args.metrics_port,
    )
    # Before the checkpoint is read: a missing GPU must not look like a missing checkpoint.
    check_device(settings)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kafka.errors import KafkaError

    from stream_dec.service import NoCheckpointError
    from stream_dec.service.roles import build_service
    from stream_dec.service.outage import EXIT_OFFSETS, EXIT_OUTAGE, OffsetsOutOfRangeError, OutageError, is_outage

    try:
        service = build_service(settings)
    except NoCheckpointError as exc:
        raise CommandError(str(exc)) from None
    try:
        return service.run(max_idle_s=args.exit_when_idle)
    except OutageError as exc:
        raise ExitError(f"giving up: {exc}", EXIT_OUTAGE) from None
    except OffsetsOutOfRangeError as exc:
        raise ExitError(str(exc), EXIT_OFFSETS) from None
    except KafkaError as exc:  # kafka-python's errors name their type only sometimes
        text = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
        if is_outage(exc):  # one the service does not retry where it happened: still an outage
            raise ExitError(f"Kafka at {settings.kafka.bootstrap_servers} unreachable: {text}", EXIT_OUTAGE) from None
        raise CommandError(f"Kafka at {settings.kafka.bootstrap_servers}: {text}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from stream_dec.demo import DemoError, format_report, run_demo

    try:
        report = run_demo(
            data=args.data,
            bootstrap_servers=args.bootstrap_servers,
            batch_size=args.batch_size,
            seed=args.seed,
            rate=args.rate,
            max_wait_ms=args.max_wait_ms,
            progress=not args.quiet,
        )
    except DemoError as exc:
        print(f"stream-dec demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stream-dec demo: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    return 0


# ---------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    """Read the output topic (or ``--records``), then write the HTML page; a ReportError is a user error (exit 2)."""
    from stream_dec.report import read_records_file, stream_from_kafka, write_report
    from stream_dec.report.figures import require_matplotlib
    from stream_dec.report.reader import parse_since, read_topic

    require_matplotlib()  # before a long read: say how to install it first
    if args.records is None and (args.bootstrap_servers is None or args.topic is None):
        raise CommandError("give --records FILE, or --bootstrap-servers and --topic")
    if args.dlq_topic is not None and args.bootstrap_servers is None:
        raise CommandError("--dlq-topic needs --bootstrap-servers")
    if args.since and args.records is not None:
        raise CommandError("--since filters a topic by record time; the lines of --records carry none")
    since_ms = parse_since(args.since) if args.since else None
    from kafka.errors import KafkaError

    try:
        if args.records is not None:
            stream = read_records_file(args.records)
        else:
            raw = read_topic(args.bootstrap_servers, args.topic, since_ms=since_ms, progress=not args.quiet)
            stream = stream_from_kafka(raw, f"topic {args.topic} on {args.bootstrap_servers}")
        if args.dlq_topic is not None:
            from stream_dec.io.codecs import REASON_HEADER
            from stream_dec.report.reader import dlq_reasons

            dead = read_topic(args.bootstrap_servers, args.dlq_topic, since_ms=since_ms, progress=not args.quiet)
            stream.dlq = dlq_reasons(dead, REASON_HEADER)
    except KafkaError as exc:
        raise CommandError(f"Kafka at {args.bootstrap_servers}: {type(exc).__name__}: {exc}") from None
    path = write_report(stream, args.out)
    print(str(path), flush=True)
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``stream-dec`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="stream-dec", description="Streaming Deep Embedded Clustering with stable cluster ids.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_run, _add_demo, _add_inspect, _add_produce, _add_report):
        add(sub)
    return parser


def _add_train(sub) -> None:
    """The ``train`` subcommand."""
    t = sub.add_parser("train", help="fit a base model on a .npy/.npz file and write the first checkpoint")
    t.add_argument("--data", required=True, help=".npy array or .npz file with array X")
    t.add_argument("--key", default="X", help="array name inside a .npz (default X)")
    t.add_argument("--n-clusters", type=_positive, required=True, help="number of clusters to fit")
    t.add_argument("--checkpoint-dir", required=True, help="directory the checkpoint is written to")
    t.add_argument("--seed", type=_non_negative, default=0, help="random seed (default 0)")
    t.add_argument("--keep", type=_positive, default=3, help="checkpoints to keep in the directory")
    t.add_argument("--limit", type=_non_negative, default=0, help="use only the first N rows (0 = all)")
    t.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="extra StreamDEC hyper-parameter (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=_cmd_train)


def _add_evaluate(sub) -> None:
    """The ``evaluate`` subcommand."""
    e = sub.add_parser("evaluate", help="score a checkpoint on a data set (ACC/NMI/ARI when labels are present)")
    e.add_argument("--checkpoint", required=True, help="checkpoint file, or a directory (newest valid one)")
    e.add_argument("--data", required=True, help=".npy or .npz file")
    e.add_argument("--key", default="X", help="array name inside a .npz (default X)")
    e.add_argument("--labels-key", default="y", help="labels array inside a .npz, used only to score (default y)")
    e.set_defaults(func=_cmd_evaluate)


def _add_run(sub) -> None:
    """The ``run`` subcommand."""
    r = sub.add_parser("run", help="the Kafka service: label, learn, publish, checkpoint (settings from STREAM_DEC_* / .env)")
    r.add_argument("--env-file", default=None, help="settings file (default: ./.env when it exists)")
    r.add_argument("--role", default=None, choices=("all", "learner", "predictor"),
                   help="overrides STREAM_DEC_ROLE: all (learn and label, default), learner or predictor (scale-out)")
    r.add_argument("--bootstrap-servers", default=None, help="overrides STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS")
    r.add_argument("--group-id", default=None, help="overrides STREAM_DEC_KAFKA__GROUP_ID")
    r.add_argument("--input-topic", default=None, help="overrides STREAM_DEC_KAFKA__INPUT_TOPIC")
    r.add_argument("--output-topic", default=None, help="overrides STREAM_DEC_KAFKA__OUTPUT_TOPIC")
    r.add_argument("--dlq-topic", default=None, help="overrides STREAM_DEC_KAFKA__DLQ_TOPIC")
    r.add_argument("--batch-size", type=int, default=None, help="overrides STREAM_DEC_BATCH__MAX_SIZE")
    r.add_argument("--max-wait-ms", type=int, default=None, help="overrides STREAM_DEC_BATCH__MAX_WAIT_MS")
    r.add_argument("--checkpoint-dir", default=None, help="overrides STREAM_DEC_CHECKPOINT__DIR")
    r.add_argument("--metrics-port", type=_port, default=None, help="overrides STREAM_DEC_METRICS__PORT (0 = off)")
    r.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS", help="stop after this long without records (batch jobs, tests)")
    r.set_defaults(func=_cmd_run)


def _add_demo(sub) -> None:
    """The ``demo`` subcommand."""
    d = sub.add_parser(
        "demo",
        help="the main job: embedded broker, train on a real sample, stream the rest through the service, report",
        description="Start an embedded Kafka broker (or use --bootstrap-servers), train a base model on the known intents "
        "of the shipped Banking77 sample, stream the rest (new intents appear mid-stream, plus a few malformed records) "
        "through the service in this process, and report throughput, label latency, new clusters, churn, ACC/NMI/ARI "
        "and dead letters. Progress goes to stderr, the report to stdout.",
    )
    d.add_argument("--data", default=None, help=".npz with X and labels y (default: the shipped Banking77 sample)")
    d.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT", help="use this broker instead of an embedded one")
    d.add_argument("--batch-size", type=_positive, default=128, help="micro-batch size of the service (default 128)")
    d.add_argument("--max-wait-ms", type=_non_negative, default=100, help="micro-batch max wait of the service (default 100)")
    d.add_argument("--rate", type=_rate, default=1000.0, help="records/s offered to the service; 0 = as fast as possible (default 1000)")
    d.add_argument("--seed", type=_non_negative, default=0, help="seed of the split, the model and the stream order (default 0)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=_cmd_demo)


def _add_inspect(sub) -> None:
    """The ``inspect`` subcommand."""
    i = sub.add_parser(
        "inspect", help="print what a checkpoint holds",
        description="Print what a checkpoint holds as JSON on stdout, and its ids as a tree (roots, children "
        "indented, with birth version and support where known) on stderr.",
    )
    i.add_argument("--checkpoint", required=True, help="checkpoint file, or a directory (newest valid one)")
    i.set_defaults(func=_cmd_inspect)


def _add_produce(sub) -> None:
    """The ``produce`` subcommand."""
    p = sub.add_parser(
        "produce",
        help="publish a .npy/.npz data set to a Kafka topic (JSON or float32 records)",
        description="Publish the rows of a .npy/.npz array to a topic, one record per row, keyed KEY_PREFIX+ROW. "
        "--bootstrap-servers and --topic default to STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS and STREAM_DEC_KAFKA__INPUT_TOPIC.",
    )
    p.add_argument("--data", required=True, help=".npy array or .npz file with array X")
    p.add_argument("--key", default="X", help="array name inside a .npz (default X)")
    p.add_argument("--topic", default=None, help="topic to publish to (default: the service's input topic)")
    p.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT", help="brokers (default: the service's setting)")
    p.add_argument("--format", choices=("json", "float32"), default="json", help="record value format (default json)")
    p.add_argument("--limit", type=_non_negative, default=0, help="send at most N rows (0 = all)")
    p.add_argument("--start", type=_non_negative, default=0, help="first row to send (default 0)")
    p.add_argument("--key-prefix", default="", help="prefix of the record keys (item ids), e.g. 'doc-'")
    p.add_argument("--create-topic", action="store_true", help="create the topic first (kept if it exists)")
    p.add_argument("--partitions", type=_positive, default=None, help="partitions of a created topic (implies --create-topic; default 1)")
    p.add_argument("--acks", choices=("0", "1", "all"), default="all", help="producer acks (default all)")
    p.add_argument("--progress-every", type=_non_negative, default=10_000, help="print progress every N records (0 = never)")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the broker before giving up (default 10)")
    p.set_defaults(func=_cmd_produce)


def _add_report(sub) -> None:
    """The ``report`` subcommand."""
    r = sub.add_parser(
        "report",
        help="draw an output topic (or a file of its records) as one self-contained HTML page",
        description="Read every record of the service's output topic (assignments, drift and lifecycle records) "
        "or a file of them, and write one HTML page with the pictures embedded: the id tree over model versions, "
        "cluster sizes per batch, churn/novelty/centre shift/update time per batch and the label flow of the largest "
        "ids, under a table of counts (and dead letters by reason with --dlq-topic). Needs matplotlib: "
        "pip install 'stream_dec[report]'. Progress goes to stderr, the page's path to stdout.",
    )
    r.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT", help="brokers to read the topics from")
    r.add_argument("--topic", default=None, help="the output topic (assignment, drift and lifecycle records)")
    r.add_argument("--records", default=None, metavar="FILE", help="read output records from this file (one JSON value a line) instead")
    since = r.add_mutually_exclusive_group()
    since.add_argument("--from-beginning", action="store_true", help="read the topics from their start (the default)")
    since.add_argument("--since", default=None, metavar="T", help="only records from T on: ISO 8601 time or an age (30m, 2h, 7d)")
    r.add_argument("--dlq-topic", default=None, help="also count this dead-letter topic's records by reason")
    r.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=_cmd_report)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stream-dec`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ExitError as exc:
        print(f"stream-dec {args.command}: error: {exc}", file=sys.stderr)
        return exc.status
    except (ValueError, OSError) as exc:  # bad data, flags, settings or checkpoints; unreadable or unwritable files
        print(f"stream-dec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stream-dec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

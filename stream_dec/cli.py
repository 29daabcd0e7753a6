"""The ``stream-dec`` command line: train, evaluate and inspect models.

The Kafka commands (``run``, ``produce``, ``demo``) belong to the service layer.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _cmd_train(args: argparse.Namespace) -> int:
    from stream_dec import StreamDEC
    from stream_dec.datasets import load_embeddings

    X, _ = load_embeddings(args.data, key=args.key)
    if args.limit:
        X = X[: args.limit]
    params = dict(args.param or [])
    try:
        model = StreamDEC(n_clusters=args.n_clusters, random_state=args.seed, verbose=not args.quiet, **params)
    except TypeError as exc:
        raise ValueError(f"unknown hyper-parameter in --param: {exc}") from None
    model.fit(X)
    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = model.save(ckpt_dir, keep=args.keep)
    print(json.dumps({"checkpoint": str(path), "fit_seconds": round(model.fit_seconds_, 2), **model.summary()}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from stream_dec import StreamDEC
    from stream_dec.datasets import load_embeddings
    from stream_dec.evaluation import score_all

    model = StreamDEC.load(args.checkpoint)
    X, y = load_embeddings(args.data, key=args.key, labels_key=args.labels_key)
    ids = model.predict(X)
    uniq, counts = np.unique(ids, return_counts=True)
    out: dict = {
        "checkpoint": str(model.checkpoint_path_),
        "items": int(len(ids)),
        "clusters_used": int(len(uniq)),
        "largest_cluster_share": round(float(counts.max() / len(ids)), 4),
        "mean_confidence": round(float(model.predict_proba(X).max(1).mean()), 4),
    }
    if y is not None:
        out.update({k: round(v, 4) for k, v in score_all(y, ids).items()})
    else:
        out["note"] = f"no labels array {args.labels_key!r} in the data: only label-free statistics"
    print(json.dumps(out, indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from stream_dec import StreamDEC

    model = StreamDEC.load(args.checkpoint)
    info = {"checkpoint": str(model.checkpoint_path_), **model.summary(), "extra": model.checkpoint_extra_}
    print(json.dumps(info, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``stream-dec`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="stream-dec", description="Streaming Deep Embedded Clustering with stable cluster ids.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit a base model on a .npy/.npz file and write the first checkpoint")
    t.add_argument("--data", required=True, help=".npy array or .npz file with array X")
    t.add_argument("--key", default="X", help="array name inside a .npz (default X)")
    t.add_argument("--n-clusters", type=int, required=True, help="number of clusters to fit")
    t.add_argument("--checkpoint-dir", required=True, help="directory the checkpoint is written to")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep in the directory")
    t.add_argument("--limit", type=int, default=0, help="use only the first N rows")
    t.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="extra StreamDEC hyper-parameter (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="score a checkpoint on a data set (ACC/NMI/ARI when labels are present)")
    e.add_argument("--checkpoint", required=True, help="checkpoint file, or a directory (newest valid one)")
    e.add_argument("--data", required=True, help=".npy or .npz file")
    e.add_argument("--key", default="X", help="array name inside a .npz (default X)")
    e.add_argument("--labels-key", default="y", help="labels array inside a .npz, used only to score (default y)")
    e.set_defaults(func=_cmd_evaluate)

    i = sub.add_parser("inspect", help="print what a checkpoint holds")
    i.add_argument("--checkpoint", required=True, help="checkpoint file, or a directory (newest valid one)")
    i.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stream-dec`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad data, bad parameters, unusable checkpoints
        print(f"stream-dec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Reliability of the published confidence on held-out labels (the class-incremental stream).

For each set and seed: ``StreamDEC`` (default parameters) is fitted on BASE of the
class-incremental split (docs/quality-protocol.md), then every stream batch is labelled
with ``predict_with_confidence`` before the model learns from it, as the service
publishes. An assignment is *right* when its id is the id most of its class's stream
items were published with (a majority mapping: a class that one id took whole is right
there, an item that left its class's id is not). Labels are used only for this score.

The table bins the published confidences (width 0.1) and gives per bin the count, the
mean confidence and the share right; ``ece`` is the count-weighted mean gap between the
two. The Student-t soft-assignment weight of the winner (``predict_proba`` at the
published id, the confidence published before) is scored beside it in the same run.

Example::

    nice -n 10 python bench/run_confidence.py --sets stackoverflow banking77 mnist_test --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:  # imported as part of the namespace package ``bench``
    from .run_quality import DEFAULT_DATA_DIR, DEFAULT_SETS, limit_threads, load_set
except ImportError:  # bench/ itself is on sys.path (python bench/run_confidence.py)
    from run_quality import DEFAULT_DATA_DIR, DEFAULT_SETS, limit_threads, load_set

from stream_dec import StreamDEC  # noqa: E402  (run_quality put this checkout first on sys.path)
from stream_dec.evaluation.protocol import class_incremental_split  # noqa: E402

BINS = np.linspace(0.0, 1.0, 11)
SCORES = ("calibrated", "student_t")


def majority_right(y: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each item's id is the id most items of its class got.

    >>> majority_right(np.array([0, 0, 0, 1, 1]), np.array([5, 5, 6, 5, 5])).tolist()
    [True, True, False, True, True]
    """
    right = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        own = y == c
        vals, counts = np.unique(ids[own], return_counts=True)
        right[own] = ids[own] == vals[counts.argmax()]
    return right


def reliability(conf: np.ndarray, right: np.ndarray) -> dict[str, Any]:
    """Per confidence bin ``[lo, hi)``: count, mean confidence, share right; plus ``ece`` and the overall figures.

    >>> r = reliability(np.array([0.15, 0.95, 0.95]), np.array([False, True, True]))
    >>> [(b["lo"], b["count"], b["accuracy"]) for b in r["bins"]], round(r["ece"], 4)
    ([(0.1, 1, 0.0), (0.9, 2, 1.0)], 0.0833)
    """
    b = np.clip(np.digitize(conf, BINS) - 1, 0, len(BINS) - 2)
    bins = []
    for i in range(len(BINS) - 1):
        m = b == i
        if m.any():
            bins.append({"lo": round(float(BINS[i]), 1), "hi": round(float(BINS[i + 1]), 1), "count": int(np.count_nonzero(m)),
                         "mean_conf": float(conf[m].mean()), "accuracy": float(right[m].mean())})
    ece = sum(x["count"] * abs(x["mean_conf"] - x["accuracy"]) for x in bins) / max(len(conf), 1)
    return {"bins": bins, "ece": float(ece), "n": len(conf), "mean_conf": float(conf.mean()), "accuracy": float(right.mean())}


def run_one(X: np.ndarray, y: np.ndarray, seed: int, T: int = 20) -> dict[str, np.ndarray]:
    """Published (confidence, Student-t weight, id, label) of every stream item of one seed."""
    split = class_incremental_split(y, seed, T)
    model = StreamDEC(n_clusters=len(split.base_classes), random_state=seed, verbose=False).fit(X[split.base])
    out: dict[str, list[np.ndarray]] = {"calibrated": [], "student_t": [], "ids": [], "y": []}
    for batch in split.batches:
        ids, conf = model.predict_with_confidence(X[batch])
        proba = model.predict_proba(X[batch])
        col = np.searchsorted(model.cluster_ids_, ids)
        out["calibrated"].append(conf)
        out["student_t"].append(proba[np.arange(len(ids)), col])
        out["ids"].append(ids)
        out["y"].append(y[batch])
        model.partial_fit(X[batch])
    return {k: np.concatenate(v) for k, v in out.items()}


def format_tables(results: dict[str, Any]) -> str:
    """One reliability table per set (seeds pooled), the calibrated confidence beside the Student-t weight."""
    lines = []
    for name, r in results.items():
        cal, st = r["calibrated"], r["student_t"]
        lines.append(f"{name}: {cal['n']} published assignments, {len(r['seeds'])} seeds, share right {cal['accuracy']:.3f}")
        lines.append(f"  calibrated confidence: mean {cal['mean_conf']:.3f}, ECE {cal['ece']:.3f}"
                     f" | Student-t weight: mean {st['mean_conf']:.3f}, ECE {st['ece']:.3f}")
        lines.append("  confidence   count  mean conf  right")
        for b in cal["bins"]:
            lines.append(f"  [{b['lo']:.1f}, {b['hi']:.1f})  {b['count']:6d}  {b['mean_conf']:9.3f}  {b['accuracy']:5.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sets and seeds, print the tables, write JSON and text."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch threads; 0 = library defaults")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "confidence.json")
    args = p.parse_args(argv)
    if args.threads > 0:
        limit_threads(args.threads)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in args.sets:
        X, y = load_set(args.data_dir, name)
        runs = [run_one(X, y, s) for s in args.seeds]
        # Right or not is judged per seed (each seed is its own model and stream).
        right = np.concatenate([majority_right(r["y"], r["ids"]) for r in runs])
        results[name] = {"seeds": list(args.seeds)}
        for score in SCORES:
            results[name][score] = reliability(np.concatenate([r[score] for r in runs]), right)
        print(format_tables({name: results[name]}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit, "argv": sys.argv[1:],
            "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(format_tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

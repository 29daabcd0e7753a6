"""Cost benchmark: fit time, predict throughput and partial_fit latency on 2 CPU cores.

Side by side in one run (ratios, since these machines are noisy): StreamDEC against
scikit-learn's KMeans.predict and MiniBatchKMeans.partial_fit on the same arrays.
Real data: ``stackoverflow.npz`` (20k x 384); the cluster counts 20/100/200 are set
by ``n_clusters`` at fit. Prints a table and writes JSON.

    python bench/run_cost.py --out bench/results/cost.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    from .run_quality import DEFAULT_DATA_DIR, _jsonable, limit_threads, load_set, write_json
except ImportError:
    from run_quality import DEFAULT_DATA_DIR, _jsonable, limit_threads, load_set, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _throughput(fn, X: np.ndarray, repeats: int = 5) -> float:
    """Best-of-``repeats`` items per second of ``fn(X)``."""
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn(X)
        best = min(best, time.perf_counter() - t)
    return X.shape[0] / best


def bench_k(X: np.ndarray, k: int, batch: int, n_batches: int, seed: int, device: str) -> dict:
    """One cluster count: fit, predict and partial_fit costs of StreamDEC and the sklearn baselines."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from stream_dec import StreamDEC

    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    model = StreamDEC(n_clusters=k, random_state=seed, verbose=False, device=device).fit(X)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(X)
    km_fit_s = time.perf_counter() - t
    mbk = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1).fit(X)

    # Batches are real rows with a little noise, so no batch repeats an earlier one exactly.
    batches = [X[rng.integers(0, len(X), batch)] + rng.normal(0, 0.01, (batch, X.shape[1])).astype(np.float32) for _ in range(n_batches)]
    for b in batches[:3]:  # warm-up
        model.predict(b)
    pf, pf_predict, mbk_pf = [], [], []
    spawned = 0
    for b in batches:
        t = time.perf_counter()
        model.predict(b)
        pf_predict.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        r = model.partial_fit(b)
        pf.append((time.perf_counter() - t) * 1000)
        spawned += len(r.new_cluster_ids)
        t = time.perf_counter()
        mbk.partial_fit(b)
        mbk_pf.append((time.perf_counter() - t) * 1000)
    sd_tp = _throughput(model.predict, X)
    km_tp = _throughput(km.predict, X)
    return {
        "n_clusters": k,
        "n_clusters_end": model.n_clusters_,
        "new_clusters": spawned,
        "fit_s": fit_s,
        "kmeans_fit_s": km_fit_s,
        "predict_items_per_s": sd_tp,
        "kmeans_predict_items_per_s": km_tp,
        "predict_ratio_vs_kmeans": sd_tp / km_tp,
        "partial_fit_ms_p50": _pct(pf, 50),
        "partial_fit_ms_p95": _pct(pf, 95),
        "partial_fit_ms_p99": _pct(pf, 99),
        "partial_fit_ms_max": max(pf),
        "batch_predict_ms_p50": _pct(pf_predict, 50),
        "mbk_partial_fit_ms_p50": _pct(mbk_pf, 50),
        "mbk_partial_fit_ms_p95": _pct(mbk_pf, 95),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--set", default="stackoverflow")
    p.add_argument("--clusters", type=int, nargs="+", default=[20, 100, 200])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--threads", type=int, default=2, help="torch/BLAS threads (the target machine has 2 cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "cost.json")
    args = p.parse_args(argv)
    if args.threads > 0:
        limit_threads(args.threads)
    import torch

    X, _ = load_set(args.data_dir, args.set)
    rows = []
    for k in args.clusters:
        print(f"[cost] {args.set} k={k} ...", file=sys.stderr, flush=True)
        rows.append(bench_k(X, k, args.batch, args.batches, args.seed, args.device))
    head = f"{'k':>4} {'fit s':>7} {'km fit s':>8} {'predict/s':>10} {'x kmeans':>8} {'pf p50':>7} {'pf p95':>7} {'pf p99':>7} {'mbk pf p95':>10} {'K end':>5}"
    print(f"\n== cost: {args.set} {X.shape[0]}x{X.shape[1]}, batch {args.batch}, {args.batches} batches, threads {args.threads}, device {args.device} (ms) ==")
    print(head)
    for r in rows:
        print(
            f"{r['n_clusters']:>4} {r['fit_s']:>7.1f} {r['kmeans_fit_s']:>8.1f} {r['predict_items_per_s']:>10,.0f} "
            f"{r['predict_ratio_vs_kmeans']:>8.2f} {r['partial_fit_ms_p50']:>7.1f} {r['partial_fit_ms_p95']:>7.1f} "
            f"{r['partial_fit_ms_p99']:>7.1f} {r['mbk_partial_fit_ms_p95']:>10.1f} {r['n_clusters_end']:>5}"
        )
    meta = {"set": args.set, "shape": list(X.shape), "batch": args.batch, "batches": args.batches, "threads": args.threads,
            "device": args.device, "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    write_json(args.out, _jsonable({"meta": meta, "rows": rows}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost benchmark: fit time, predict throughput and the full partial_fit latency on 2 CPU cores.

The model is fitted on the items of the base classes only; the stream then mixes base
items with items of the held-out (novel) classes, so every update runs the whole
path: centre step, novelty window, spawn searches, the churn guard. Side by side in one
run (ratios, since these machines are noisy): StreamDEC against scikit-learn's
KMeans.predict and MiniBatchKMeans.partial_fit on the same arrays. Real data:
``stackoverflow.npz`` (20k x 384, 20 classes); the cluster counts 20/100/200 are set by
``n_clusters`` at fit; the update budgets are the defaults (``online_steps`` 5,
``max_update_ms`` 250). Reports p50/p95/p99 of partial_fit, how many updates the
clock cut (``budget_exhausted``) and what spawning and the guard did. Prints a table
and writes JSON and the table next to it (``.txt``).

    python bench/run_cost.py --out bench/results/cost.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
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


def novel_stream(X: np.ndarray, y: np.ndarray, novel: np.ndarray, batch: int, n_batches: int, novel_share: float, seed: int) -> list[np.ndarray]:
    """Batches of real rows (with a little noise, so no batch repeats an earlier one
    exactly): ``novel_share`` of each from the ``novel`` classes, the rest from the others."""
    rng = np.random.default_rng(seed)
    is_novel = np.isin(y, novel)
    base_rows, novel_rows = np.flatnonzero(~is_novel), np.flatnonzero(is_novel)
    n_new = int(round(novel_share * batch))
    out = []
    for _ in range(n_batches):
        rows = np.concatenate([rng.choice(base_rows, batch - n_new), rng.choice(novel_rows, n_new)])
        out.append(X[rng.permutation(rows)] + rng.normal(0, 0.01, (batch, X.shape[1])).astype(np.float32))
    return out


def bench_k(X_fit: np.ndarray, X_all: np.ndarray, batches: list[np.ndarray], k: int, seed: int, device: str) -> dict:
    """One cluster count: fit, predict and partial_fit costs of StreamDEC and the sklearn baselines."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from stream_dec import StreamDEC

    t = time.perf_counter()
    model = StreamDEC(n_clusters=k, random_state=seed, verbose=False, device=device).fit(X_fit)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(X_fit)
    km_fit_s = time.perf_counter() - t
    mbk = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1).fit(X_fit)

    for b in batches[:3]:  # warm-up
        model.predict(b)
    pf, pf_predict, mbk_pf, reports = [], [], [], []
    for b in batches:
        t = time.perf_counter()
        model.predict(b)
        pf_predict.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        reports.append(model.partial_fit(b))
        pf.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        mbk.partial_fit(b)
        mbk_pf.append((time.perf_counter() - t) * 1000)
    sd_tp = _throughput(model.predict, X_all)
    km_tp = _throughput(km.predict, X_all)
    return {
        "n_clusters": k,
        "n_clusters_end": model.n_clusters_,
        "new_clusters": sum(len(r.new_cluster_ids) for r in reports),
        "guard_actions": dict(Counter(r.guard_action for r in reports)),
        "updates_cut": sum(r.budget_exhausted for r in reports),
        "mean_novelty_rate": float(np.mean([r.novelty_rate for r in reports])),
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


def format_table(rows: list[dict], title: str) -> str:
    """The printed table (also written next to the JSON)."""
    head = (f"{'k':>4} {'fit s':>6} {'km fit s':>8} {'predict/s':>10} {'x kmeans':>8} {'pf p50':>7} {'pf p95':>7} {'pf p99':>7} "
            f"{'pf max':>7} {'mbk p95':>7} {'cut':>4} {'new':>4} {'K end':>5}  guard")
    lines = [title, head]
    for r in rows:
        guard = ", ".join(f"{a} {n}" for a, n in sorted(r["guard_actions"].items()))
        lines.append(
            f"{r['n_clusters']:>4} {r['fit_s']:>6.1f} {r['kmeans_fit_s']:>8.1f} {r['predict_items_per_s']:>10,.0f} "
            f"{r['predict_ratio_vs_kmeans']:>8.2f} {r['partial_fit_ms_p50']:>7.1f} {r['partial_fit_ms_p95']:>7.1f} "
            f"{r['partial_fit_ms_p99']:>7.1f} {r['partial_fit_ms_max']:>7.1f} {r['mbk_partial_fit_ms_p95']:>7.1f} "
            f"{r['updates_cut']:>4} {r['new_clusters']:>4} {r['n_clusters_end']:>5}  {guard}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--set", default="stackoverflow")
    p.add_argument("--clusters", type=int, nargs="+", default=[20, 100, 200])
    p.add_argument("--novel-classes", type=int, default=6, help="the classes with the highest labels are held out of the fit")
    p.add_argument("--novel-share", type=float, default=0.3, help="share of every batch drawn from the novel classes")
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

    X, y = load_set(args.data_dir, args.set)
    novel = np.unique(y)[-args.novel_classes :]
    X_fit = X[~np.isin(y, novel)]
    batches = novel_stream(X, y, novel, args.batch, args.batches, args.novel_share, args.seed)
    rows = []
    for k in args.clusters:
        print(f"[cost] {args.set} k={k} ...", file=sys.stderr, flush=True)
        rows.append(bench_k(X_fit, X, batches, k, args.seed, args.device))
    title = (f"== cost: {args.set} {X.shape[0]}x{X.shape[1]}, fit on {len(X_fit)} items of {len(np.unique(y)) - len(novel)} classes, "
             f"stream of {args.batches} batches of {args.batch} with {args.novel_share:.0%} from {len(novel)} novel classes, "
             f"threads {args.threads}, device {args.device} (ms; cut: updates the clock cut; new: clusters spawned) ==")
    table = format_table(rows, title)
    print("\n" + table)
    meta = {"set": args.set, "shape": list(X.shape), "fit_items": int(len(X_fit)), "novel_classes": [int(c) for c in novel],
            "novel_share": args.novel_share, "batch": args.batch, "batches": args.batches, "threads": args.threads,
            "device": args.device, "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    write_json(args.out, _jsonable({"meta": meta, "rows": rows}))
    args.out.with_suffix(".txt").write_text(table + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

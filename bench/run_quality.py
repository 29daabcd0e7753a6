"""Quality benchmark CLI: the stream protocol of docs/quality-protocol.md over the benchmark data sets.

Runs the baselines of ``bench/baselines.py`` and ``stream_dec.StreamDEC`` (plus named
variants) through ``bench/protocol.py``, prints one table per scenario (means over
seeds) and writes per-seed raw results, means and run metadata to JSON.

Example::

    python bench/run_quality.py --sets stackoverflow --seeds 0 --scenario both \\
        --methods frozen_kmeans mbk_all refit_kmeans --out bench/results/quality.json

``--param key=value`` sets StreamDEC keyword arguments (values parsed with
``ast.literal_eval``, else kept as strings). ``--variant NAME:key=val,key=val`` adds a
method ``stream_dec:NAME`` built with ``--param`` overridden by its own settings; variants
always run, whatever ``--methods`` says. Method names: frozen_kmeans, mbk_base (k = base
classes), mbk_all (k = all classes), refit_kmeans (ceiling), oracle_2proto and
oracle_1centre (drift only; they see labels), stream_dec.

``--threads`` (default 1) pins BLAS / OpenMP / torch threads: on small VMs, thread pools
made sklearn fits erratic and several times slower, which would distort the update times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:  # imported as part of the namespace package ``bench``
    from .baselines import FrozenKMeans, MBKMeans, OneCentreOracle, RefitKMeans, TwoPrototypeOracle
    from .coarse import load_coarse
    from .protocol import DRIFT_F, hierarchical_churn, run_class_incremental, run_gradual_drift
except ImportError:  # bench/ itself is on sys.path (python bench/run_quality.py)
    from baselines import FrozenKMeans, MBKMeans, OneCentreOracle, RefitKMeans, TwoPrototypeOracle
    from coarse import load_coarse
    from protocol import DRIFT_F, hierarchical_churn, run_class_incremental, run_gradual_drift

# The protocol module put this checkout first on sys.path: values parse as `stream-dec train --param` reads them.
from stream_dec.cli import parse_value  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_SETS = ("stackoverflow", "banking77", "mnist_test")

CI = "class_incremental"
GD = "gradual_drift"

REFIT = "refit_kmeans"
ORACLE = "oracle_2proto"
STREAM_DEC = "stream_dec"


@dataclass(frozen=True)
class Method:
    """How to build one method's estimator, and the scenarios it takes part in."""

    build: Callable[[int, int, int], Any]  # (n_clusters, seed, n_classes) -> estimator
    scenarios: tuple[str, ...] = (CI, GD)


# In the drift scenario n_clusters is already the number of classes, so k = all classes
# would duplicate mbk_base; a refit's ids are re-drawn each batch, so home-id tracking
# is meaningless for it; the oracles need every class present at fit.
BASELINES: dict[str, Method] = {
    "frozen_kmeans": Method(lambda k, s, n: FrozenKMeans(k, s)),
    "mbk_base": Method(lambda k, s, n: MBKMeans(k, s)),
    "mbk_all": Method(lambda k, s, n: MBKMeans(n, s), (CI,)),
    REFIT: Method(lambda k, s, n: RefitKMeans(n, s), (CI,)),
    ORACLE: Method(lambda k, s, n: TwoPrototypeOracle(k, s), (GD,)),
    "oracle_1centre": Method(lambda k, s, n: OneCentreOracle(k, s), (GD,)),
}

CI_COLUMNS = [
    ("churn", "churn_final", ".3f"),
    ("churn max", "churn_max", ".3f"),
    ("h churn", "h_churn_final", ".3f"),
    ("h max", "h_churn_max", ".3f"),
    ("refined", "h_refined_final", ".3f"),
    ("ACC all", "acc_all", ".3f"),
    ("ACC new", "acc_new", ".3f"),
    ("ACC ref", "acc_ref", ".3f"),
    ("NMI all", "nmi_all", ".3f"),
    ("clusters", "clusters", ".1f"),
    ("all/refit", "acc_all_vs_refit", ".2f"),
    ("new/refit", "acc_new_vs_refit", ".2f"),
    ("pf p50 ms", "pf_ms_p50", ".1f"),
    ("pf p95 ms", "pf_ms_p95", ".1f"),
]
GD_COLUMNS = [
    ("tracking", "tracking", ".3f"),
    ("trk/oracle", "tracking_vs_oracle", ".2f"),
    ("trk/start", "tracking_vs_start", ".2f"),
    ("churn", "churn_final", ".4f"),
    ("churn max", "churn_max", ".4f"),
    ("h churn", "h_churn_final", ".4f"),
    ("ACC ref", "acc_ref", ".3f"),
    ("pf p50 ms", "pf_ms_p50", ".1f"),
    ("pf p95 ms", "pf_ms_p95", ".1f"),
]
COLUMNS = {CI: CI_COLUMNS, GD: GD_COLUMNS}
# (ratio key, numerator key, reference method, reference key) per scenario.
RATIOS = {
    CI: [("acc_all_vs_refit", "acc_all", REFIT, "acc_all"), ("acc_new_vs_refit", "acc_new", REFIT, "acc_new")],
    GD: [("tracking_vs_oracle", "tracking", ORACLE, "tracking")],
}


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:a=1,b=(2, 3)"`` -> ``("NAME", {"a": 1, "b": (2, 3)})``."""
    name, sep, rest = spec.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME:key=val,key=val, got {spec!r}")
    # Split only on commas that start a new key=, so tuple/list values may hold commas.
    items = [s for s in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest) if s.strip()]
    return name.strip(), parse_assignments(items)


def stream_dec_methods(params: dict[str, Any], variants: list[tuple[str, dict[str, Any]]]) -> dict[str, Method]:
    """StreamDEC methods, or none (with a warning) while the estimator does not import."""
    try:
        from stream_dec import StreamDEC
    except Exception as exc:  # the estimator is developed in parallel; keep the baselines usable
        print(f"warning: skipping stream_dec methods, `from stream_dec import StreamDEC` failed: {exc!r}", file=sys.stderr)
        return {}

    def method(p: dict[str, Any]) -> Method:
        return Method(lambda k, s, n: StreamDEC(n_clusters=k, random_state=s, verbose=False, **p))

    out = {STREAM_DEC: method(params)}
    for name, vparams in variants:
        out[f"{STREAM_DEC}:{name}"] = method({**params, **vparams})
    return out


class HierarchyProbe:
    """A model with ``parent_ids_``, seen by the protocol as itself, that also measures hierarchical churn.

    The protocol labels the REF items right after ``fit`` and after every
    ``partial_fit``, always with the same array: the first ``predict`` after ``fit`` is
    the reference, and each later ``predict`` of that array after an update scores its
    hierarchical churn (docs/quality-protocol.md) against it. Every call reaches the
    model unchanged and in the same order, so every other figure is the model's own.
    """

    def __init__(self, model: Any):
        self.model, self.curve, self.refined = model, [], []
        self._ref: np.ndarray | None = None
        self._ids0: np.ndarray | None = None
        self._updated = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def fit(self, X, *args, **kwargs) -> "HierarchyProbe":
        self.model.fit(X, *args, **kwargs)
        return self

    def partial_fit(self, X, *args, **kwargs) -> Any:
        self._updated = True
        return self.model.partial_fit(X, *args, **kwargs)

    def predict(self, X) -> np.ndarray:
        ids = np.asarray(self.model.predict(X))
        if self._ref is None:
            self._ref, self._ids0 = X, ids
        elif X is self._ref and self._updated:
            h = hierarchical_churn(self._ids0, ids, self.model.parent_ids_)
            self.curve.append(h["churn"])
            self.refined.append(h["refined"])
            self._updated = False
        return ids

    def results(self) -> dict[str, float]:
        """``h_churn_final``, ``h_churn_max`` and ``h_refined_final`` over the updates (empty before any)."""
        if not self.curve:
            return {}
        return {"h_churn_final": self.curve[-1], "h_churn_max": float(max(self.curve)), "h_refined_final": self.refined[-1]}


def limit_threads(n: int) -> None:
    """Pin BLAS / OpenMP / torch to ``n`` threads so update times are comparable and stable.

    On small VMs, spinning OpenMP and BLAS pools made sklearn fits several times slower
    and erratic from one call to the next; the environment variables cover libraries that
    load later (e.g. torch imported lazily inside a model).
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def load_set(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """X as float32 and y of one shared data set, or of a coarse subset of it (``SET-cK[sS]``, bench/coarse.py)."""
    X, y, _ = load_coarse(data_dir, name)
    return X, y


def add_ratios(scenario: str, per_method: dict[str, dict[str, Any]]) -> None:
    """Per-seed ratios against the same seed's reference method, where it ran."""
    for key, num, ref_name, ref_key in RATIOS[scenario]:
        ref = per_method.get(ref_name, {}).get(ref_key)
        for r in per_method.values():
            if ref and r.get(num) is not None:
                r[key] = r[num] / ref


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def seed_means(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over the successful seeds of every scalar result."""
    ok = [r for r in runs if "error" not in r]
    keys = [k for k in (ok[0] if ok else {}) if k != "seed"]
    means: dict[str, Any] = {"n_seeds": len(ok), "n_failed": len(runs) - len(ok)}
    for k in keys:
        vals = [r.get(k) for r in ok]
        nums = [float(v) for v in vals if _is_number(v) and not math.isnan(v)]
        if nums and all(v is None or _is_number(v) for v in vals):
            means[k] = float(np.mean(nums))
    return means


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(scenario: str, results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Text table of the seed means: one row per set x method."""
    cols = COLUMNS[scenario]
    header = ["set", "method", "seeds", *[c[0] for c in cols]]
    rows = []
    for set_name, by_method in results.items():
        for name, entry in by_method.items():
            m = entry["mean"]
            seeds = f"{m['n_seeds']}" + (f"(+{m['n_failed']} failed)" if m["n_failed"] else "")
            rows.append([set_name, name, seeds, *[_fmt(m.get(key), spec) for _, key, spec in cols]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[Any]) -> str:
        # Text columns (set, method) left-aligned, numbers right-aligned.
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([f"== {scenario} (means over seeds) ==", line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(args: argparse.Namespace, params: dict[str, Any], variants: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Date, command line, versions and machine facts for the JSON."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit,
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("numpy", "scipy", "scikit-learn", "torch")},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": args.threads,
        "T": args.T,
        "drift_f": args.drift_f,
        "stream_dec_params": params,
        "stream_dec_variants": dict(variants),
    }


def _jsonable(obj: Any) -> Any:
    # Strict JSON: NaN/inf -> null, numpy scalars/arrays and tuples -> plain Python.
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False))
    tmp.replace(path)


def run_one(
    runner: Callable[..., dict[str, Any]],
    method: Method,
    n_classes: int,
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    label: str,
    t_start: float,
) -> dict[str, Any]:
    """One method on one set and seed: its result (or error) plus a progress line on stderr."""
    t0 = time.perf_counter()
    probes: list[HierarchyProbe] = []

    def build(k: int, s: int) -> Any:
        model = method.build(k, s, n_classes)
        if not hasattr(type(model), "parent_ids_"):
            return model
        probes.append(HierarchyProbe(model))
        return probes[-1]

    try:
        r = runner(build, X, y, seed)
        for probe in probes:
            r.update(probe.results())
    except Exception as exc:  # one broken method must not lose the others' results
        traceback.print_exc(file=sys.stderr)
        r = {"error": repr(exc)}
    elapsed = time.perf_counter() - t0
    status = "FAILED" if "error" in r else "ok"
    print(f"[{time.perf_counter() - t_start:7.1f}s] {label}: {elapsed:.1f}s {status}", file=sys.stderr, flush=True)
    return {"seed": seed, **r, "elapsed_s": elapsed}


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="data set names in --data-dir")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--scenario", choices=[CI, GD, "both"], default="both")
    p.add_argument(
        "--methods", nargs="+", default=[*BASELINES, STREAM_DEC], help=f"from: {', '.join([*BASELINES, STREAM_DEC])}"
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "quality.json")
    p.add_argument("--param", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="StreamDEC kwargs")
    p.add_argument(
        "--variant", nargs="+", action="extend", default=[], metavar="NAME:K=V,K=V", help="extra StreamDEC variant"
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--T", type=int, default=20, help="number of stream micro-batches")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch threads; 0 = library defaults")
    p.add_argument("--drift-f", type=float, default=DRIFT_F, help="share of Delta travelled toward the neighbour")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = parse_assignments(args.param)
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as exc:
        parser.error(str(exc))
    unknown = [m for m in args.methods if m not in BASELINES and m != STREAM_DEC]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[*BASELINES, STREAM_DEC]}")

    methods = {m: BASELINES[m] for m in args.methods if m in BASELINES}
    if STREAM_DEC in args.methods or variants:
        sd = stream_dec_methods(params, variants)
        methods.update({k: v for k, v in sd.items() if k != STREAM_DEC or STREAM_DEC in args.methods})
    if args.threads > 0:
        limit_threads(args.threads)
    scenarios = [CI, GD] if args.scenario == "both" else [args.scenario]
    runners = {CI: partial(run_class_incremental, T=args.T), GD: partial(run_gradual_drift, T=args.T, f=args.drift_f)}

    results: dict[str, dict[str, dict[str, Any]]] = {sc: {} for sc in scenarios}
    payload = {"meta": run_metadata(args, params, variants), "results": results}
    t_start = time.perf_counter()
    for set_name in args.sets:
        X, y = load_set(args.data_dir, set_name)
        n_classes = int(len(np.unique(y)))
        for sc in scenarios:
            names = [m for m in methods if sc in methods[m].scenarios]
            by_method = results[sc].setdefault(set_name, {m: {"per_seed": []} for m in names})
            for seed in args.seeds:
                per_method: dict[str, dict[str, Any]] = {}
                for name in names:
                    label = f"{sc} {set_name} seed={seed} {name}"
                    per_method[name] = run_one(runners[sc], methods[name], n_classes, X, y, seed, label, t_start)
                add_ratios(sc, per_method)
                for name, r in per_method.items():
                    by_method[name]["per_seed"].append(r)
            for entry in by_method.values():
                entry["mean"] = seed_means(entry["per_seed"])
        payload["meta"]["elapsed_s"] = time.perf_counter() - t_start
        write_json(args.out, payload)

    for sc in scenarios:
        print(format_table(sc, results[sc]))
        print()
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""StreamDEC on a GPU: a correctness check and the GPU-vs-CPU cost, for a learner run with
``STREAM_DEC_MODEL__DEVICE=cuda`` (deploy/compose.gpu.yml).

``check`` (the default) fits ``StreamDEC(device=...)`` on the base classes of
``stackoverflow.npz`` and runs ``--updates`` partial_fit updates of bench/run_cost.py's
stream (30% of every batch from held-out classes, so updates spawn), then checks what
the learner/predictor split relies on:

- the checkpoint state holds CPU tensors only (checkpoints are device-independent);
- the model saved and loaded on CPU labels every item exactly as the model on the device;
- loaded back onto the device, the same;
- a :class:`~stream_dec.online.snapshot.PredictSnapshot` built from the device model (on
  CPU, as predictors hold it) and the same snapshot bytes read onto the device label
  exactly like the model.

Beside the checks (figures, not pass/fail): the largest confidence difference across
devices, and how closely the same seed trained on CPU agrees with the device run
(float sums differ across devices, so the two trainings are not bitwise equal).

``cost`` runs bench/run_cost.py in this process on the device and then on the CPU with
the same threads and stream, after creating the CUDA context once (its one-off start is
reported apart, not inside the first fit), and writes both tables and the ratios.

    python bench/run_gpu_check.py --device cuda --out bench/results/gpu_check.json
    python bench/run_gpu_check.py cost --device cuda --threads 16 --out bench/results/cost_gpu.json

Each prints a table and writes JSON and the table next to it (``.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from . import run_cost
    from .run_quality import DEFAULT_DATA_DIR, limit_threads, load_set, write_json
except ImportError:
    import run_cost
    from run_quality import DEFAULT_DATA_DIR, limit_threads, load_set, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# (label, run_cost key, True when larger is better): the ratio printed is always "how many
# times better the device is than the CPU".
COST_RATIOS = (
    ("fit", "fit_s", False),
    ("predict/s", "predict_items_per_s", True),
    ("batch predict p50", "batch_predict_ms_p50", False),
    ("pf p50", "partial_fit_ms_p50", False),
    ("pf p95", "partial_fit_ms_p95", False),
    ("pf p99", "partial_fit_ms_p99", False),
)


def environment(device: str) -> dict:
    """Versions, the accelerator and ``nvidia-smi``'s summary (when there is one)."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "numpy": np.__version__, "cpu_count": os.cpu_count(), "device": device}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    try:
        out = subprocess.run(["nvidia-smi"], check=False, capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def warm_device(device: str) -> float:
    """Seconds to create the CUDA context and load the kernels a fit uses (0 on CPU)."""
    import torch

    from stream_dec import StreamDEC

    if not device.startswith("cuda"):
        return 0.0
    t = time.perf_counter()
    torch.zeros(1, device=device)
    rng = np.random.default_rng(0)
    X = rng.normal(0.0, 1.0, (600, 16)).astype(np.float32)
    StreamDEC(n_clusters=3, hidden_dims=(8,), latent_dim=4, pretrain_epochs=1, refine_max_iter=5, n_init=1,
              verbose=False, device=device).fit(X).partial_fit(X[:256])
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _train(X_fit: np.ndarray, batches: list[np.ndarray], k: int, seed: int, device: str):
    """Fit on ``device`` and run every batch through partial_fit; the model, reports and seconds."""
    from stream_dec import StreamDEC

    t = time.perf_counter()
    model = StreamDEC(n_clusters=k, random_state=seed, verbose=False, device=device).fit(X_fit)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    reports = [model.partial_fit(b) for b in batches]
    return model, reports, fit_s, time.perf_counter() - t


def _off_cpu(obj, where: str = "state") -> list[str]:
    """Paths of the tensors in a nested state that are not on the CPU."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [] if obj.device.type == "cpu" else [f"{where} ({obj.device})"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _off_cpu(v, f"{where}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _off_cpu(v, f"{where}[{i}]")]
    return []


def _same(name: str, reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    """One check: labels of ``other`` against the device model's, and the confidence gap."""
    differ = int((reference[0] != other[0]).sum())
    return {"check": name, "passed": differ == 0, "labels_differ": differ,
            "confidence_max_abs_diff": float(np.abs(reference[1] - other[1]).max())}


def run_check(args: argparse.Namespace) -> dict:
    """Fit and update on ``args.device``, then the device-independence checks (module docstring)."""
    from sklearn.metrics import adjusted_rand_score

    from stream_dec import StreamDEC
    from stream_dec.online import persistence
    from stream_dec.online.snapshot import PredictSnapshot

    X, y = load_set(args.data_dir, args.set)
    novel = np.unique(y)[-args.novel_classes :]
    X_fit = X[~np.isin(y, novel)]
    batches = run_cost.novel_stream(X, y, novel, args.batch, args.updates, args.novel_share, args.seed)
    warm_s = warm_device(args.device)
    model, reports, fit_s, update_s = _train(X_fit, batches, args.clusters, args.seed, args.device)
    ref = model.predict_with_confidence(X)
    off_cpu = _off_cpu(persistence.model_state(model, None))
    checks = [{"check": "checkpoint state on CPU only", "passed": not off_cpu, "off_cpu": off_cpu[:10]}]
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(Path(tmp) / "model.sdec")
        checks.append(_same("saved, loaded on cpu", ref, StreamDEC.load(path, device="cpu").predict_with_confidence(X)))
        checks.append(_same(f"saved, loaded on {args.device}", ref, StreamDEC.load(path, device=args.device).predict_with_confidence(X)))
    snap = PredictSnapshot.from_model(model)
    checks.append(_same("PredictSnapshot.from_model (cpu)", ref, snap.predict_with_confidence(X)))
    on_dev = PredictSnapshot.from_bytes(snap.to_bytes(), device=args.device)
    checks.append(_same(f"PredictSnapshot bytes on {args.device}", ref, on_dev.predict_with_confidence(X)))
    checks.append({"check": "snapshot version = model version", "passed": snap.version == model.version_ == on_dev.version})

    cpu_model, cpu_reports, cpu_fit_s, cpu_update_s = _train(X_fit, batches, args.clusters, args.seed, "cpu")
    cpu_labels = cpu_model.predict(X)
    same_seed_cpu = {"fit_s": cpu_fit_s, "updates_s": cpu_update_s, "n_clusters_end": cpu_model.n_clusters_,
                     "labels_equal_share": float((cpu_labels == ref[0]).mean()), "ari_vs_device": float(adjusted_rand_score(ref[0], cpu_labels)),
                     "new_clusters": sum(len(r.new_cluster_ids) for r in cpu_reports)}
    run = {"device_resolved": str(model.device_), "warm_s": warm_s, "fit_s": fit_s, "updates_s": update_s,
           "updates": len(reports), "update_ms_p50": float(np.percentile([r.update_ms for r in reports], 50)),
           "n_clusters_end": model.n_clusters_, "new_clusters": sum(len(r.new_cluster_ids) for r in reports),
           "updates_cut": sum(r.budget_exhausted for r in reports), "model_version": int(model.version_)}
    return {"run": run, "checks": checks, "same_seed_cpu": same_seed_cpu}


def format_check(result: dict, title: str) -> str:
    """The printed table of ``check``."""
    r, c = result["run"], result["same_seed_cpu"]
    lines = [title,
             (f"on {r['device_resolved']}: CUDA start {r['warm_s']:.1f} s, fit {r['fit_s']:.1f} s, {r['updates']} updates {r['updates_s']:.1f} s "
              f"(p50 {r['update_ms_p50']:.1f} ms, cut {r['updates_cut']}), {r['new_clusters']} spawned, K end {r['n_clusters_end']}, version {r['model_version']}"),
             f"{'check':<42} {'result':<6} {'labels differ':>13} {'max |conf diff|':>15}"]
    for ch in result["checks"]:
        differ = ch.get("labels_differ", "")
        conf = f"{ch['confidence_max_abs_diff']:.2e}" if "confidence_max_abs_diff" in ch else ""
        lines.append(f"{ch['check']:<42} {'pass' if ch['passed'] else 'FAIL':<6} {differ:>13} {conf:>15}")
    lines.append(f"same seed trained on cpu (figures, not a check): fit {c['fit_s']:.1f} s, updates {c['updates_s']:.1f} s, "
                 f"labels equal {c['labels_equal_share']:.1%}, ARI vs device {c['ari_vs_device']:.3f}, "
                 f"{c['new_clusters']} spawned, K end {c['n_clusters_end']}")
    return "\n".join(lines)


def run_cost_pair(args: argparse.Namespace, tmp: Path) -> dict:
    """bench/run_cost.py on ``args.device`` and then on the CPU; both payloads and per-k ratios."""
    warm_s = warm_device(args.device)
    common = ["--data-dir", str(args.data_dir), "--set", args.set, "--threads", str(args.threads), "--seed", str(args.seed),
              "--batch", str(args.batch), "--batches", str(args.batches), "--clusters", *map(str, args.clusters)]
    payloads = {}
    for device in (args.device, "cpu"):
        out = tmp / f"cost_{device.replace(':', '_')}.json"
        run_cost.main([*common, "--device", device, "--out", str(out)])
        payloads[device] = json.loads(out.read_text())
    ratios = []
    for dev_row, cpu_row in zip(payloads[args.device]["rows"], payloads["cpu"]["rows"]):
        row = {"n_clusters": dev_row["n_clusters"]}
        for label, key, larger_better in COST_RATIOS:
            d, c = dev_row[key], cpu_row[key]
            row[label] = (d / c if larger_better else c / d) if d and c else None
        ratios.append(row)
    return {"warm_s": warm_s, "device": payloads[args.device], "cpu": payloads["cpu"], "ratios_device_over_cpu": ratios}


def format_cost(result: dict, device: str) -> str:
    """Both run_cost tables and the ratio table."""
    dev, cpu = result["device"], result["cpu"]
    lines = [run_cost.format_table(dev["rows"], f"== {device}: bench/run_cost.py, threads {dev['meta']['threads']} "
                                                f"(CUDA context created before, {result['warm_s']:.1f} s) =="), "",
             run_cost.format_table(cpu["rows"], f"== cpu: bench/run_cost.py, threads {cpu['meta']['threads']} =="), "",
             f"== {device} vs cpu: times better on {device} (cpu time / {device} time; predict/s: {device} / cpu) ==",
             f"{'k':>4} " + " ".join(f"{label:>17}" for label, _, _ in COST_RATIOS)]
    for r in result["ratios_device_over_cpu"]:
        lines.append(f"{r['n_clusters']:>4} " + " ".join(f"{r[label]:>17.2f}" if r[label] else f"{'-':>17}" for label, _, _ in COST_RATIOS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=("check", "cost"), default="check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--set", default="stackoverflow")
    p.add_argument("--clusters", type=int, nargs="+", default=None, help="check: one count (20); cost: run_cost's 20 100 200")
    p.add_argument("--updates", type=int, default=20, help="check: partial_fit updates")
    p.add_argument("--batches", type=int, default=60, help="cost: batches per cluster count")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--novel-classes", type=int, default=6)
    p.add_argument("--novel-share", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=16, help="torch/BLAS threads, the same on both devices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.clusters = args.clusters or ([20] if args.mode == "check" else [20, 100, 200])
    args.out = args.out or REPO_ROOT / "bench" / "results" / ("gpu_check.json" if args.mode == "check" else "cost_gpu.json")
    limit_threads(args.threads)
    env = environment(args.device)
    command = " ".join(["python", *sys.argv])
    if args.mode == "check":
        args.clusters = args.clusters[0]
        result = run_check(args)
        title = (f"== gpu check: {args.set}, k={args.clusters}, {args.updates} updates of {args.batch}, device {args.device}, "
                 f"threads {args.threads}, {env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env['torch_cuda']}) ==")
        table = format_check(result, title)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_cost_pair(args, Path(tmp))
        table = f"{env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env['torch_cuda']}), {env['cpu_count']} CPU cores\n" + format_cost(result, args.device)
    print("\n" + table)
    write_json(args.out, {"meta": {**env, "mode": args.mode, "command": command, "threads": args.threads}, **result})
    args.out.with_suffix(".txt").write_text(table + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    checks = result.get("checks", [])
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

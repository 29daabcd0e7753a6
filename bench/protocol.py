"""The two scenario runners of the stream protocol (docs/quality-protocol.md).

The seeded splits they run on are ``stream_dec.evaluation.protocol`` (shared with
``stream-dec demo``); its docstring says how the protocol's rules are made exact. Pure
functions: nothing here prints or writes files. Labels are used only to build the
splits and to score; models see labels only through an optional ``observe_labels(y)``
method, which only the label-knowing oracles in ``bench/baselines.py`` define.

How the scores are made exact:

* Home ids: Hungarian matching on the contingency of REF labels vs predicted ids right
  after ``fit``; an item whose class has no matched id counts as not tracked.
* Cluster count: distinct ids predicted by the final model over BASE + REF + stream.
* ``n_clusters_model``: ``len(model.cluster_ids_)`` if present, else ``model.n_clusters_``.
* Drift tracking of a model with ``parent_ids_`` is scored on root ids (``model.roots``);
  ``tracking_vs_start`` is the last-5 mean over the tracking after batch 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

# The harness measures the code of this checkout, so its root comes first on the path.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from stream_dec.evaluation import metrics  # noqa: E402
from stream_dec.evaluation.protocol import DRIFT_F, class_incremental_split, gradual_drift_split  # noqa: E402

TRACKING_LAST = 5

ModelFactory = Callable[[int, int], Any]


def match_classes_to_ids(y_true: np.ndarray, ids: np.ndarray) -> dict[Any, Any]:
    """One-to-one Hungarian matching class -> cluster id maximising shared items."""
    classes, t = np.unique(np.asarray(y_true), return_inverse=True)
    uids, p = np.unique(np.asarray(ids), return_inverse=True)
    cont = np.zeros((len(classes), len(uids)), dtype=np.int64)
    np.add.at(cont, (t, p), 1)
    rows, cols = linear_sum_assignment(-cont)
    return {classes[r].item(): uids[c].item() for r, c in zip(rows, cols)}


def _feed_labels(model: Any, y: np.ndarray) -> None:
    # Only oracles define observe_labels; real estimators never see labels.
    if hasattr(model, "observe_labels"):
        model.observe_labels(y)


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _model_cluster_count(model: Any) -> int | None:
    ids = getattr(model, "cluster_ids_", None)
    if ids is not None:
        return int(len(ids))
    n = getattr(model, "n_clusters_", None)
    return None if n is None else int(n)


def _fit(
    make_model: ModelFactory, n_clusters: int, seed: int, X_base: np.ndarray, y_base: np.ndarray, X_ref: np.ndarray
) -> tuple[Any, float, np.ndarray]:
    """Build and fit a model on BASE; return it, the fit time and its REF ids right after fit."""
    model = make_model(n_clusters, seed)
    _feed_labels(model, y_base)
    fit_s = _timed(model.fit, X_base)
    return model, fit_s, np.asarray(model.predict(X_ref))


def _stream(
    model: Any,
    ref_ids0: np.ndarray,
    X_ref: np.ndarray,
    X_batches: list[np.ndarray],
    y_batches: list[np.ndarray],
    on_update: Callable[[Any, int], None] | None = None,
) -> dict[str, Any]:
    """partial_fit batch by batch, recording REF churn and update times."""
    churns, times = [], []
    for t, (Xb, yb) in enumerate(zip(X_batches, y_batches)):
        _feed_labels(model, yb)
        times.append(_timed(model.partial_fit, Xb))
        churns.append(metrics.churn(ref_ids0, np.asarray(model.predict(X_ref))))
        if on_update is not None:
            on_update(model, t)
    ms = 1000.0 * np.asarray(times)
    return {
        "churn_final": churns[-1],
        "churn_max": float(max(churns)),
        "churn_curve": churns,
        "pf_ms_p50": float(np.median(ms)),
        "pf_ms_p95": float(np.percentile(ms, 95)),
        "pf_ms_max": float(ms.max()),
        "n_clusters_model": _model_cluster_count(model),
    }


def _scores(prefix: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {f"{k}_{prefix}": v for k, v in metrics.score_all(y_true, y_pred).items()}


def run_class_incremental(make_model: ModelFactory, X: np.ndarray, y: np.ndarray, seed: int, T: int = 20) -> dict[str, Any]:
    """Run the class-incremental scenario for one model and seed; return its scores."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    split = class_incremental_split(y, seed, T)
    X_ref = X[split.ref]
    model, fit_s, ref_ids0 = _fit(make_model, len(split.base_classes), seed, X[split.base], y[split.base], X_ref)
    stats = _stream(model, ref_ids0, X_ref, [X[b] for b in split.batches], [y[b] for b in split.batches])
    stream = split.stream
    pred_stream = np.asarray(model.predict(X[stream]))
    pred_ref = np.asarray(model.predict(X_ref))
    pred_base = np.asarray(model.predict(X[split.base]))
    novel = np.isin(y[stream], split.novel_classes)
    return {
        "fit_s": fit_s,
        **stats,
        **_scores("all", y[stream], pred_stream),
        **_scores("new", y[stream][novel], pred_stream[novel]),
        **_scores("ref", y[split.ref], pred_ref),
        "clusters": int(len(np.unique(np.concatenate([pred_base, pred_ref, pred_stream])))),
        "n_base_classes": int(len(split.base_classes)),
        "n_novel_classes": int(len(split.novel_classes)),
        "n_base": int(len(split.base)),
        "n_ref": int(len(split.ref)),
        "n_stream": int(len(stream)),
    }


def run_gradual_drift(
    make_model: ModelFactory, X: np.ndarray, y: np.ndarray, seed: int, T: int = 20, f: float = DRIFT_F
) -> dict[str, Any]:
    """Run the gradual-drift scenario for one model and seed; return tracking and churn."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    split = gradual_drift_split(X, y, seed, T, f)
    classes = np.unique(y)
    X_ref, y_ref = X[split.ref], y[split.ref]
    model, fit_s, ref_ids0 = _fit(make_model, len(classes), seed, X[split.base], y[split.base], X_ref)

    home = match_classes_to_ids(y_ref, ref_ids0)
    has_home = np.array([c.item() in home for c in classes])
    # Unmatched classes get a placeholder id; has_home masks them out as not tracked.
    home_ids = np.array([home.get(c.item(), 0) for c in classes], dtype=np.int64)
    tracking: list[float] = []

    def track(m: Any, t: int) -> None:
        pos = np.searchsorted(classes, split.y_batches[t])
        pred = np.asarray(m.predict(split.X_batches[t]))
        if hasattr(m, "parent_ids_"):  # with an id hierarchy, tracking is scored on roots (what a store kept)
            pred = np.asarray(m.roots(pred))
        tracking.append(float(np.mean(has_home[pos] & (home_ids[pos] == pred))))

    stats = _stream(model, ref_ids0, X_ref, split.X_batches, split.y_batches, on_update=track)
    return {
        "fit_s": fit_s,
        **stats,
        "tracking": float(np.mean(tracking[-TRACKING_LAST:])),
        "tracking_curve": tracking,
        "tracking_vs_start": float(np.mean(tracking[-TRACKING_LAST:]) / tracking[0]) if tracking[0] > 0 else None,
        "matched_classes": int(has_home.sum()),
        **_scores("ref", y_ref, np.asarray(model.predict(X_ref))),
        "n_classes": int(len(classes)),
        "n_base": int(len(split.base)),
        "n_ref": int(len(split.ref)),
        "n_stream": int(len(split.stream)),
    }


def _lineage(node: Any, parent_ids: dict[Any, Any]) -> list[Any]:
    """``[node, its parent, ..., its root]`` under ``parent_ids`` (ids absent from it are roots)."""
    chain = [node]
    while parent_ids.get(chain[-1]) is not None:
        chain.append(parent_ids[chain[-1]])
    return chain


def hierarchical_churn(ids_before: np.ndarray, ids_after: np.ndarray, parent_ids: dict[Any, Any]) -> dict[str, float]:
    """Churn of an id hierarchy (docs/quality-protocol.md): refinement into a descendant is not churn.

    ``moved``: share of items whose id changed to anything but a descendant of the old id;
    ``root``: share whose root id changed; ``churn`` is the larger of the two;
    ``refined``: share whose id moved to a strict descendant of the old id.
    With no parents this is plain raw-id churn.

    >>> parents = {0: None, 1: None, 2: 0, 3: 2}
    >>> r = hierarchical_churn(np.array([0, 0, 0, 1, 2, 2]), np.array([0, 2, 3, 1, 0, 1]), parents)
    >>> r["moved"], r["root"], r["churn"], r["refined"]
    (0.3333333333333333, 0.16666666666666666, 0.3333333333333333, 0.3333333333333333)
    """
    before, after = np.asarray(ids_before), np.asarray(ids_after)
    if len(before) == 0:
        return {"churn": 0.0, "moved": 0.0, "root": 0.0, "refined": 0.0}
    pairs, inverse = np.unique(np.stack([before, after]), axis=1, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    moved, root, refined = np.zeros(pairs.shape[1], bool), np.zeros(pairs.shape[1], bool), np.zeros(pairs.shape[1], bool)
    for j, (old, new) in enumerate(pairs.T.tolist()):
        if old == new:
            continue
        up = _lineage(new, parent_ids)
        refined[j] = old in up
        moved[j] = not refined[j]
        root[j] = up[-1] != _lineage(old, parent_ids)[-1]
    out = {k: float(np.mean(v[inverse])) for k, v in (("moved", moved), ("root", root), ("refined", refined))}
    return {"churn": max(out["moved"], out["root"]), **out}

"""Clustering metrics used by the benchmark, the CLI and the tests.

Labels are only ever used here, to score; the model never sees them.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    return y


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unsupervised clustering accuracy with a one-to-one Hungarian matching.

    The contingency matrix may be rectangular (more clusters than classes or the
    reverse); items of a cluster or class left unmatched count as errors.
    """
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    if y_true.size == 0:
        return float("nan")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    cont = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(cont, (p, t), 1)
    rows, cols = linear_sum_assignment(-cont)
    return float(cont[rows, cols].sum() / y_true.size)


def nmi(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean normaliser, as sklearn)."""
    return float(normalized_mutual_info_score(_as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Adjusted Rand index."""
    return float(adjusted_rand_score(_as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")))


def churn(ids_before: np.ndarray, ids_after: np.ndarray) -> float:
    """Share of items whose raw cluster id changed (no re-mapping of ids)."""
    a = _as_labels(ids_before, "ids_before")
    b = _as_labels(ids_after, "ids_after")
    if a.shape != b.shape:
        raise ValueError(f"id arrays differ in length: {len(a)} vs {len(b)}")
    if a.size == 0:
        return 0.0
    return float(np.mean(a != b))


def score_all(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC, NMI and ARI in one dict."""
    return {"acc": cluster_acc(y_true, y_pred), "nmi": nmi(y_true, y_pred), "ari": ari(y_true, y_pred)}

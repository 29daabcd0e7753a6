"""Clustering metrics."""

import numpy as np
import pytest

from stream_dec.evaluation import ari, churn, cluster_acc, nmi


def test_acc_is_permutation_invariant():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_acc(y, np.array([5, 5, 3, 3, 9, 9])) == 1.0


def test_acc_rectangular_counts_unmatched_as_errors():
    y = np.array([0, 0, 0, 1, 1, 1])
    # 3 clusters for 2 classes: the best one-to-one matching covers 2+3 items.
    assert cluster_acc(y, np.array([0, 0, 2, 1, 1, 1])) == pytest.approx(5 / 6)
    # 1 cluster for 2 classes: only one class can be matched.
    assert cluster_acc(y, np.zeros(6, dtype=int)) == pytest.approx(0.5)


def test_nmi_ari_perfect_and_random():
    y = np.repeat(np.arange(4), 50)
    assert nmi(y, y) == pytest.approx(1.0)
    assert ari(y, y) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert abs(ari(y, rng.integers(0, 4, size=len(y)))) < 0.1


def test_churn_counts_raw_id_changes():
    assert churn(np.array([1, 2, 3, 4]), np.array([1, 2, 4, 3])) == 0.5
    with pytest.raises(ValueError):
        churn(np.array([1]), np.array([1, 2]))

"""Reference methods for the stream protocol, with the estimator interface the runners use.

Every class has ``fit(X)``, ``partial_fit(Xb)`` and ``predict(X)`` and is seeded by
``random_state``. The two oracles also have ``observe_labels(y)``: the runners call it
with the labels of the next ``fit`` / ``partial_fit`` input, and only oracles define it,
so only they ever see labels.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import pairwise_distances_argmin

try:  # imported as part of the namespace package ``bench``
    from .protocol import match_classes_to_ids
except ImportError:  # bench/ itself is on sys.path (python bench/run_quality.py)
    from protocol import match_classes_to_ids

N_INIT = 3


class _SklearnClusterer:
    """Common predict / cluster count over a fitted sklearn model in ``self.km_``."""

    def __init__(self, n_clusters: int, random_state: int = 0) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state

    def _kmeans(self) -> KMeans:
        return KMeans(n_clusters=self.n_clusters, n_init=N_INIT, random_state=self.random_state)

    def partial_fit(self, X: np.ndarray) -> "_SklearnClusterer":
        """No update; subclasses that learn online override this."""
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Id of the nearest centre."""
        return self.km_.predict(np.asarray(X, dtype=np.float32)).astype(np.int64)

    @property
    def n_clusters_(self) -> int:
        """Number of centres of the fitted model."""
        return int(len(self.km_.cluster_centers_))


class FrozenKMeans(_SklearnClusterer):
    """k-means fitted once on BASE and never updated (zero churn by construction)."""

    def fit(self, X: np.ndarray) -> "FrozenKMeans":
        """Fit k-means on X."""
        self.km_ = self._kmeans().fit(X)
        return self


class MBKMeans(_SklearnClusterer):
    """MiniBatchKMeans fitted on BASE, then updated with its own ``partial_fit``."""

    def fit(self, X: np.ndarray) -> "MBKMeans":
        """Fit MiniBatchKMeans with k centres on X (k may exceed the classes present)."""
        self.km_ = MiniBatchKMeans(n_clusters=self.n_clusters, n_init=N_INIT, random_state=self.random_state).fit(X)
        return self

    def partial_fit(self, X: np.ndarray) -> "MBKMeans":
        """One MiniBatchKMeans step on the batch."""
        self.km_.partial_fit(X)
        return self


class RefitKMeans(_SklearnClusterer):
    """k-means refitted from scratch on everything seen after every batch.

    The quality ceiling of the protocol; its ids are arbitrary after each refit, so it churns.
    """

    def fit(self, X: np.ndarray) -> "RefitKMeans":
        """Fit k-means on X and remember X."""
        self.seen_ = [np.asarray(X, dtype=np.float32)]
        self.km_ = self._kmeans().fit(self.seen_[0])
        return self

    def partial_fit(self, X: np.ndarray) -> "RefitKMeans":
        """Append the batch and refit on all data seen so far."""
        self.seen_.append(np.asarray(X, dtype=np.float32))
        self.km_ = self._kmeans().fit(np.concatenate(self.seen_))
        return self


class _LabelOracle(_SklearnClusterer):
    """Label-knowing reference: ids from k-means on BASE, prototypes from class means.

    ``fit`` runs k-means (so the ids look like a clusterer's), matches each class to its
    home id by Hungarian on BASE, and starts each id with the BASE mean of its class.
    ``partial_fit`` records each class's mean in the latest batch that contains it.
    """

    def observe_labels(self, y: np.ndarray) -> None:
        """Labels of the next fit / partial_fit input (only oracles get them)."""
        self._y_next = np.asarray(y)

    def fit(self, X: np.ndarray) -> "_LabelOracle":
        """k-means ids, class -> home id matching and BASE class means as old prototypes."""
        X = np.asarray(X, dtype=np.float32)
        y = self._y_next
        self.km_ = self._kmeans().fit(X)
        home = match_classes_to_ids(y, self.km_.labels_)
        self.classes_ = np.array(sorted(home))
        self.home_ids_ = np.array([home[c] for c in self.classes_], dtype=np.int64)
        self.old_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])
        self.current_ = self.old_.copy()
        self.updated_ = np.zeros(len(self.classes_), dtype=bool)
        return self

    def partial_fit(self, X: np.ndarray) -> "_LabelOracle":
        """Set each matched class's current prototype to its mean in this batch."""
        X = np.asarray(X, dtype=np.float32)
        y = self._y_next
        for i, c in enumerate(self.classes_):
            mask = y == c
            if mask.any():
                self.current_[i] = X[mask].mean(axis=0)
                self.updated_[i] = True
        return self

    def _prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Id of the nearest prototype."""
        protos, ids = self._prototypes()
        return ids[pairwise_distances_argmin(np.asarray(X, dtype=np.float32), protos)]

    @property
    def n_clusters_(self) -> int:
        """Number of distinct ids the oracle can give."""
        return int(len(self.home_ids_))


class TwoPrototypeOracle(_LabelOracle):
    """Keeps an old (BASE) and a current (latest batch) prototype per id.

    Shows that following a drifting class need not move the ids of its old items. Its
    current prototypes are means of one batch (about 2-15 items per class on the shared
    sets), so the noisy early ones take a few % of REF (max churn 3-6%) before the drift
    pulls them away; final churn is 0.1-0.3%.
    """

    def _prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        cur = self.updated_
        return (
            np.concatenate([self.old_, self.current_[cur]]),
            np.concatenate([self.home_ids_, self.home_ids_[cur]]),
        )


class OneCentreOracle(_LabelOracle):
    """One centre per id that jumps to its class's current drifted mean (tracks, but churns)."""

    def _prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.current_, self.home_ids_

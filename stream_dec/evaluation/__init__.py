"""Label-free-model scoring: clustering accuracy, NMI, ARI and id churn."""

from stream_dec.evaluation.metrics import ari, churn, cluster_acc, nmi, score_all

__all__ = ["ari", "churn", "cluster_acc", "nmi", "score_all"]

"""Model math of Deep Embedded Clustering: pure torch, no I/O, no Kafka."""

from stream_dec.model.autoencoder import Autoencoder, pretrain_autoencoder
from stream_dec.model.dec import (
    kl_centre_gradient,
    kl_clustering_loss,
    refine_dec,
    soft_assignment,
    squared_distances,
    target_distribution,
)
from stream_dec.model.ewc import ewc_penalty, fisher_diagonal

__all__ = [
    "Autoencoder",
    "ewc_penalty",
    "fisher_diagonal",
    "kl_centre_gradient",
    "kl_clustering_loss",
    "pretrain_autoencoder",
    "refine_dec",
    "soft_assignment",
    "squared_distances",
    "target_distribution",
]

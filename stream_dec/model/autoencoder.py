"""A symmetric MLP autoencoder and its reconstruction pretraining.

The encoder output (the latent) is what the clustering layer sees, and the decoder
reconstructs from exactly that latent: a latent normalised for one and not the other
would pretrain a geometry the clustering never sees.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def _mlp(dims: Sequence[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """MLP autoencoder ``input_dim -> hidden_dims -> latent_dim -> reversed``."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int):
        super().__init__()
        dims = [int(input_dim), *[int(h) for h in hidden_dims], int(latent_dim)]
        self.dims = dims
        self.encoder = _mlp(dims, final_activation=False)
        self.decoder = _mlp(dims[::-1], final_activation=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent codes of ``x``."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(latent, reconstruction)``."""
        z = self.encoder(x)
        return z, self.decoder(z)


def pretrain_autoencoder(
    ae: Autoencoder,
    X: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    noise: float = 0.0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """End-to-end reconstruction pretraining with Adam (MSE), optional input noise.

    Returns the mean loss of every epoch. ``on_epoch(epoch, loss)`` reports progress.
    """
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    n = X.shape[0]
    losses: list[float] = []
    ae.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator, device="cpu").to(X.device)
        total = 0.0
        for start in range(0, n, batch_size):
            xb = X[perm[start : start + batch_size]]
            inp = xb
            if noise > 0:
                inp = xb + noise * torch.randn(xb.shape, generator=generator, device="cpu").to(X.device)
            _, rec = ae(inp)
            loss = torch.mean((rec - xb) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
        losses.append(total / n)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    ae.eval()
    return losses

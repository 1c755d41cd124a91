"""Trainable MLP adapters: frozen-encoder features -> shared space (seed: "simple MLP adapters first")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ACTIVATIONS, Activation


class MLPAdapter(nn.Module):
    """`depth` linear layers (LayerNorm on the input, activation + dropout between layers).

    (B, in_dim) -> (B, out_dim), L2-normalised when `normalize` (the default).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 1024, depth: int = 2,
                 dropout: float = 0.1, activation: Activation = "gelu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < depth - 1:
                layers += [getattr(nn, ACTIVATIONS[activation])(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.net(x)  # (B, out_dim)
        return F.normalize(z, dim=-1) if normalize else z

"""Phase 2's trainable bridge: one aligned image embedding -> k prefix embeddings of the LLM.

ClipCap (Mokady et al. 2021) maps one image embedding to k prefix tokens with an MLP; LLaVA uses a
linear map (v1) or a 2-layer MLP (v1.5). `kind` chooses between the two.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionToLLMProjector(nn.Module):
    """z_vision (B, d_in) -> prefix embeddings (B, k, d_llm)."""

    def __init__(self, d_in: int, d_llm: int, k: int, kind: str = "mlp", hidden: int = 1024):
        super().__init__()
        self.k, self.d_llm = k, d_llm
        if kind == "linear":
            self.net = nn.Linear(d_in, k * d_llm)
        else:
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, k * d_llm))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], self.k, self.d_llm)  # (B, k, d_llm)

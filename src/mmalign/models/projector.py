"""Phase 2's trainable bridge: one aligned image embedding -> k prefix embeddings of the LLM.

ClipCap (Mokady et al. 2021) maps one image embedding to k prefix tokens with an MLP; LLaVA uses a
linear map (v1) or a 2-layer MLP (v1.5). `kind` chooses between the two.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class VisionToLLMProjector(nn.Module):
    """z_vision (B, d_in) -> prefix embeddings (B, k, d_llm).

    nested_dims (the Matryoshka projector): one linear map per dim d < d_in, `nested_in[str(d)]`, from the
    re-normalised prefix z[:, :d] to the input of `net`; initialised as zero padding (identity on the first
    d coordinates, 0 elsewhere).
    """

    def __init__(self, d_in: int, d_llm: int, k: int, kind: str = "mlp", hidden: int = 1024,
                 nested_dims: Sequence[int] = ()):
        super().__init__()
        self.k, self.d_llm = k, d_llm
        if kind == "linear":
            self.net = nn.Linear(d_in, k * d_llm)
        else:
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, k * d_llm))
        self.nested_in = nn.ModuleDict()
        for d in sorted({int(d) for d in nested_dims if d < d_in}):
            lin = nn.Linear(d, d_in)
            with torch.no_grad():
                lin.weight.copy_(torch.eye(d_in, d))
                lin.bias.zero_()
            self.nested_in[str(d)] = lin

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], self.k, self.d_llm)  # (B, k, d_llm)

    def forward_frozen(self, z: torch.Tensor) -> torch.Tensor:
        """forward with `net`'s weights detached: gradients reach z (and what made it), never `net`."""
        weights = {n: p.detach() for n, p in self.net.named_parameters()}
        return torch.func.functional_call(self.net, weights, (z,)).view(z.shape[0], self.k, self.d_llm)

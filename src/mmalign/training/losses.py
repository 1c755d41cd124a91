"""Contrastive losses as pure functions.

CLIP (Radford et al. 2021): symmetric InfoNCE over a batch of paired embeddings.
Matryoshka (Kusupati et al. 2022): the same loss on nested prefixes `z[:, :d]` of the embedding,
each prefix re-normalised, so every prefix is a usable embedding on its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def clip_logits(z_v: torch.Tensor, z_t: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z_v, z_t: (B, D) L2-normalised; logit_scale: scalar (already exp'd). Returns (B, B) logits both ways."""
    logits_per_image = logit_scale * z_v @ z_t.T  # (B, B)
    return logits_per_image, logits_per_image.T


def clip_loss(z_v: torch.Tensor, z_t: torch.Tensor, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE. Row i of z_v and z_t is a positive pair; every other row is a negative.

    Returns {"loss", "i2t", "t2i"}; loss = (i2t + t2i) / 2.
    """
    logits_i, logits_t = clip_logits(z_v, z_t, logit_scale)
    labels = torch.arange(z_v.shape[0], device=z_v.device)
    i2t = F.cross_entropy(logits_i, labels)
    t2i = F.cross_entropy(logits_t, labels)
    return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i}


def matryoshka_prefix(z: torch.Tensor, dim: int) -> torch.Tensor:
    """The Matryoshka embedding of size `dim`: z's first `dim` coordinates, re-normalised. (..., D) -> (..., dim).
    What the MRL loss trains, evaluate scores at each dim, and `mmalign embed --dim` returns."""
    return F.normalize(z[..., :dim], dim=-1)


def matryoshka_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    logit_scale: torch.Tensor,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """CLIP loss on each prefix `z[:, :d]` (re-normalised), averaged with `weights`.

    z_v, z_t: (B, D) un-normalised or normalised; dims ascending, each <= D.
    Returns {"loss", "dim_<d>": loss at d for each d}. With dims=[D] alone it equals `clip_loss`.
    """
    weights = [1.0] * len(dims) if weights is None else list(weights)
    out: dict[str, torch.Tensor] = {}
    total = z_v.new_zeros(())
    for d, w in zip(dims, weights):
        term = clip_loss(matryoshka_prefix(z_v, d), matryoshka_prefix(z_t, d), logit_scale)["loss"]
        out[f"dim_{d}"] = term
        total = total + w * term
    out["loss"] = total / sum(weights)
    return out


def alignment_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    logit_scale: torch.Tensor,
    mrl_dims: Sequence[int],
    mrl_weights: Sequence[float] | None = None,
    clip_weight: float = 1.0,
    mrl_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """clip_weight * CLIP(full dim) + mrl_weight * Matryoshka(mrl_dims). Returns named terms."""
    clip = clip_loss(z_v, z_t, logit_scale)["loss"]
    mrl = matryoshka_loss(z_v, z_t, logit_scale, mrl_dims, mrl_weights)
    terms = {"loss": clip_weight * clip + mrl_weight * mrl["loss"], "clip": clip, "mrl": mrl["loss"]}
    terms.update({k: v for k, v in mrl.items() if k != "loss"})
    return terms

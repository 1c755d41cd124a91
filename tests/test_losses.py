"""CLIP / Matryoshka losses against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.training.losses import alignment_loss, clip_loss, matryoshka_loss

TOL = 1e-5


def _pair(b: int = 6, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g) * 3, torch.randn(b, d, generator=g) * 0.5 + 1


def _normalise_rows(z: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in z.tolist():
        norm = math.sqrt(sum(x * x for x in row))
        rows.append([x / norm for x in row])
    return rows


def _ref_clip(z_v: torch.Tensor, z_t: torch.Tensor, scale: float) -> tuple[float, float, float]:
    """Symmetric InfoNCE with explicit loops and a hand-written log-softmax (inputs re-normalised here)."""
    v, t = _normalise_rows(z_v), _normalise_rows(z_t)
    b = len(v)
    sim = [[scale * sum(a * c for a, c in zip(v[i], t[j])) for j in range(b)] for i in range(b)]

    def nll(row: list[float], target: int) -> float:
        m = max(row)
        log_z = m + math.log(sum(math.exp(x - m) for x in row))
        return -(row[target] - log_z)

    i2t = sum(nll(sim[i], i) for i in range(b)) / b
    t2i = sum(nll([sim[j][i] for j in range(b)], i) for i in range(b)) / b
    return (i2t + t2i) / 2, i2t, t2i


@pytest.mark.parametrize("seed,scale", [(0, 1 / 0.07), (1, 1.0), (2, 50.0)])
def test_clip_loss_matches_loop_reference_both_directions(seed, scale):
    raw_v, raw_t = _pair(b=7, d=12, seed=seed)
    out = clip_loss(F.normalize(raw_v, dim=-1), F.normalize(raw_t, dim=-1), torch.tensor(scale))
    loss, i2t, t2i = _ref_clip(raw_v, raw_t, scale)
    assert float(out["i2t"]) == pytest.approx(i2t, abs=TOL)
    assert float(out["t2i"]) == pytest.approx(t2i, abs=TOL)
    assert float(out["loss"]) == pytest.approx(loss, abs=TOL)
    assert abs(i2t - t2i) > 1e-4  # the two directions really differ, so both were checked


def test_clip_loss_is_symmetric_under_swapping_modalities():
    raw_v, raw_t = _pair(seed=3)
    z_v, z_t = F.normalize(raw_v, dim=-1), F.normalize(raw_t, dim=-1)
    a, b = clip_loss(z_v, z_t, torch.tensor(10.0)), clip_loss(z_t, z_v, torch.tensor(10.0))
    assert float(a["i2t"]) == pytest.approx(float(b["t2i"]), abs=TOL)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=TOL)


def test_matryoshka_with_full_dim_only_equals_clip_loss():
    raw_v, raw_t = _pair(d=16, seed=4)
    z_v, z_t = F.normalize(raw_v, dim=-1), F.normalize(raw_t, dim=-1)
    scale = torch.tensor(1 / 0.07)
    mrl = matryoshka_loss(z_v, z_t, scale, dims=[16])
    assert float(mrl["loss"]) == pytest.approx(float(clip_loss(z_v, z_t, scale)["loss"]), abs=TOL)
    assert set(mrl) == {"loss", "dim_16"}


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5], [0.0, 0.0, 1.0]])
def test_matryoshka_is_weighted_mean_of_prefix_clip_losses(weights):
    raw_v, raw_t = _pair(b=5, d=16, seed=5)
    dims, scale = [4, 8, 16], 20.0
    # Un-normalised inputs: each prefix must be re-normalised by the loss itself.
    mrl = matryoshka_loss(raw_v, raw_t, torch.tensor(scale), dims, weights)
    w = [1.0] * len(dims) if weights is None else weights
    per_dim = [_ref_clip(raw_v[:, :d], raw_t[:, :d], scale)[0] for d in dims]
    expected = sum(wi * li for wi, li in zip(w, per_dim)) / sum(w)
    for d, ref in zip(dims, per_dim):
        assert float(mrl[f"dim_{d}"]) == pytest.approx(ref, abs=TOL)
    assert float(mrl["loss"]) == pytest.approx(expected, abs=TOL)
    assert len(set(round(x, 4) for x in per_dim)) == 3  # prefixes really give different losses


def test_matryoshka_weights_change_the_loss():
    raw_v, raw_t = _pair(seed=6)
    scale = torch.tensor(10.0)
    only_small = matryoshka_loss(raw_v, raw_t, scale, [4, 16], [1.0, 0.0])["loss"]
    only_full = matryoshka_loss(raw_v, raw_t, scale, [4, 16], [0.0, 1.0])["loss"]
    assert float(only_small) == pytest.approx(_ref_clip(raw_v[:, :4], raw_t[:, :4], 10.0)[0], abs=TOL)
    assert float(only_full) == pytest.approx(_ref_clip(raw_v, raw_t, 10.0)[0], abs=TOL)


@pytest.mark.parametrize("clip_w,mrl_w", [(1.0, 1.0), (0.3, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_alignment_loss_combines_clip_and_mrl_with_weights(clip_w, mrl_w):
    raw_v, raw_t = _pair(d=16, seed=7)
    z_v, z_t = F.normalize(raw_v, dim=-1), F.normalize(raw_t, dim=-1)
    scale, dims, mw = 15.0, [4, 8, 16], [1.0, 1.0, 2.0]
    out = alignment_loss(z_v, z_t, torch.tensor(scale), dims, mw, clip_weight=clip_w, mrl_weight=mrl_w)
    clip_ref = _ref_clip(raw_v, raw_t, scale)[0]
    mrl_ref = sum(w * _ref_clip(raw_v[:, :d], raw_t[:, :d], scale)[0] for w, d in zip(mw, dims)) / sum(mw)
    assert float(out["clip"]) == pytest.approx(clip_ref, abs=TOL)
    assert float(out["mrl"]) == pytest.approx(mrl_ref, abs=TOL)
    assert float(out["loss"]) == pytest.approx(clip_w * clip_ref + mrl_w * mrl_ref, abs=TOL)
    assert {"dim_4", "dim_8", "dim_16"} <= set(out)


def test_gradients_flow_to_embeddings_and_logit_scale():
    raw_v, raw_t = _pair(seed=8)
    raw_v.requires_grad_(True)
    raw_t.requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = alignment_loss(F.normalize(raw_v, dim=-1), F.normalize(raw_t, dim=-1), log_scale.exp(), [4, 8, 16])
    out["loss"].backward()
    for g in (raw_v.grad, raw_t.grad, log_scale.grad):
        assert g is not None and torch.isfinite(g).all()
    assert raw_v.grad.abs().sum() > 0 and raw_t.grad.abs().sum() > 0 and log_scale.grad.abs() > 0


def test_perfectly_aligned_batch_with_high_scale_has_near_zero_loss():
    z = F.normalize(torch.eye(8, 16) + 0.01, dim=-1)  # 8 well-separated directions, text == vision
    scale = torch.tensor(100.0)
    assert float(clip_loss(z, z, scale)["loss"]) < 1e-3
    assert float(alignment_loss(z, z, scale, [8, 16])["loss"]) < 1e-3
    # ...and a mismatched pairing of the same embeddings is heavily penalised.
    assert float(clip_loss(z, z.roll(1, 0), scale)["loss"]) > 10

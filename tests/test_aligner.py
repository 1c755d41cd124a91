"""VisionTextAligner: what trains, what stays frozen, checkpoints, and a few training steps."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from mmalign.models.aligner import VisionTextAligner
from mmalign.config import ACTIVATIONS, AlignerConfig, AlignmentConfig, AlignTrainConfig, fields_of
from mmalign.data.dataset import FeaturePairBatches, ImageTextDataset, create_dataloader
from mmalign.models.encoders import FrozenTextEncoder, FrozenVisionEncoder
from mmalign.hub import MINILM_ID
from mmalign.training.losses import alignment_loss
from mmalign.training.train import train_alignment

TRAINABLE_PREFIXES = ("adapters.image.", "text_adapter.", "log_logit_scale")


@pytest.fixture(scope="module")
def encoders(tiny_clip_dir) -> tuple[FrozenVisionEncoder, FrozenTextEncoder]:
    return FrozenVisionEncoder(str(tiny_clip_dir)), FrozenTextEncoder(MINILM_ID)


def _cfg(tiny_clip_dir, **kw) -> AlignmentConfig:
    base = dict(vision_model_name=str(tiny_clip_dir), text_model_name=MINILM_ID, d_align=16, hidden_dim=32,
                mrl_dims=[4, 8, 16], batch_size=4, num_epochs=1)
    return AlignmentConfig(**{**base, **kw})


@pytest.fixture
def model(tiny_clip_dir, encoders) -> VisionTextAligner:
    torch.manual_seed(0)
    return VisionTextAligner(_cfg(tiny_clip_dir), *encoders)


def _feature_model(**kw) -> VisionTextAligner:
    """An aligner that never touches encoders: dims given, as when training from the feature cache."""
    torch.manual_seed(0)
    base = dict(vision_model_name="unused/vision", text_model_name="unused/text", vision_dim=24, text_dim=20,
                d_align=16, hidden_dim=32, mrl_dims=[4, 8, 16], batch_size=16)
    return VisionTextAligner(AlignmentConfig(**{**base, **kw}))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_adapters_and_logit_scale_are_trainable(model, encoders):
    vision, text = encoders
    assert model.cfg.vision_dim == vision.dim == 32 and model.cfg.text_dim == text.dim == 384
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(TRAINABLE_PREFIXES) for n in trainable)
    assert "log_logit_scale" in trainable
    assert any(n.startswith("adapters.image.") for n in trainable)
    assert any(n.startswith("text_adapter.") for n in trainable)
    frozen = [p for enc in encoders for p in enc.parameters()]
    assert len(frozen) > 0 and not any(p.requires_grad for p in frozen)
    # every parameter of the model is either an adapter/scale parameter or a frozen encoder one
    n_encoder = sum(1 for _ in encoders[0].parameters()) + sum(1 for _ in encoders[1].parameters())
    assert len(list(model.parameters())) == len(trainable) + n_encoder


def test_encoders_stay_in_eval_mode_after_model_train(model, encoders):
    model.train()
    assert model.vision_adapter.training and model.text_adapter.training
    for enc in encoders:
        assert not enc.training
        assert not any(m.training for m in enc.modules())
    model.eval()
    assert not model.vision_adapter.training


def test_logit_scale_init_and_clamp(tiny_clip_dir):
    model = _feature_model()
    assert float(model.logit_scale.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(500.0))
    assert float(model.logit_scale.detach()) == pytest.approx(100.0, rel=1e-5)  # the property clamps too
    model.clamp_logit_scale_()
    assert float(model.log_logit_scale.detach().exp()) == pytest.approx(model.cfg.logit_scale_max, rel=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(-3.0)
    model.clamp_logit_scale_()
    assert float(model.logit_scale.detach()) == pytest.approx(1.0)  # lower bound: temperature <= 1


def test_outputs_are_l2_normalised_with_d_align(model, tiny_data):
    model.eval()
    rows = tiny_data["train"][:5]
    z_img = model.encode_images([r["image"] for r in rows])
    z_txt = model.encode_texts([r["captions"][0] for r in rows])
    z_v, z_t = model(torch.randn(5, model.cfg.vision_dim) * 4, torch.randn(5, model.cfg.text_dim))
    for z in (z_img, z_txt, z_v, z_t):
        assert z.shape == (5, 16)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)


def test_save_load_round_trip_keeps_only_trainable_tensors(model, tmp_path):
    model.eval()
    with torch.no_grad():  # move away from the init so the round trip is not trivially equal
        for p in model.vision_adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.log_logit_scale.fill_(math.log(20.0))
    out = tmp_path / "aligner"
    model.save_pretrained(out)
    assert (out / "config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["d_align"] == 16 and cfg["vision_dim"] == 32 and cfg["text_dim"] == 384 and "device" not in cfg
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("_") or "encoder" in k or ".model." in k for k in keys)

    loaded = VisionTextAligner.from_pretrained(out).eval()
    assert len(loaded._encoders) == 0 and loaded._text is None  # the encoders were not loaded
    vf, tf = torch.randn(6, 32), torch.randn(6, 384)
    with torch.no_grad():
        for a, b in zip(model(vf, tf), loaded(vf, tf)):
            assert torch.equal(a, b)
    assert torch.equal(model.logit_scale, loaded.logit_scale)


def test_checkpoint_config_is_the_model_not_its_training(tmp_path):
    """config.json holds the AlignerConfig only; one written before (with the training params) still loads."""
    model = _feature_model(lr=0.5, clip_weight=2.0)
    model.save_pretrained(tmp_path / "new")
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert set(cfg) == set(fields_of(AlignerConfig)) and "lr" not in cfg and "device" not in cfg
    old = tmp_path / "old"
    model.save_pretrained(old)
    (old / "config.json").write_text(json.dumps({**cfg, **dataclasses.asdict(AlignTrainConfig(lr=0.5))}))
    loaded = VisionTextAligner.from_pretrained(old)
    assert type(loaded.cfg) is AlignerConfig and loaded.cfg.d_align == 16
    (old / "config.json").write_text(json.dumps({**cfg, "d_algin": 16}))  # anything else is still refused
    with pytest.raises(ValueError, match=r"unknown key '.*config\.json\.d_algin' \(did you mean 'd_align'\?\)"):
        VisionTextAligner.from_pretrained(old)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_device_is_an_argument_and_every_activation_builds(activation):
    model = VisionTextAligner(AlignerConfig(vision_dim=6, text_dim=5, d_align=8, mrl_dims=[8], activation=activation),
                              device="cpu")
    assert model.log_logit_scale.device.type == "cpu" and not hasattr(model.cfg, "device")
    assert model(torch.randn(2, 6), torch.randn(2, 5))[0].shape == (2, 8)


def test_truncated_checkpoint_raises_naming_the_file(tmp_path):
    model = _feature_model()
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        VisionTextAligner.from_pretrained(out)


def _learnable_features(n: int = 64, seed: int = 0):
    """Vision and text features that are two different linear views of one latent, 2 captions per image."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g)
    vision = latent @ torch.randn(8, 24, generator=g) + 0.05 * torch.randn(n, 24, generator=g)
    text_map = torch.randn(8, 20, generator=g)
    t2i = torch.arange(n).repeat_interleave(2)
    text = latent[t2i] @ text_map + 0.05 * torch.randn(2 * n, 20, generator=g)
    return vision, text, t2i


def _full_loss(model: VisionTextAligner, vision: torch.Tensor, text: torch.Tensor, t2i: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        first = text[::2]  # the first caption of every image
        z_v, z_t = model(vision, first)
        out = alignment_loss(z_v, z_t, model.logit_scale, model.cfg.mrl_dims)["loss"]
    model.train()
    return float(out)


def test_train_alignment_on_cached_features_lowers_the_loss():
    vision, text, t2i = _learnable_features()
    model = _feature_model(lr=1e-2, dropout=0.0, num_epochs=8)
    before = _full_loss(model, vision, text, t2i)
    loader = FeaturePairBatches(vision, text, t2i, batch_size=16, seed=0)
    history = train_alignment(model, loader)
    after = _full_loss(model, vision, text, t2i)
    losses = [s["train/loss"] for s in history["steps"]]
    assert len(losses) == 8 * 4 and all(math.isfinite(x) for x in losses)
    assert after < 0.5 * before
    assert sum(losses[-4:]) < sum(losses[:4])
    assert float(model.logit_scale.detach()) <= model.cfg.logit_scale_max + 1e-4


def test_raw_image_training_step_leaves_encoders_bit_identical(model, encoders, tiny_data):
    vision, text = encoders
    frozen_before = [_snapshot(vision), _snapshot(text)]
    adapter_before = _snapshot(model.vision_adapter)
    text_adapter_before = _snapshot(model.text_adapter)
    loader = create_dataloader(ImageTextDataset(tiny_data["train"][:8]), batch_size=4)
    batch = next(iter(loader))
    assert set(batch) == {"images", "texts"}  # the seed's raw batch layout
    history = train_alignment(model, loader, num_epochs=1, progress=False)
    assert len(history["steps"]) == 2 and all(math.isfinite(s["train/loss"]) for s in history["steps"])
    for enc, before in zip((vision, text), frozen_before):
        after = enc.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert not enc.training
    for module, before in ((model.vision_adapter, adapter_before), (model.text_adapter, text_adapter_before)):
        assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())  # adapters did train

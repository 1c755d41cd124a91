"""The seed's Quick Start (Phase 1), as written in seed.md, on tiny local models; clear model-load errors."""

from __future__ import annotations

import math
import time

import pytest

from mmalign.models.encoders import FrozenVisionEncoder, ModelLoadError

MISSING = "nonexistent-org/nonexistent-model-xyz"


def test_seed_quick_start_phase1(tiny_clip_dir, tiny_data):
    from mmalign import (AlignmentConfig, ImageTextDataset, VisionTextAligner, create_dataloader, get_device,
                         set_seed, train_alignment)

    cfg = AlignmentConfig(
        vision_model_name=str(tiny_clip_dir),
        text_model_name="sentence-transformers/all-MiniLM-L6-v2",
        d_align=32,
        batch_size=4,
        num_epochs=1,
        mrl_dims=[8, 16, 32],
        hidden_dim=32,
    )
    cfg.device = get_device()
    set_seed(cfg.seed)
    model = VisionTextAligner(cfg)

    train_loader = create_dataloader(ImageTextDataset(tiny_data["train"]), batch_size=4)
    history = train_alignment(model, train_loader, num_epochs=1)

    steps = history["steps"]
    assert len(steps) == len(tiny_data["train"]) // 4 == 6
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert all(math.isfinite(s["train/loss"]) and s["train/loss"] > 0 for s in steps)
    assert {"train/clip", "train/mrl", "train/dim_8", "train/dim_16", "train/dim_32"} <= set(steps[0])
    assert len(history["epochs"]) == 1
    z = model.encode_texts(["a red circle"])
    assert z.shape == (1, 32)


def test_unknown_vision_hub_id_fails_fast_with_a_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        FrozenVisionEncoder(MISSING)
    assert time.monotonic() - start < 30
    msg = str(info.value)
    assert MISSING in msg and "vision encoder" in msg
    assert "Fix:" in msg and "HF_HUB_OFFLINE" in msg and "local directory" in msg


def test_missing_local_vision_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-clip"
    missing.mkdir()  # exists but holds no model
    with pytest.raises(ModelLoadError, match="local path") as info:
        FrozenVisionEncoder(str(missing))
    assert str(missing) in str(info.value)

"""The offline default's vision tower: `builtin:tiny-clip`, a randomly initialised CLIP vision model built
locally with the real classes and saved like a hub checkpoint, so it loads through the same path."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TinyCLIPConfig
from ..models.encoders import image_backend
from ..utils import atomic_path


def build_tiny_clip(out_dir: str | Path, cfg: TinyCLIPConfig, image_size: int) -> Path:
    """Build the offline stand-in for a CLIP vision tower: same classes, tiny, deterministic random init."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if image_backend():  # no torchvision: the PIL class directly (the same saved config; no fallback warning)
        from transformers import CLIPImageProcessorPil as processor_cls
    else:
        from transformers import CLIPImageProcessor as processor_cls

    config = CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        image_size=image_size, patch_size=cfg.patch_size, projection_dim=cfg.hidden_size,
    )
    torch.manual_seed(cfg.seed)
    model = CLIPVisionModel(config).eval()
    processor = processor_cls(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir

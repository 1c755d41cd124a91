"""VisionTextAligner: frozen encoders + trainable MLP adapters -> one shared, normalised space."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from ..config import AlignerConfig, AlignTrainConfig, fields_of, from_dict, part
from ..utils import eval_mode, load_checkpoint, save_checkpoint
from .adapters import MLPAdapter
from .encoders import FrozenTextEncoder, FrozenVisionEncoder


class VisionTextAligner(nn.Module):
    """Phase 1 model. Only `vision_adapter`, `text_adapter` and `log_logit_scale` train.

    Encoders load lazily (first use) unless passed in, so training from cached features never
    loads them. `vision_dim`/`text_dim` in the config skip loading them just to learn their size.
    `cfg`: an AlignerConfig, or the seed's AlignmentConfig (its training fields are the trainer's).
    """

    def __init__(self, cfg: AlignerConfig, vision_encoder: FrozenVisionEncoder | None = None,
                 text_encoder: FrozenTextEncoder | None = None, device: str | torch.device | None = None):
        super().__init__()
        if device is None:  # the seed's Quick Start sets `cfg.device = get_device()`: an attribute, not a field
            device = getattr(cfg, "device", "cpu")
        self._vision = vision_encoder
        self._text = text_encoder
        self.cfg = cfg  # the lazy encoder properties below read it
        if cfg.vision_dim is None or cfg.text_dim is None:  # learn the sizes from the encoders
            cfg = dataclasses.replace(cfg, vision_dim=self.vision_encoder.dim, text_dim=self.text_encoder.dim)
        self.cfg = cfg
        kw = dict(hidden_dim=cfg.hidden_dim, depth=cfg.depth, dropout=cfg.dropout, activation=cfg.activation)
        self.vision_adapter = MLPAdapter(cfg.vision_dim, cfg.d_align, **kw)
        self.text_adapter = MLPAdapter(cfg.text_dim, cfg.d_align, **kw)
        # CLIP learns log(1/temperature), initialised at ln(1/0.07) and clamped at ln(100).
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.to(device)

    # -- frozen towers -------------------------------------------------------------------
    @property
    def vision_encoder(self) -> FrozenVisionEncoder:
        if self._vision is None:
            self._vision = FrozenVisionEncoder(self.cfg.vision_model_name, pooling=self.cfg.vision_pooling,
                                               grid=self.cfg.vision_grid).to(self._device())
        return self._vision

    @property
    def text_encoder(self) -> FrozenTextEncoder:
        if self._text is None:
            self._text = FrozenTextEncoder(self.cfg.text_model_name).to(self._device())
        return self._text

    def _device(self) -> torch.device:
        adapter = self.__dict__.get("_modules", {}).get("vision_adapter")
        return next(adapter.parameters()).device if adapter is not None else torch.device("cpu")

    # -- forward -------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=math.log(self.cfg.logit_scale_max)).exp()

    def clamp_logit_scale_(self) -> None:
        """Keep the learnable scale in [0, ln(max)] after each optimiser step, as open_clip does."""
        with torch.no_grad():
            self.log_logit_scale.clamp_(0, math.log(self.cfg.logit_scale_max))

    def forward(self, vision_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features (B, Dv), (B, Dt) -> z_vision, z_text (B, d_align), L2-normalised."""
        return self.vision_adapter(vision_features), self.text_adapter(text_features)

    @torch.no_grad()
    def embed_features(self, vision: torch.Tensor, text: torch.Tensor, batch_size: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached frozen features (N, Dv), (M, Dt) -> z_vision (N, d), z_text (M, d) on the CPU, in eval mode
        (no dropout), in batches; the feature cache's rows as they are (float16 caches are cast)."""
        device = self._device()

        def run(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([adapter(x[i:i + batch_size].to(device, torch.float32)).cpu()
                              for i in range(0, x.shape[0], batch_size)])

        with eval_mode(self):
            return run(self.vision_adapter, vision), run(self.text_adapter, text)

    def encode_images(self, images: Sequence[Image.Image | str | Path] | torch.Tensor) -> torch.Tensor:
        """PIL images, paths or pixel_values (B, 3, H, W) -> z_vision (B, d_align)."""
        if not isinstance(images, torch.Tensor):
            images = self.vision_encoder.preprocess([_open(im) for im in images])
        return self.vision_adapter(self.vision_encoder(images).to(self._device()))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> z_text (B, d_align)."""
        return self.text_adapter(self.text_encoder(texts).to(self._device()))

    # -- checkpoints (trainable weights only) ----------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("_")}

    def save_pretrained(self, directory: str | Path) -> None:
        """model.safetensors + config.json: the AlignerConfig (the model, not how it was trained)."""
        save_checkpoint(directory, self.trainable_state_dict(), dataclasses.asdict(part(self.cfg, AlignerConfig)))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        **overrides) -> "VisionTextAligner":
        tensors, cfg = load_checkpoint(directory)
        stale = set(fields_of(AlignTrainConfig))  # older checkpoints also wrote the training params
        cfg = {k: v for k, v in {**cfg, **overrides}.items() if k not in stale}
        model = cls(from_dict(AlignerConfig, cfg, f"{directory}/config.json"), device=device)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("_")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}")
        return model


def _open(im: Image.Image | str | Path) -> Image.Image:
    return im if isinstance(im, Image.Image) else Image.open(im)

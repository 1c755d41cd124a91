"""VisionTextAligner: frozen encoders + trainable MLP adapters -> one shared, normalised space.

One adapter per modality (`adapters`, keyed by name: image, audio) and one for text; every modality is
trained against text, so all of them land in the text's space (ImageBind's recipe).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from ..config import AlignerConfig, AlignTrainConfig, fields_of, from_dict, part
from ..modalities import modality as spec
from ..utils import eval_mode, load_checkpoint, save_checkpoint
from .adapters import MLPAdapter
from .encoders import FrozenTextEncoder


class VisionTextAligner(nn.Module):
    """Phase 1 model. Only `adapters[*]`, `text_adapter` and `log_logit_scale` train.

    Encoders load lazily (first use) unless passed in, so training from cached features never
    loads them. Feature sizes in the config (`vision_dim`, `encoders[m].dim`, `text_dim`) skip loading
    them just to learn their size. `cfg`: an AlignerConfig, or the seed's AlignmentConfig (its training
    fields are the trainer's). `encoders`: frozen encoders by modality, e.g. {"image": FrozenVisionEncoder}.
    """

    def __init__(self, cfg: AlignerConfig, vision_encoder: Any = None, text_encoder: FrozenTextEncoder | None = None,
                 device: str | torch.device | None = None, encoders: dict[str, Any] | None = None):
        super().__init__()
        if device is None:  # the seed's Quick Start sets `cfg.device = get_device()`: an attribute, not a field
            device = getattr(cfg, "device", "cpu")
        # submodules (so .train()/.to() reach them), kept out of checkpoints by their leading underscore
        self._encoders = nn.ModuleDict({**({"image": vision_encoder} if vision_encoder is not None else {}),
                                        **(encoders or {})})
        self._text = text_encoder
        self.cfg = cfg  # the lazy encoder properties below read it
        dims = {m: cfg.encoder(m).dim or self.encoder(m).dim for m in cfg.modalities}
        text_dim = cfg.text_dim or self.text_encoder.dim
        encoders = {m: dataclasses.replace(e, dim=dims[m]) for m, e in cfg.encoders.items() if m in dims}
        self.cfg = cfg = dataclasses.replace(cfg, vision_dim=dims.get("image", cfg.vision_dim), text_dim=text_dim,
                                             encoders=encoders)
        kw = dict(hidden_dim=cfg.hidden_dim, depth=cfg.depth, dropout=cfg.dropout, activation=cfg.activation)
        self.adapters = nn.ModuleDict({m: MLPAdapter(dims[m], cfg.d_align, **kw) for m in cfg.modalities})
        self.text_adapter = MLPAdapter(text_dim, cfg.d_align, **kw)
        # CLIP learns log(1/temperature), initialised at ln(1/0.07) and clamped at ln(100).
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.to(device)

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.modalities)

    @property
    def vision_adapter(self) -> nn.Module:
        """The image adapter (the seed's name)."""
        return self.adapters["image"]

    # -- frozen towers -------------------------------------------------------------------
    def encoder(self, modality: str) -> Any:
        """The frozen encoder of `modality`, loaded on first use from the config."""
        if modality not in self._encoders:
            e = self.cfg.encoder(modality)
            self._encoders[modality] = spec(modality).encoder_class()(e.model_name, pooling=e.pooling,
                                                                      grid=e.grid).to(self._device())
        return self._encoders[modality]

    @property
    def vision_encoder(self) -> Any:
        return self.encoder("image")

    @property
    def text_encoder(self) -> FrozenTextEncoder:
        if self._text is None:
            self._text = FrozenTextEncoder(self.cfg.text_model_name).to(self._device())
        return self._text

    def _device(self) -> torch.device:
        adapter = self.__dict__.get("_modules", {}).get("text_adapter")
        return next(adapter.parameters()).device if adapter is not None else torch.device("cpu")

    # -- forward -------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=math.log(self.cfg.logit_scale_max)).exp()

    def clamp_logit_scale_(self) -> None:
        """Keep the learnable scale in [0, ln(max)] after each optimiser step, as open_clip does."""
        with torch.no_grad():
            self.log_logit_scale.clamp_(0, math.log(self.cfg.logit_scale_max))

    def forward(self, vision_features: torch.Tensor | None = None, text_features: torch.Tensor | None = None, *,
                pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        """Frozen features -> L2-normalised embeddings (B, d_align).

        forward(vision (B, Dv), text (B, Dt)) -> (z_image, z_text) (the seed's pair); forward(pairs={modality:
        (features, text features)}) -> {modality: (z_modality, z_text)}: every pair of a step in one call (DDP).
        """
        if pairs is None:
            return self.adapters["image"](vision_features), self.text_adapter(text_features)
        return {m: (self.adapters[m](x), self.text_adapter(t)) for m, (x, t) in pairs.items()}

    @torch.no_grad()
    def embed_features(self, items: torch.Tensor, text: torch.Tensor | None = None, batch_size: int = 1024,
                       modality: str = "image") -> Any:
        """Cached frozen features (N, D) of `modality`[, (M, Dt)] -> z (N, d)[, z_text (M, d)] on the CPU, in
        eval mode (no dropout), in batches; the feature cache's rows as they are (float16 caches are cast)."""
        device = self._device()

        def run(adapter: nn.Module, x: Any) -> torch.Tensor:
            return torch.cat([adapter(x[i:i + batch_size].to(device, torch.float32)).cpu()
                              for i in range(0, x.shape[0], batch_size)])

        with eval_mode(self):
            z = run(self.adapters[modality], items)
            return z if text is None else (z, run(self.text_adapter, text))

    def encode(self, modality: str, items: Sequence[Any] | torch.Tensor | dict) -> torch.Tensor:
        """Raw inputs of `modality` (PIL images or paths; audio arrays, files or bytes), or an already
        preprocessed batch -> z (B, d_align)."""
        enc = self.encoder(modality)
        if not isinstance(items, (torch.Tensor, dict)):
            items = enc.preprocess(list(items))
        return self.adapters[modality](enc(items).to(self._device()))

    def encode_images(self, images: Sequence[Image.Image | str | Path] | torch.Tensor) -> torch.Tensor:
        """PIL images, paths or pixel_values (B, 3, H, W) -> z_image (B, d_align)."""
        return self.encode("image", images)

    def encode_audio(self, clips: Sequence[Any]) -> torch.Tensor:
        """Audio clips (float arrays at the encoder's rate, file paths, file bytes) -> z_audio (B, d_align)."""
        return self.encode("audio", clips)

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
                        **overrides: Any) -> "VisionTextAligner":
        tensors, cfg = load_checkpoint(directory)
        stale = set(fields_of(AlignTrainConfig))  # older checkpoints also wrote the training params
        cfg = {k: v for k, v in {**cfg, **overrides}.items() if k not in stale}
        model = cls(from_dict(AlignerConfig, cfg, f"{directory}/config.json"), device=device)
        # checkpoints from before modalities were data named the image adapter `vision_adapter`
        tensors = {("adapters.image." + k[len("vision_adapter."):] if k.startswith("vision_adapter.") else k): v
                   for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("_")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}")
        return model


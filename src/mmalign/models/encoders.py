"""Frozen encoders: a CLIP (or SigLIP) vision tower and a sentence-transformers text model.

Both load through the real Hugging Face paths (`from_pretrained`), so a hub id, a local HF
cache or a local directory all work, the offline default's stand-ins (standins/) included.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from ..config import VISION_POOLINGS, VisionPooling
from ..hub import hub_unreachable, local_files_only, offline_flag, resolve_text_model

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model id or path could not be loaded; the message says how to fix it."""


LOAD_ERRORS = (OSError, ValueError)  # what from_pretrained / SentenceTransformer raise for a bad id or directory
PARAMS = {"vision encoder": "models.vision", "text encoder": "models.text", "LLM": "models.llm"}


def model_load_error(name: str, kind: str, err: Exception) -> ModelLoadError:
    """One message naming the model and the fix, for a load that failed with `err`."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name).expanduser().exists():
        return ModelLoadError(f"cannot load {kind} from local path '{name}': {first}")
    if name.startswith(("/", "./", "../", "~")):
        return ModelLoadError(f"cannot load {kind} '{name}': no such directory. Fix: check the path (relative "
                              "paths start at the repo root), or give a hub id")
    if not hub_unreachable():
        return ModelLoadError(f"cannot load {kind} '{name}' from the Hugging Face Hub: {first}. Fix: check the id, "
                              "and for a gated model log in (`hf auth login`)")
    return ModelLoadError(
        f"cannot load {kind} '{name}': not a local path and not in the Hugging Face cache"
        f"{' (HF_HUB_OFFLINE is set)' if offline_flag() else ' and the hub is unreachable'}. Fix: download it where "
        f"the hub is reachable (`hf download {name}`), point HF_HOME at a cache that has it, or set "
        f"{PARAMS.get(kind, 'the param')} to a local directory.")


def image_backend() -> dict[str, str]:
    """transformers 5 picks the torchvision image backend when torchvision imports and warns, once per
    processor, when it falls back to PIL: without torchvision, ask for PIL (the same processor) directly."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return {}
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build for another torch: the PIL backend
        return {"backend": "pil"}
    return {}


def batched_pixel_values(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor | None:
    """What `processor(images)` returns, with the per-pixel float work done once for the whole batch.

    transformers' PIL backend (used without torchvision) rescales and normalises each image in
    float64 numpy, which costs more than decoding it. Here each image gets the processor's own RGB
    conversion, resize and centre crop (both skipped when the image already has the output size),
    then one uint8 stack is rescaled and normalised in one torch op: equal within 1e-6, ~3x faster.
    None when the processor is not a plain PIL-backend pipeline (the caller then runs it as is).
    """
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # transformers < 5
        return None
    p = processor
    if not isinstance(p, PilBackend) or type(p)._preprocess is not PilBackend._preprocess or getattr(p, "do_pad", None):
        return None
    size, crop = p.size, p.crop_size
    arrays = []
    for im in images:
        x = p.process_image(im, do_convert_rgb=p.do_convert_rgb)  # (C, H, W) uint8
        h, w = x.shape[1:]
        same = (size.shortest_edge and not size.longest_edge and min(h, w) == size.shortest_edge) or (
            not size.shortest_edge and (size.height, size.width) == (h, w))
        if p.do_resize and not same:
            x = p.resize(x, size=size, resample=p.resample)
        if p.do_center_crop and tuple(x.shape[1:]) != (crop.height, crop.width):
            x = p.center_crop(x, crop)
        arrays.append(x)
    if any(a.dtype != np.uint8 or a.shape != arrays[0].shape for a in arrays):
        return None
    batch = torch.from_numpy(np.stack(arrays))  # (B, C, H, W) uint8
    c = batch.shape[1]
    scale = torch.full((1, c, 1, 1), p.rescale_factor if p.do_rescale else 1.0, dtype=torch.float64)
    shift = torch.zeros(1, c, 1, 1, dtype=torch.float64)
    if p.do_normalize:  # (x * s - mean) / std = x * (s / std) - mean / std: one pass over the pixels
        mean = torch.tensor(p.image_mean, dtype=torch.float64).expand(c).view(1, c, 1, 1)
        std = torch.tensor(p.image_std, dtype=torch.float64).expand(c).view(1, c, 1, 1)
        scale, shift = scale / std, -mean / std
    return torch.addcmul(shift.float(), batch.float(), scale.float())


def freeze(module: nn.Module) -> nn.Module:
    """Frozen means frozen: no grads, eval mode (dropout off)."""
    module.requires_grad_(False)
    return module.eval()


VISION_TOWERS = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")


class FrozenVisionEncoder(nn.Module):
    """CLIP (or SigLIP) vision tower -> image feature (B, dim). Never trained.

    pooling: "cls" is CLIP's own pooled output (post-LayerNorm CLS token; SigLIP: its attention-pooling
    head), the usual choice for a pretrained tower; "mean" averages the patch tokens; "grid" average-pools
    the patch tokens onto a `grid` x `grid` map and concatenates the cells (dim = grid^2 * hidden),
    keeping where things are.
    A randomly initialised tower (the offline stand-in) mixes little into its CLS token, so the
    default uses "grid" (README has the measured difference).
    """

    def __init__(self, name: str, trust_remote_code: bool = False, pooling: VisionPooling = "cls", grid: int = 4):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

        if pooling not in VISION_POOLINGS:
            raise ValueError(f"vision pooling={pooling!r}: allowed: {', '.join(VISION_POOLINGS)}")
        self.name, self.pooling, self.grid = name, pooling, grid
        kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only(name)}
        try:
            model_type = AutoConfig.from_pretrained(name, **kw).model_type
            if model_type not in VISION_TOWERS:
                raise ModelLoadError(f"models.vision '{name}' is a '{model_type}' model; supported: CLIP and SigLIP "
                                     "vision towers (model_type " + ", ".join(VISION_TOWERS) + ")")
            cls = SiglipVisionModel if model_type.startswith("siglip") else CLIPVisionModel
            self.model = freeze(cls.from_pretrained(name, use_safetensors=True, **kw))  # never unpickle weights
            self.processor = AutoImageProcessor.from_pretrained(name, **kw, **image_backend())
        except LOAD_ERRORS as e:
            raise model_load_error(name, "vision encoder", e) from None
        self.has_cls = cls is CLIPVisionModel  # SigLIP has no CLS token: every output token is a patch
        hidden = self.model.config.hidden_size
        self.dim: int = hidden * grid * grid if pooling == "grid" else hidden

    def train(self, mode: bool = True) -> "FrozenVisionEncoder":
        return super().train(False)  # stays in eval mode whatever the parent does

    def preprocess(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """PIL images (or paths) -> pixel_values (B, 3, H, W), the values the model's image processor computes."""
        images = [im if isinstance(im, Image.Image) else Image.open(im) for im in images]
        fast = batched_pixel_values(self.processor, images)
        if fast is not None:
            return fast
        return self.processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.no_grad()  # not inference_mode: the seed's design feeds these outputs into trained adapters
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> pooled features (B, dim)."""
        device = next(self.model.parameters()).device
        out = self.model(pixel_values=pixel_values.to(device))
        if self.pooling == "cls":
            return out.pooler_output.float()
        patches = out.last_hidden_state[:, 1:] if self.has_cls else out.last_hidden_state  # (B, T, D), no CLS
        if self.pooling == "mean":
            return patches.mean(1).float()
        B, T, D = patches.shape
        side = int(T ** 0.5)
        fmap = patches.transpose(1, 2).reshape(B, D, side, side)  # (B, D, s, s)
        return F.adaptive_avg_pool2d(fmap, self.grid).flatten(1).float()  # (B, D * g * g)


class FrozenTextEncoder(nn.Module):
    """sentence-transformers model -> sentence embedding (B, dim). Never trained."""

    def __init__(self, name: str, trust_remote_code: bool = False):
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.name = name
        path = resolve_text_model(name)
        try:
            self.model = freeze(SentenceTransformer(path, device="cpu", trust_remote_code=trust_remote_code,
                                                    local_files_only=local_files_only(path),
                                                    model_kwargs={"use_safetensors": True}))
        except LOAD_ERRORS as e:
            raise model_load_error(name, "text encoder", e) from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim: int = get_dim()

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """texts -> embeddings (B, dim) as the model outputs them (MiniLM: L2-normalised)."""
        device = next(self.model.parameters()).device
        emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                show_progress_bar=False, device=str(device))
        # encode() runs in inference_mode; a clone (made under no_grad) is a normal tensor adapters can train on
        return emb.float().clone()

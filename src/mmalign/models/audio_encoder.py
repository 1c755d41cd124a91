"""Frozen audio encoder: the encoder of a Whisper model (or a CLAP audio tower) -> clip feature (B, dim).

Loads through the real Hugging Face path (`from_pretrained`), so `openai/whisper-base`, a local HF
cache or a local directory all work, the offline default's tiny Whisper (standins/tiny_whisper.py,
the same classes and files as a hub Whisper) included.

Whisper encodes a fixed window (30 s for the real models) of zero-padded audio; a 3 s clip would be
90% padding if pooled over every frame. So features pool over the frames that hold audio: encoder
frame i covers hop_length * 2 samples (20 ms at 16 kHz), and a clip of L samples fills
ceil(L / (2 * hop_length)) of them. Trailing exact zeros count as padding (a dataset that pads clips
with digital silence gets the same feature as the unpadded clip): Whisper's feature extractor pads
with zeros itself, so the model sees the same input either way.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..hub import local_files_only
from .encoders import LOAD_ERRORS, ModelLoadError, freeze, model_load_error

log = logging.getLogger(__name__)

POOLINGS = ("mean", "grid", "pooler")
AUDIO_TOWERS = ("whisper", "clap", "clap_audio_model")
KIND = "audio encoder"


def valid_samples(clip: np.ndarray) -> int:
    """Samples up to the last non-zero one (>= 1): trailing exact zeros are padding, not audio."""
    nonzero = np.flatnonzero(clip)
    return int(nonzero[-1]) + 1 if nonzero.size else 1


def pool_frames(hidden: torch.Tensor, n_frames: torch.Tensor, segments: int = 1) -> torch.Tensor:
    """Mean over the first n_frames[b] frames of each clip, in `segments` equal time segments, concatenated.

    hidden (B, T, D), n_frames (B,) long in 1..T -> (B, segments * D). Segment g averages frames
    [floor(g n / G), ceil((g + 1) n / G)): adaptive_avg_pool1d over the valid frames only, so nothing
    past n_frames (padding) changes the result; segments=1 is the plain mean over valid frames.
    """
    B, T, D = hidden.shape
    n = n_frames.to(hidden.device).long().clamp(1, T)[:, None]  # (B, 1)
    g = torch.arange(segments, device=hidden.device)[None, :]  # (1, G)
    start, end = (g * n) // segments, -((-(g + 1) * n) // segments)  # (B, G) each
    t = torch.arange(T, device=hidden.device)  # (T,)
    weights = ((t >= start[..., None]) & (t < end[..., None])).to(hidden.dtype)  # (B, G, T)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bgt,btd->bgd", weights, hidden).flatten(1)  # (B, G * D)


class FrozenAudioEncoder(nn.Module):
    """Whisper encoder (or CLAP audio tower) -> audio feature (B, dim). Never trained.

    pooling (Whisper): "mean" averages the encoder frames that hold audio; "grid" splits those frames
    into `grid` equal time segments, averages each and concatenates them (dim = grid * d_model),
    keeping when things happen (the time analogue of the vision encoder's grid pooling).
    pooling (CLAP): "pooler", the tower's own pooled output over its (repeat-padded) window; only
    unfused CLAP models (e.g. laion/clap-htsat-unfused): the fused ones pick random chunks per call.
    Attributes: dim, sampling_rate (Hz the clips must have), window_seconds (longer clips are cut),
    frame_seconds (Whisper: time per encoder frame).
    """

    def __init__(self, name: str, pooling: str = "mean", grid: int = 4, trust_remote_code: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoFeatureExtractor

        if pooling not in POOLINGS:
            raise ValueError(f"audio pooling={pooling!r}: allowed: {', '.join(POOLINGS)}")
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"audio grid={grid!r}: must be an integer >= 1")
        self.name, self.pooling, self.grid = name, pooling, grid
        kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only(name)}
        try:
            model_type = AutoConfig.from_pretrained(name, **kw).model_type
            if model_type not in AUDIO_TOWERS:
                raise ModelLoadError(f"models.audio '{name}' is a '{model_type}' model; supported: Whisper and "
                                     "CLAP audio towers (model_type " + ", ".join(AUDIO_TOWERS) + ")")
            self.kind = "whisper" if model_type == "whisper" else "clap"
            self.model = freeze(self._load_tower(name, kw))
            self.processor = AutoFeatureExtractor.from_pretrained(name, **kw)
        except LOAD_ERRORS as e:
            raise model_load_error(name, KIND, e) from None
        if (self.kind == "clap") != (pooling == "pooler"):
            raise ValueError(f"audio pooling={pooling!r} does not fit a {self.kind} model: "
                             + ("use pooler" if self.kind == "clap" else "use mean or grid"))
        p = self.processor
        self.sampling_rate: int = p.sampling_rate
        self.window_seconds: float = p.n_samples / p.sampling_rate if self.kind == "whisper" else p.max_length_s
        if self.kind == "whisper":
            c = self.model.config
            self.stride = self.model.conv1.stride[0] * self.model.conv2.stride[0]  # mel frames per encoder frame
            self.frame_seconds = p.hop_length * self.stride / p.sampling_rate  # 0.02 for every real Whisper
            self.dim: int = c.d_model * (grid if pooling == "grid" else 1)
        else:
            self.dim = self.model.config.hidden_size

    def _load_tower(self, name: str, kw: dict) -> nn.Module:
        from transformers import ClapAudioModel, WhisperModel

        if self.kind == "clap":
            model = ClapAudioModel.from_pretrained(name, use_safetensors=True, **kw)
            if model.config.enable_fusion:
                raise ModelLoadError(f"models.audio '{name}' is a fused CLAP model: its inputs are random chunks, "
                                     "so features would differ per run. Use an unfused one (laion/clap-htsat-unfused)")
            return model
        # WhisperModel, not WhisperEncoder: hub checkpoints hold the whole model ("model.encoder.*" keys) and
        # WhisperEncoder.from_pretrained would miss them all and keep its random init
        whisper, info = WhisperModel.from_pretrained(name, use_safetensors=True, output_loading_info=True, **kw)
        missing = sorted(k for k in info["missing_keys"] if k.startswith("encoder."))
        if missing:
            raise ModelLoadError(f"models.audio '{name}': the checkpoint has no weights for {len(missing)} encoder "
                                 f"tensors (e.g. {missing[0]}); it is not a Whisper checkpoint")
        return whisper.get_encoder()

    def train(self, mode: bool = True) -> "FrozenAudioEncoder":
        return super().train(False)  # stays in eval mode whatever the parent does

    def load(self, clips: Sequence[Any]) -> list[np.ndarray]:
        """Clips as arrays (T,) at `sampling_rate` (kept), or anything data.audio.decode_audio reads (file
        bytes, paths, {"bytes", "path"} or {"array", "sampling_rate"} dicts): decoded, mono, resampled."""
        from ..data.audio import decode_audio

        return [c if isinstance(c, np.ndarray) else decode_audio(c, self.sampling_rate, self.window_seconds).samples
                for c in clips]

    def preprocess(self, clips: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Clips (arrays (T,) float at `sampling_rate`, or file bytes / paths: `load`) -> the model's input batch.

        Each clip is cut to the window and its trailing zeros dropped. Whisper: {"input_features":
        (B, n_mels, frames), "n_frames": (B,) encoder frames that hold audio}; CLAP: {"input_features":
        (B, 1, T, n_mels), "is_longer": (B, 1)}.
        """
        window = int(round(self.window_seconds * self.sampling_rate))
        clips = [np.asarray(c, dtype=np.float32)[:window] for c in self.load(clips)]
        clips = [c[:valid_samples(c)] for c in clips]
        if self.kind == "clap":
            out = self.processor(clips, sampling_rate=self.sampling_rate, truncation="rand_trunc",
                                 return_tensors="pt")
            return {"input_features": out["input_features"], "is_longer": out["is_longer"]}
        out = self.processor(clips, sampling_rate=self.sampling_rate, return_tensors="pt")
        hop = self.processor.hop_length * self.stride
        n_frames = torch.tensor([math.ceil(len(c) / hop) for c in clips], dtype=torch.long)  # (B,)
        n_frames = n_frames.clamp(1, self.model.config.max_source_positions)
        return {"input_features": out["input_features"], "n_frames": n_frames}

    @torch.no_grad()  # not inference_mode: the seed's design feeds these outputs into trained adapters
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A `preprocess` batch -> pooled features (B, dim) float32."""
        param = next(self.model.parameters())
        features = batch["input_features"].to(param.device, param.dtype)
        if self.kind == "clap":
            is_longer = batch["is_longer"].to(param.device)
            return self.model(input_features=features, is_longer=is_longer).pooler_output.float()
        hidden = self.model(input_features=features).last_hidden_state  # (B, T, d_model)
        return pool_frames(hidden.float(), batch["n_frames"], self.grid if self.pooling == "grid" else 1)

    def encode(self, clips: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """preprocess + forward in batches: clips -> (N, dim) float32 on CPU."""
        out = [self(self.preprocess(clips[i:i + batch_size])).cpu() for i in range(0, len(clips), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)

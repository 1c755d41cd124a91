"""The offline default's audio tower: a tiny, randomly initialised Whisper built locally with the real
classes and saved like `openai/whisper-base` (config.json + model.safetensors + preprocessor_config.json),
so `FrozenAudioEncoder` loads it through the same path."""

from __future__ import annotations

from pathlib import Path

import torch
from ..utils import atomic_path
from ..config import TinyWhisperConfig


def build_tiny_whisper(out_dir: str | Path, cfg: TinyWhisperConfig | None = None) -> Path:
    """Build the offline stand-in for `openai/whisper-base`: a WhisperModel (tiny, random, deterministic) saved
    with config.json + model.safetensors + preprocessor_config.json, loadable by `FrozenAudioEncoder(out_dir)`.

    The decoder is a one-layer placeholder (only the encoder is used); the checkpoint keeps it so the
    directory has exactly the layout of a hub Whisper.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    cfg = cfg or TinyWhisperConfig()
    extractor = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=cfg.chunk_length)
    config = WhisperConfig(
        d_model=cfg.d_model, encoder_layers=cfg.num_layers, encoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_dim, num_mel_bins=cfg.num_mel_bins,
        max_source_positions=extractor.nb_max_frames // 2,  # conv2 has stride 2: 500 mel frames -> 250 positions
        decoder_layers=1, decoder_attention_heads=cfg.num_heads, decoder_ffn_dim=cfg.d_model,
        vocab_size=8, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        decoder_start_token_id=1, begin_suppress_tokens=None, init_std=cfg.init_std,
    )
    torch.manual_seed(cfg.seed)
    model = WhisperModel(config).eval()
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        extractor.save_pretrained(tmp)
    return out_dir

"""The frozen audio encoder (audio_encoder.py): tiny Whisper build and load, pooling over audio frames, CLAP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.models.audio_encoder import FrozenAudioEncoder, pool_frames, valid_samples
from mmalign.models.encoders import ModelLoadError
from mmalign.standins.tiny_whisper import TinyWhisperConfig, build_tiny_whisper

SR = 16000
TINY = TinyWhisperConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, num_mel_bins=16, chunk_length=2)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("m") / "tiny-whisper", TINY)


@pytest.fixture(scope="module")
def enc(whisper_dir):
    return FrozenAudioEncoder(str(whisper_dir), pooling="mean")


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def test_tiny_whisper_is_a_hub_whisper_directory(whisper_dir):
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor, WhisperModel

    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in whisper_dir.iterdir()}
    config = json.loads((whisper_dir / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["max_source_positions"] == 100  # 2 s / 20 ms
    model, info = WhisperModel.from_pretrained(whisper_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(AutoFeatureExtractor.from_pretrained(whisper_dir), WhisperFeatureExtractor)


def test_tiny_whisper_is_deterministic_from_its_seed(whisper_dir, tmp_path):
    from safetensors.torch import load_file

    again = load_file(build_tiny_whisper(tmp_path / "a", TINY) / "model.safetensors")
    ref = load_file(whisper_dir / "model.safetensors")
    assert again.keys() == ref.keys() and all(torch.equal(again[k], ref[k]) for k in ref)
    other = load_file(build_tiny_whisper(tmp_path / "b", TinyWhisperConfig(**{**vars(TINY), "seed": 1}))
                      / "model.safetensors")
    assert not torch.equal(other["encoder.conv1.weight"], ref["encoder.conv1.weight"])


def test_encoder_is_frozen_with_its_rate_window_and_dim(enc):
    assert not [n for n, p in enc.named_parameters() if p.requires_grad]
    enc.train()
    assert not enc.training and not enc.model.training
    assert (enc.sampling_rate, enc.window_seconds, enc.frame_seconds, enc.dim) == (SR, 2.0, 0.02, 32)
    assert not hasattr(enc.model, "decoder")  # only the encoder is kept


def test_preprocess_counts_the_frames_that_hold_audio(enc):
    batch = enc.preprocess([clip(1.0), clip(0.5), clip(0.013), clip(3.0)])
    assert batch["input_features"].shape == (4, 16, 200)
    assert batch["n_frames"].tolist() == [50, 25, 1, 100]  # 20 ms each; the 3 s clip is cut to the 2 s window


@pytest.mark.parametrize("pooling,grid,dim", [("mean", 4, 32), ("grid", 3, 96), ("grid", 8, 256)])
def test_pooling_shapes(whisper_dir, pooling, grid, dim):
    e = FrozenAudioEncoder(str(whisper_dir), pooling=pooling, grid=grid)
    out = e(e.preprocess([clip(1.0), clip(0.2, 1)]))
    assert e.dim == dim and out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("pooling", ["mean", "grid"])
def test_padding_does_not_change_the_feature(whisper_dir, pooling):
    """The same clip alone, in a batch with a longer one, or padded with digital silence: one feature."""
    e = FrozenAudioEncoder(str(whisper_dir), pooling=pooling, grid=4)
    x = clip(0.7)
    alone = e(e.preprocess([x]))[0]
    in_batch = e(e.preprocess([clip(1.9, 1), x]))[1]
    padded = e(e.preprocess([np.concatenate([x, np.zeros(SR // 2, np.float32)])]))[0]
    assert torch.equal(alone, padded)  # the model sees the same input and pools the same frames
    assert torch.allclose(alone, in_batch, atol=1e-5)  # batch size changes BLAS summation order only
    longer = e(e.preprocess([np.concatenate([x, clip(0.5, 2)])]))[0]
    assert not torch.allclose(alone, longer)  # real audio after it does count


def test_clips_longer_than_the_window_are_cut(enc):
    x = clip(3.0)
    assert torch.equal(enc(enc.preprocess([x])), enc(enc.preprocess([x[:2 * SR]])))


def test_pool_frames_ignores_everything_past_the_valid_frames():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 5, generator=g)
    n = torch.tensor([20, 7, 2])
    garbage = hidden.clone()
    garbage[1, 7:] = 1e6
    garbage[2, 2:] = -3.0
    for segments in (1, 3, 4):
        out = pool_frames(hidden, n, segments)
        assert out.shape == (3, segments * 5) and torch.allclose(out, pool_frames(garbage, n, segments))
        for b in range(3):  # = adaptive average pooling over the valid frames
            want = F.adaptive_avg_pool1d(hidden[b, :n[b]].T[None], segments)[0].T.flatten()
            assert torch.allclose(out[b], want, atol=1e-6)
    assert torch.allclose(pool_frames(hidden, n, 1)[1], hidden[1, :7].mean(0), atol=1e-6)


def test_valid_samples_drops_trailing_zeros_only():
    assert valid_samples(np.array([0.0, 1.0, 0.0, 2.0, 0.0, 0.0])) == 4
    assert valid_samples(np.zeros(5)) == 1


def test_bad_settings_and_models_fail_with_one_clear_error(whisper_dir, tmp_path):
    with pytest.raises(ValueError, match="allowed: mean, grid, pooler"):
        FrozenAudioEncoder(str(whisper_dir), pooling="cls")
    with pytest.raises(ValueError, match="use mean or grid"):
        FrozenAudioEncoder(str(whisper_dir), pooling="pooler")
    with pytest.raises(ModelLoadError, match="no such directory"):
        FrozenAudioEncoder("./no/such/whisper")
    with pytest.raises(ModelLoadError, match="openai/whisper-base.*hf download"):
        FrozenAudioEncoder("openai/whisper-base")  # tests run with HF_HUB_OFFLINE=1
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
              ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="'bert' model; supported: Whisper and CLAP"):
        FrozenAudioEncoder(str(tmp_path / "bert"))


def test_a_checkpoint_without_encoder_weights_is_refused(whisper_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(whisper_dir, broken)
    weights = {k: v for k, v in load_file(broken / "model.safetensors").items() if not k.startswith("encoder.layers")}
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="no weights for .* encoder tensors"):
        FrozenAudioEncoder(str(broken))


def _tiny_clap(out_dir, fusion: bool = False):
    from transformers import ClapAudioConfig, ClapAudioModel, ClapFeatureExtractor

    torch.manual_seed(0)
    ClapAudioModel(ClapAudioConfig(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_hidden_layers=2,
                                   num_attention_heads=[2, 2], projection_dim=16, enable_fusion=fusion)
                   ).save_pretrained(out_dir)
    ClapFeatureExtractor(truncation="rand_trunc", max_length_s=2).save_pretrained(out_dir)
    return str(out_dir)


def test_clap_audio_tower(tmp_path):
    e = FrozenAudioEncoder(_tiny_clap(tmp_path / "clap"), pooling="pooler")
    assert (e.sampling_rate, e.window_seconds, e.dim) == (48000, 2, 32)
    x = (np.random.default_rng(0).standard_normal(48000) * 0.1).astype(np.float32)
    a = e(e.preprocess([x]))
    assert a.shape == (1, 32) and torch.equal(a, e(e.preprocess([np.concatenate([x, np.zeros(9000, np.float32)])])))
    with pytest.raises(ValueError, match="use pooler"):
        FrozenAudioEncoder(str(tmp_path / "clap"), pooling="mean")
    with pytest.raises(ModelLoadError, match="fused CLAP"):
        FrozenAudioEncoder(_tiny_clap(tmp_path / "fused", fusion=True), pooling="pooler")

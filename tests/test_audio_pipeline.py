"""Audio through the pipeline: the feature cache, the aligner's audio adapter, the stages with audio on and off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, TINY_PARAMS, TINY_WHISPER, deep_update, run_stages
from mmalign.config import PrepareConfig, TinyWhisperConfig, from_dict
from mmalign.data.features import build_feature_cache, load_features
from mmalign.models.audio_encoder import FrozenAudioEncoder
from mmalign.models.encoders import FrozenTextEncoder
from mmalign.pipeline.prepare import synthetic_audio_dataset
from mmalign.standins.tiny_whisper import build_tiny_whisper


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> FrozenAudioEncoder:
    path = build_tiny_whisper(tmp_path_factory.mktemp("w") / "tiny-whisper", TinyWhisperConfig(**TINY_WHISPER))
    return FrozenAudioEncoder(str(path), pooling="grid", grid=2)


@pytest.fixture(scope="module")
def audio_dataset():
    cfg = from_dict(PrepareConfig, {"audio": {"n_train": 7, "n_val": 3, "n_test": 2, "captions_per_clip": 3}})
    return synthetic_audio_dataset(cfg)


def test_cached_audio_features_equal_a_direct_encoder_forward(tmp_path, whisper, audio_dataset):
    text = FrozenTextEncoder("sentence-transformers/all-MiniLM-L6-v2")
    fp = build_feature_cache(audio_dataset, whisper, text, tmp_path / "cache", batch_size=3, modality="audio")
    assert fp["modality"] == "audio" and fp["dim"] == whisper.dim == 32 * 2 and fp["pooling"] == "grid"
    for name, split in audio_dataset.items():
        feats = load_features(tmp_path / "cache", name)
        direct = whisper(whisper.preprocess(split["audio"]))  # the stored FLAC bytes, decoded, one batch
        assert feats.items.shape == (len(split), whisper.dim) and fp["files"][name]["items"] == len(split)
        torch.testing.assert_close(feats.items, direct, atol=1e-5, rtol=0)
        assert feats.text_to_item.tolist() == [i for i in range(len(split)) for _ in range(3)]


def test_synthetic_audio_dataset_stores_flac_clips_at_16khz(audio_dataset):
    import io

    import soundfile as sf

    row = audio_dataset["train"][0]
    samples, sr = sf.read(io.BytesIO(row["audio"]), dtype="float32")
    assert sr == 16000 and samples.ndim == 1 and 2.0 <= len(samples) / sr <= 5.0
    assert len(row["captions"]) == 3 and json.loads(row["events"])


def test_aligner_encodes_raw_audio_like_cached_features(tmp_path, whisper, audio_dataset):
    from mmalign.config import AlignerConfig, EncoderSpec
    from mmalign.models.aligner import VisionTextAligner

    cfg = AlignerConfig(modalities=["audio"], encoders={"audio": EncoderSpec(whisper.name, whisper.dim, "grid", 2)},
                        text_dim=384, d_align=16, hidden_dim=32, mrl_dims=[8, 16])
    model = VisionTextAligner(cfg, encoders={"audio": whisper}).eval()
    clips = audio_dataset["test"]["audio"]
    with torch.no_grad():
        z = model.encode_audio(clips)
        direct = model.adapters["audio"](whisper(whisper.preprocess(clips)))
    torch.testing.assert_close(z, direct)
    model.save_pretrained(tmp_path / "aligner")
    loaded = VisionTextAligner.from_pretrained(tmp_path / "aligner")
    assert loaded.modalities == ["audio"] and loaded.cfg.encoder("audio").model_name == whisper.name
    with torch.no_grad():  # the encoder loads lazily from the checkpoint's config (pooling and grid included)
        torch.testing.assert_close(loaded.eval().encode_audio(clips), z)


def _params(tmp_path: Path, **extra) -> Path:
    params = deep_update(deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS), extra)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.slow
def test_four_stages_carry_audio(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_stages(_params(tmp_path, project={"zero_shot_check": True}))
    top = json.loads(Path("eval/metrics.json").read_text())
    assert list(top) == ["i2t_R1", "t2i_R1", "chance_i2t_R1", "chance_t2i_R1", "CIDEr", "blind_CIDEr", "distinct",
                         "a2t_R1", "t2a_R1", "chance_a2t_R1", "chance_t2a_R1", "t2a_mAP10", "audio_CIDEr",
                         "audio_blind_CIDEr", "audio_distinct", "audio_zeroshot_CIDEr"]  # 16: dvc exp show stays narrow
    # the zero-shot check: a projector trained on the image captions alone, fed the audio test clips
    assert Path("models/projector/image_only/model.safetensors").exists()
    assert top["chance_t2a_R1"] == pytest.approx(1 / 8)
    every = json.loads(Path("eval/metrics_all.json").read_text())
    ret = every["audio"]["retrieval"]
    assert set(ret["a2t"]) == {"R1", "R5", "R10", "mean_rank", "median_rank", "mAP10"}
    assert set(ret["by_dim"]) == {"8", "16", "32"} and set(ret["chance"]) == {"a2t", "t2a"}
    assert {"trained", "blind", "by_dim", "zero_shot"} <= set(every["audio"]["captioning"])
    assert "zero_shot" not in every["image"]["captioning"]
    for f in ("plots/audio_r1_by_dim.csv", "plots/audio_cider_by_dim.csv", "examples/audio_captions.csv",
              "examples/audio_gallery.png", "plots/r1_by_dim.csv", "examples/gallery.png"):
        assert (Path("eval") / f).exists(), f
    report = json.loads(Path("data/audio/prepare_report.json").read_text())
    assert report["modality"] == "audio" and report["splits"]["test"] == {"items": 8, "captions": 24}
    from mmalign.models.aligner import VisionTextAligner

    assert VisionTextAligner.from_pretrained("models/aligner").modalities == ["image", "audio"]


@pytest.mark.slow
def test_audio_off_runs_the_image_pipeline_alone(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_stages(_params(tmp_path, modalities={"audio": False}))
    assert json.loads(Path("data/audio/prepare_report.json").read_text()) == {"modality": "audio", "enabled": False}
    assert json.loads(Path("data/audio/features/fingerprint.json").read_text())["enabled"] is False
    top = json.loads(Path("eval/metrics.json").read_text())
    assert list(top) == ["i2t_R1", "t2i_R1", "chance_i2t_R1", "chance_t2i_R1", "CIDEr", "blind_CIDEr", "distinct"]
    assert not list(Path("eval").rglob("audio_*"))
    from mmalign.models.aligner import VisionTextAligner

    assert VisionTextAligner.from_pretrained("models/aligner").modalities == ["image"]


def test_a_cache_prepared_with_audio_off_is_refused_with_the_fix(tmp_path):
    from mmalign.config import AlignmentConfig
    from mmalign.pipeline.align import encoders_config

    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "fingerprint.json").write_text(json.dumps({"modality": "audio", "enabled": False}))
    with pytest.raises(ValueError, match=r"holds no audio features \(modalities.audio was off.*dvc repro"):
        encoders_config(AlignmentConfig(), {"audio": tmp_path / "audio"}, ["audio"])


def test_a_stage_without_the_dir_of_an_enabled_modality_says_which(tmp_path):
    from mmalign.params import enabled_dirs, modality_dirs

    (tmp_path / "f").mkdir()
    dirs = modality_dirs([f"image={tmp_path / 'f'}"])
    with pytest.raises(ValueError, match=r"modalities.audio is on but no features directory.*--features audio=DIR"):
        enabled_dirs({}, dirs, "features")
    assert enabled_dirs({"modalities": {"audio": False}}, dirs, "features") == {"image": tmp_path / "f"}
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        modality_dirs([f"video={tmp_path}"])


def test_spectrogram_thumbnail_is_an_rgb_image():
    from mmalign.plots import spectrogram

    t = np.arange(16000) / 16000
    img = spectrogram(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 16000)
    assert img.dtype == np.uint8 and img.shape[0] == 96 and img.shape[2] == 3 and img.shape[1] > 90
    # the 1 kHz tone is the brightest row, 1/8 of the way up from the bottom (0 Hz .. 8 kHz)
    brightest = int(img.astype(float).sum((1, 2)).argmax())
    assert abs((95 - brightest) / 95 - 1 / 8) < 0.03


def _clips(tmp_path: Path, n: int) -> list[tuple[str, list[str]]]:
    """n WAV files (the synthetic generator's sound scenes) in tmp_path/clips, with their captions."""
    import soundfile as sf

    from mmalign.data.synthetic_audio import generate_synthetic_audio

    rows = generate_synthetic_audio(1, n, 0, 0, captions_per_clip=3, max_events=2)["train"]
    (tmp_path / "clips").mkdir()
    for r in rows:
        sf.write(tmp_path / "clips" / f"{r['id']}.wav", r["audio"], r["sampling_rate"])
    return [(f"{r['id']}.wav", r["captions"]) for r in rows]


AUDIO_ONLY = {"modalities": {"image": False, "audio": True}}


@pytest.mark.parametrize("source", ["audiofolder", "hf"])
def test_prepare_reads_an_audiofolder_and_an_hf_dataset_with_an_audio_column(source, tmp_path, mlflow_uri,
                                                                              monkeypatch):
    import datasets

    clips = _clips(tmp_path, 12)
    if source == "audiofolder":
        with open(tmp_path / "clips" / "metadata.jsonl", "w") as f:
            for name, caps in clips:
                f.write(json.dumps({"file_name": name, "text": caps}) + "\n")
        audio = {"source": "audiofolder", "audiofolder": {"path": str(tmp_path / "clips")}}
    else:  # Clotho's layout: one row per clip, captions in columns caption_1..caption_3
        ds = datasets.Dataset.from_dict({"audio": [str(tmp_path / "clips" / n) for n, _ in clips],
                                         **{f"caption_{i + 1}": [c[i] for _, c in clips] for i in range(3)}})
        ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "hf"))
        audio = {"source": "hf", "hf": {"path": str(tmp_path / "hf"),
                                        "caption_column": ["caption_1", "caption_2", "caption_3"]}}
    params = _params(tmp_path, **AUDIO_ONLY, prepare={"audio": {**audio, "split_ratios": [0.5, 0.25, 0.25]}})
    monkeypatch.chdir(tmp_path)
    run_stages(params, "prepare_audio")
    report = json.loads(Path("data/audio/prepare_report.json").read_text())
    assert report["source"] == source and report["truncated"] == 12  # 2-5 s clips, the tiny window is 2 s
    assert {k: v["items"] for k, v in report["splits"].items()} == {"train": 6, "val": 3, "test": 3}
    assert sum(v["captions"] for v in report["splits"].values()) == 36
    feats = load_features("data/audio/features", "train")
    assert feats.items.shape == (6, 32 * 4) and feats.text.shape == (18, 384)
    test = datasets.load_from_disk("data/audio/dataset")["test"]
    assert test.column_names[:3] == ["id", "audio", "captions"] and isinstance(test[0]["audio"], bytes)

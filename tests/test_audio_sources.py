"""User audio sources (data/audio_sources.py): audio folders and `datasets` datasets (save_to_disk with an
Audio column, Clotho caption columns, AudioCaps rows per caption, parquet) -> id, FLAC bytes, captions;
mono at the encoder's rate, long clips cut and counted, bad samples stop with one line or are counted."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import soundfile as sf

from mmalign.config import AudioPrepareConfig, from_dict
from mmalign.data import audio_sources
from mmalign.data.audio_sources import load_audio_source

SR = 16000
MAX_SECONDS = 1.0


def tone(i: int, seconds: float = 0.25, sr: int = SR, channels: int = 1) -> np.ndarray:
    """A tone whose pitch is unique to i: (T,) or (T, C)."""
    x = 0.5 * np.sin(2 * np.pi * (200.0 + 50 * i) * np.arange(int(seconds * sr)) / sr)
    return np.stack([x, 0.5 * x], 1) if channels == 2 else x


def write_clip(path: Path, i: int, **kw: Any) -> str:
    """An audio file, its format from the suffix (wav, flac, ogg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sr = kw.pop("sr", SR)
    sf.write(path, tone(i, sr=sr, **kw), sr)
    return str(path)


def captions(i: int, n: int = 3) -> list[str]:
    return [f"sound {i} heard in way {j}" for j in range(n)]


def write_metadata(folder: Path, rows: list[dict], fmt: str = "jsonl") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(
            f'"{r["file_name"]}","{r["text"]}"\n' for r in rows))


def good_split(folder: Path, ids: range, suffix: str = "wav") -> None:
    for i in ids:
        write_clip(folder / f"{i}.{suffix}", i)
    write_metadata(folder, [{"file_name": f"{i}.{suffix}", "text": captions(i)} for i in ids])


def load(source: str, on_bad: str = "error", **keys: Any) -> tuple[dict, dict, int, str]:
    cfg = from_dict(AudioPrepareConfig, {"source": source, "on_bad_sample": on_bad, **keys})
    return load_audio_source(cfg, SR, MAX_SECONDS)


def decoded(data: bytes) -> tuple[np.ndarray, Any]:
    """FLAC bytes -> (samples, soundfile info)."""
    return sf.read(io.BytesIO(data), dtype="float32")[0], sf.info(io.BytesIO(data))


def check_clips(ds: datasets.Dataset) -> None:
    """The output schema, and every clip a mono 16-bit FLAC at SR."""
    assert ds.features == datasets.Features({"id": datasets.Value("string"), "audio": datasets.Value("binary"),
                                             "captions": datasets.List(datasets.Value("string"))})
    for data in ds["audio"]:
        samples, info = decoded(data)
        assert (info.format, info.subtype, info.channels, info.samplerate) == ("FLAC", "PCM_16", 1, SR)
        assert samples.ndim == 1 and np.abs(samples).max() > 0.1


def test_audiofolder_split_subfolders_jsonl_rows_add_up_captions(tmp_path):
    good_split(tmp_path / "train", range(4), "flac")
    with (tmp_path / "train" / "metadata.jsonl").open("a") as f:  # a second row for 0.flac: its captions add up
        f.write(json.dumps({"file_name": "0.flac", "text": "one more caption"}) + "\n")
    good_split(tmp_path / "val", range(4, 6), "ogg")  # val/ serves splits.val = validation
    good_split(tmp_path / "test", range(6, 8))
    splits, skipped, truncated, where = load("audiofolder", audiofolder={"path": str(tmp_path)})
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert (skipped, truncated, where) == ({}, 0, f"audio folder {tmp_path}")
    train = splits["train"]
    assert train["id"] == ["0.flac", "1.flac", "2.flac", "3.flac"] and splits["val"]["id"] == ["4.ogg", "5.ogg"]
    assert train["captions"][0] == [*captions(0), "one more caption"] and train["captions"][1] == captions(1)
    for ds in splits.values():
        check_clips(ds)
    samples, _ = decoded(train["audio"][1])
    assert np.abs(samples - tone(1)).max() < 1e-3  # the clip itself, losslessly at 16 bits


def test_audiofolder_top_level_csv_is_divided_by_ratios(tmp_path):
    for i in range(10):
        write_clip(tmp_path / "clips" / f"{i}.wav", i)
    rows = [{"file_name": f"clips/{i}.wav", "text": c} for i in range(10) for c in captions(i, 2)]  # a row a caption
    write_metadata(tmp_path, rows, fmt="csv")
    keys = {"audiofolder": {"path": str(tmp_path)}, "split_ratios": [0.6, 0.2, 0.2], "seed": 3}
    splits, skipped, _, _ = load("audiofolder", **keys)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 2} and not skipped
    ids = [i for ds in splits.values() for i in ds["id"]]
    assert sorted(ids) == sorted(f"clips/{i}.wav" for i in range(10))
    assert all(len(c) == 2 for ds in splits.values() for c in ds["captions"])
    again, _, _, _ = load("audiofolder", **keys)  # the seed fixes the division
    assert again["train"]["id"] == splits["train"]["id"]
    limited, _, _, _ = load("audiofolder", max_samples=1, **keys)
    assert {k: v["id"] for k, v in limited.items()} == {k: v["id"][:1] for k, v in splits.items()}


def audio_dataset(paths: list[str], columns: dict[str, list]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"audio": paths, **columns}).cast_column("audio", datasets.Audio())


def test_hf_save_to_disk_audio_column_with_clotho_caption_columns(tmp_path):
    parts = {}
    for name, ids in (("train", range(3)), ("validation", range(3, 5)), ("test", range(5, 7))):
        paths = [write_clip(tmp_path / "wav" / f"{i}.wav", i) for i in ids]
        parts[name] = audio_dataset(paths, {f"caption_{j + 1}": [captions(i)[j] for i in ids] for j in range(3)})
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "clotho"))
    splits, skipped, truncated, where = load("hf", hf={"path": str(tmp_path / "clotho"),
                                                        "caption_column": ["caption_1", "caption_2", "caption_3"]})
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "val": 2, "test": 2}
    assert (skipped, truncated, where) == ({}, 0, f"dataset {tmp_path / 'clotho'}")
    assert splits["train"]["id"] == ["train-0", "train-1", "train-2"] and splits["test"]["id"][0] == "test-0"
    assert splits["train"]["captions"] == [captions(i) for i in range(3)]
    assert splits["val"]["captions"][1] == captions(4)
    for ds in splits.values():
        check_clips(ds)


def test_hf_parquet_one_row_per_caption_grouped_by_id_and_split_by_column(tmp_path):
    """AudioCaps: a row a caption, `youtube_id` names the clip; a `split` column names its split."""
    rows = [(i, c, "train" if i < 4 else "val" if i < 6 else "test") for i in range(8) for c in captions(i, 2)]
    paths = [write_clip(tmp_path / "wav" / f"{i}.wav", i) for i in range(8)]
    columns = {"youtube_id": [f"yt{i}" for i, _, _ in rows], "caption": [c for _, c, _ in rows],
               "split": [s for _, _, s in rows]}
    audio_dataset([paths[i] for i, _, _ in rows], columns).to_parquet(str(tmp_path / "ac.parquet"))
    hf = {"path": str(tmp_path / "ac.parquet"), "id_column": "youtube_id", "split_column": "split"}
    splits, skipped, _, where = load("hf", hf=hf, splits={"val": "val"})
    assert {k: v["id"] for k, v in splits.items()} == {"train": ["yt0", "yt1", "yt2", "yt3"], "val": ["yt4", "yt5"],
                                                       "test": ["yt6", "yt7"]}
    assert splits["val"]["captions"] == [captions(4, 2), captions(5, 2)] and not skipped
    assert where.endswith("split by column 'split'")
    check_clips(splits["train"])
    samples, _ = decoded(splits["test"]["audio"][1])
    assert np.abs(samples - tone(7)).max() < 1e-3


def test_stereo_44k1_comes_back_mono_at_the_rate_and_long_clips_are_cut(tmp_path):
    write_clip(tmp_path / "stereo.wav", 0, sr=44100, channels=2, seconds=0.5)
    write_clip(tmp_path / "long.flac", 1, seconds=2.5)  # longer than MAX_SECONDS
    write_clip(tmp_path / "short.wav", 2)
    write_metadata(tmp_path, [{"file_name": f, "text": "a sound"} for f in ("stereo.wav", "long.flac", "short.wav")])
    splits, skipped, truncated, _ = load("audiofolder", audiofolder={"path": str(tmp_path)},
                                         split_ratios=[0.34, 0.33, 0.33])
    assert truncated == 1 and not skipped
    clips = {i: a for ds in splits.values() for i, a in zip(ds["id"], ds["audio"])}
    stereo, info = decoded(clips["stereo.wav"])
    assert (info.channels, info.samplerate, stereo.shape) == (1, SR, (SR // 2,))
    assert np.abs(stereo - 0.75 * tone(0, 0.5))[200:-200].max() < 2e-3  # the channels' mean, resampled
    assert decoded(clips["long.flac"])[0].shape == (int(MAX_SECONDS * SR),)
    assert decoded(clips["short.wav"])[0].shape == (SR // 4,)


def bad_folder(root: Path) -> dict[str, str]:
    """train/ with two good clips and one of each bad kind; val/, test/ good. -> {reason: bad file name}."""
    good_split(root / "val", range(10, 12))
    good_split(root / "test", range(12, 14))
    train = root / "train"
    for i in range(2):
        write_clip(train / f"{i}.wav", i)
    (train / "empty.wav").write_bytes(b"")
    (train / "notes.wav").write_text("not audio at all")
    sf.write(train / "silent.wav", np.zeros(SR // 4), SR)
    write_clip(train / "blank.wav", 3)
    bad = {"missing_file": "gone.wav", "empty_file": "empty.wav", "unreadable_audio": "notes.wav",
           "silent_audio": "silent.wav", "empty_caption": "blank.wav"}
    files = ("0.wav", *bad.values(), "1.wav")
    write_metadata(train, [{"file_name": f, "text": "  " if f == "blank.wav" else "a sound"} for f in files])
    return bad


@pytest.mark.parametrize("reason", ["missing_file", "empty_file", "unreadable_audio", "silent_audio",
                                    "empty_caption"])
def test_a_bad_sample_stops_with_one_line_naming_its_file(tmp_path, reason):
    bad = bad_folder(tmp_path)
    rows = [{"file_name": f, "text": "  " if f == "blank.wav" else "a sound"} for f in ("0.wav", bad[reason])]
    write_metadata(tmp_path / "train", rows)  # a good clip, then the one bad kind
    with pytest.raises(ValueError) as e:
        load("audiofolder", audiofolder={"path": str(tmp_path)})
    message = str(e.value)
    assert "\n" not in message and f"bad sample '{bad[reason]}' (split 'train', file '" in message
    assert str(tmp_path / "train" / bad[reason]) in message and reason.replace("_", " ") in message
    assert message.endswith("or set prepare.audio.on_bad_sample: skip to drop such samples")


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, monkeypatch, caplog):
    """Decoded 2 clips at a time (7 train rows: 4 chunks), the skips are logged once for the split."""
    monkeypatch.setattr(audio_sources, "CHUNK", 2)
    bad = bad_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmalign"):
        splits, skipped, _, _ = load("audiofolder", "skip", audiofolder={"path": str(tmp_path)})
    assert skipped == {reason: 1 for reason in sorted(bad)}
    assert splits["train"]["id"] == ["0.wav", "1.wav"] and len(splits["val"]) == len(splits["test"]) == 2
    check_clips(splits["train"])
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("split '")]
    assert summaries == ["split 'train': skipped 5 of 7 audio samples (empty_caption: 1, empty_file: 1, "
                         "missing_file: 1, silent_audio: 1, unreadable_audio: 1)"]


def test_a_split_left_empty_after_skipping_stops_with_one_line(tmp_path):
    good_split(tmp_path / "train", range(2))
    good_split(tmp_path / "test", range(2, 4))
    (tmp_path / "validation").mkdir()
    sf.write(tmp_path / "validation" / "quiet.wav", np.zeros(SR // 4), SR)
    write_metadata(tmp_path / "validation", [{"file_name": "quiet.wav", "text": "nothing"}])
    with pytest.raises(ValueError) as e:
        load("audiofolder", "skip", audiofolder={"path": str(tmp_path)})
    assert str(e.value) == (f"split 'val' of audio folder {tmp_path} has no rows left after skipping bad samples "
                            "({'silent_audio': 1}) (rows per split: train=2, val=0, test=2); add data, or change "
                            "prepare.audio.splits / prepare.audio.split_ratios")


def test_source_errors_name_the_audio_keys(tmp_path):
    with pytest.raises(ValueError, match=r"^cannot load dataset 'nobody/no-such-audio': .* set "
                                         r"prepare\.audio\.hf\.path to a save_to_disk directory or parquet files$"):
        load("hf", hf={"path": "nobody/no-such-audio"})  # offline (conftest): not a path, not in the cache
    with pytest.raises(FileNotFoundError, match=r"^prepare\.audio\.audiofolder\.path: .* is not a directory$"):
        load("audiofolder", audiofolder={"path": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^audio folder .* has no metadata\.jsonl or metadata\.csv"):
        load("audiofolder", audiofolder={"path": str(tmp_path / "empty")})
    good_split(tmp_path / "f" / "train", range(2))
    good_split(tmp_path / "f" / "test", range(2, 4))
    with pytest.raises(ValueError, match=r"not found: prepare\.audio\.splits\.val='validation'.*"
                                         r"prepare\.audio\.hf\.split_column values"):
        load("audiofolder", audiofolder={"path": str(tmp_path / "f")})
    one = audio_dataset([write_clip(tmp_path / "a.wav", 0)], {"text": ["a sound"], "n": [1]})
    one.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"has no column 'caption' \(prepare\.audio\.hf\.caption_column\); its "
                                         r"columns: audio, text, n$"):
        load("hf", hf={"path": str(tmp_path / "ds")})
    with pytest.raises(ValueError, match=r"column 'n' of .* holds .*, not audio, bytes or file paths"):
        load("hf", hf={"path": str(tmp_path / "ds"), "audio_column": "n", "caption_column": "text"})

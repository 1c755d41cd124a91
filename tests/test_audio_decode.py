"""Decoding user audio (data/audio.py): formats, mono, resampling, the window cut, every bad-audio reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from mmalign.data.audio import DecodedAudio, clean_audio_rows, decode_audio, resample
from mmalign.data.images import BadSample

SR = 16000


def tone(seconds: float, sr: int, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.stack([x, 0.5 * x], 1)[:, :channels] if channels > 1 else x  # (T,) or (T, C)


def encode(x: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"),
                                         ("OGG", "VORBIS")])
def test_formats_decode_to_mono_float32(fmt, subtype):
    out = decode_audio(encode(tone(1.0, SR), fmt=fmt, subtype=subtype), SR)
    assert isinstance(out, DecodedAudio) and out.samples.dtype == np.float32 and out.samples.shape == (SR,)
    assert out.sampling_rate == SR and out.seconds == 1.0 and not out.truncated
    tol = 0.05 if fmt == "OGG" else 1e-3  # lossy
    assert np.abs(out.samples - tone(1.0, SR)).max() < tol


def test_path_and_dict_values_decode_alike(tmp_path):
    data = encode(tone(0.5, SR))
    (tmp_path / "a.wav").write_bytes(data)
    ref = decode_audio(data, SR).samples
    for value in (tmp_path / "a.wav", str(tmp_path / "a.wav"), {"bytes": None, "path": str(tmp_path / "a.wav")},
                  {"bytes": data, "path": "elsewhere.wav"}, {"array": tone(0.5, SR), "sampling_rate": SR}):
        assert np.allclose(decode_audio(value, SR).samples, ref, atol=1e-4)


def test_stereo_is_averaged_to_mono():
    out = decode_audio(encode(tone(0.5, SR, channels=2), subtype="FLOAT"), SR)
    assert out.samples.shape == (SR // 2,)
    assert np.allclose(out.samples, 0.75 * tone(0.5, SR), atol=1e-6)


def test_44k1_file_resamples_to_16k():
    """A 44.1 kHz 1 kHz tone becomes the same tone sampled at 16 kHz (away from the filter's edges)."""
    out = decode_audio(encode(tone(2.0, 44100, hz=1000.0), sr=44100, subtype="FLOAT"), SR)
    assert out.samples.shape == (32000,) and out.seconds == 2.0
    want = tone(2.0, SR, hz=1000.0)
    assert np.abs(out.samples - want)[500:-500].max() < 1e-3


def test_resample_removes_content_above_the_new_nyquist():
    x = tone(1.0, 44100, hz=12000.0)  # above 8 kHz: must not alias into the 16 kHz signal
    y = resample(x, 44100, SR)
    assert len(y) == SR and np.abs(y[500:-500]).max() < 0.01
    assert resample(x, 44100, 44100).dtype == np.float32


def test_long_clips_are_cut_to_the_window_and_reported():
    out = decode_audio(encode(tone(7.5, 44100), sr=44100), SR, max_seconds=5.0)
    assert out.truncated and out.seconds == 7.5 and out.samples.shape == (5 * SR,)
    assert not decode_audio(encode(tone(5.0, SR)), SR, max_seconds=5.0).truncated


def _bad(value, **kw) -> BadSample:
    with pytest.raises(BadSample) as e:
        decode_audio(value, SR, **kw)
    return e.value


def test_every_bad_audio_reason(tmp_path):
    wav = encode(tone(1.0, SR))
    flac = encode(tone(1.0, SR), fmt="FLAC")
    nan = tone(1.0, SR)
    nan[100] = np.nan
    (tmp_path / "dir.wav").mkdir()
    cases = {
        "missing_file": [None, {"bytes": None, "path": None}, str(tmp_path / "nope.wav")],
        "empty_file": [b""],
        "unreadable_audio": [b"this is a text file, not audio" * 10, b"\x89PNG\r\n\x1a\n" + bytes(100),
                             str(tmp_path / "dir.wav")],
        "truncated_audio": [wav[:len(wav) // 2], wav[:30], flac[:len(flac) // 2]],
        "zero_length_audio": [encode(np.zeros(0))],
        "nonfinite_audio": [encode(nan, subtype="FLOAT"), {"array": np.full(10, np.inf), "sampling_rate": SR}],
        "silent_audio": [encode(np.zeros(SR)), encode(np.full(SR, 1e-5), subtype="FLOAT")],
    }
    for reason, values in cases.items():
        for value in values:
            assert _bad(value).reason == reason, (reason, value if not isinstance(value, bytes) else value[:20])
    assert "dBFS" in str(_bad(encode(np.zeros(SR))))


def test_a_quiet_but_audible_clip_is_kept():
    assert decode_audio(encode(tone(1.0, SR) * 0.001), SR).samples.shape == (SR,)  # -66 dBFS


def _rows(tmp_path):
    (tmp_path / "good.wav").write_bytes(encode(tone(1.0, SR)))
    (tmp_path / "long.wav").write_bytes(encode(tone(3.0, SR)))
    (tmp_path / "silent.wav").write_bytes(encode(np.zeros(SR)))
    (tmp_path / "cut.wav").write_bytes(encode(tone(1.0, SR))[:500])
    return [{"id": "good", "audio": str(tmp_path / "good.wav"), "captions": [" a tone "]},
            {"id": "long", "audio": {"bytes": None, "path": str(tmp_path / "long.wav")}, "captions": "a long tone"},
            {"id": "silent", "audio": str(tmp_path / "silent.wav"), "captions": ["nothing"]},
            {"id": "cut", "audio": str(tmp_path / "cut.wav"), "captions": ["a tone"]},
            {"id": "nocap", "audio": str(tmp_path / "good.wav"), "captions": []},
            {"id": "blank", "audio": str(tmp_path / "good.wav"), "captions": ["a tone", "  "]}]


def test_skip_counts_each_reason_and_truncations(tmp_path):
    kept, report = clean_audio_rows(_rows(tmp_path), "train", "skip", SR, max_seconds=2.0)
    assert [r["id"] for r in kept] == ["good", "long"]
    assert kept[0]["captions"] == ["a tone"] and kept[1]["audio"].shape == (2 * SR,)
    assert dict(report.skipped) == {"silent_audio": 1, "truncated_audio": 1, "missing_caption": 1,
                                    "empty_caption": 1}
    assert report.truncated == 1 and report.total == 6


def test_error_is_one_line_naming_the_sample_file_and_fix(tmp_path):
    rows = _rows(tmp_path)
    with pytest.raises(ValueError) as e:
        clean_audio_rows(rows[2:], "val", "error", SR)
    msg = str(e.value)
    assert "\n" not in msg and "'silent'" in msg and "silent.wav" in msg and "split 'val'" in msg
    assert "silent audio" in msg and "on_bad_sample: skip" in msg
    with pytest.raises(ValueError, match="on_bad_sample='drop'"):
        clean_audio_rows(rows, "val", "drop", SR)

"""Decoding user audio with soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...; no ffmpeg or torchcodec).

A clip becomes mono float32 at the encoder's sampling rate: channels averaged, resampled with a
polyphase filter (scipy.signal.resample_poly), cut to the encoder window (reported, so callers
can count truncated clips). A bad clip raises `images.BadSample` with a short `reason`, the key it
is counted under when bad samples are skipped (the same machinery and wording as images):

    missing_file       the row names no audio, or a path that does not exist
    empty_file         0 bytes
    unreadable_audio   not an audio format libsndfile reads (or not audio at all)
    truncated_audio    the stream ends before its header says, or the decoder fails mid-stream
    zero_length_audio  a valid file with no samples
    nonfinite_audio    NaN or inf samples (float WAV)
    silent_audio       the kept part peaks below SILENCE_DBFS
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .images import BadSample
from .samples import check_captions

log = logging.getLogger(__name__)

SILENCE_DBFS = -80.0  # below the 16-bit dither floor (-90 dBFS is one LSB): nothing an encoder can hear
# How libsndfile words a stream that ends early or breaks mid-way (lower case).
TRUNCATED = ("lost sync", "psf_fseek", "'data' chunk", "malformed", "unexpected end", "end of file")


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded clip: samples (T,) float32 mono at `sampling_rate`, cut to the window if it was longer.

    seconds: the clip's length before any cut; truncated: True when it was cut to the window.
    """

    samples: np.ndarray
    sampling_rate: int
    seconds: float
    truncated: bool


def read_audio_file(value: str | Path | dict | bytes | None) -> bytes:
    """The bytes of a `datasets.Audio(decode=False)` value ({"bytes", "path"}), of a path, or bytes as given."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        raise BadSample("missing_file", "the row has no audio")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_file", f"{path} does not exist") from None
    except OSError as e:  # a directory, no permission
        raise BadSample("unreadable_audio", f"{path}: {e.strerror or e}") from None


def _wav_shortfall(data: bytes) -> int:
    """Bytes missing from a RIFF/RIFX WAV's data chunk (0 when complete or not a WAV).

    libsndfile reads a cut WAV without complaint, returning the frames that are there, so the header's
    declared data size is compared with what the file holds.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return 0
    order = "little" if data[:4] == b"RIFF" else "big"
    offset = 12
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset + 4:offset + 8], order)
        if data[offset:offset + 4] == b"data":
            streaming = size in (0, 0xFFFFFFFF)  # written before the length was known: no claim to check
            return 0 if streaming else max(0, size - (len(data) - offset - 8))
        offset += 8 + size + (size & 1)  # chunks are word-aligned
    return 0


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    """bytes -> (samples (T, C) float32, sampling rate). Raises BadSample."""
    import soundfile as sf

    if not data:
        raise BadSample("empty_file", "0 bytes")
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        msg = re.sub(r"^Error opening <[^>]*>: ", "", str(e).strip())  # the file object's repr says nothing
        if "format not recognised" in msg.lower():
            raise BadSample("unreadable_audio", f"not an audio file soundfile can read ({len(data)} bytes)") from None
        reason = "truncated_audio" if any(k in msg.lower() for k in TRUNCATED) else "unreadable_audio"
        raise BadSample(reason, f"soundfile: {msg}") from None
    missing = _wav_shortfall(data)
    if missing:
        raise BadSample("truncated_audio", f"the WAV data chunk is {missing} bytes shorter than its header says")
    return samples, int(sr)


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """(T,) float -> (ceil(T * target_sr / orig_sr),) float32, polyphase anti-aliased resampling."""
    if orig_sr == target_sr:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(orig_sr, target_sr)
    return resample_poly(x, target_sr // g, orig_sr // g).astype(np.float32)


def decode_audio(value: Any, sampling_rate: int, max_seconds: float | None = None) -> DecodedAudio:
    """Any audio value -> mono float32 at `sampling_rate`, at most `max_seconds` long. Raises BadSample.

    value: bytes, a path, a `datasets.Audio(decode=False)` dict {"bytes", "path"}, or a decoded one
    {"array", "sampling_rate"} (array (T,) or (T, C)). Stereo is averaged to mono; a clip longer than
    `max_seconds` keeps its first `max_seconds` (the encoder's window) and comes back `truncated`.
    """
    if isinstance(value, dict) and value.get("array") is not None:
        x, sr = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        x = x[:, None] if x.ndim == 1 else x
    else:
        x, sr = _decode(read_audio_file(value))
    if x.shape[0] == 0:
        raise BadSample("zero_length_audio", f"no samples ({x.shape[1]} channel(s) at {sr} Hz)")
    finite = np.isfinite(x)
    if not finite.all():
        raise BadSample("nonfinite_audio", f"{int((~finite).sum())} NaN or inf samples of {x.size}")
    seconds = x.shape[0] / sr
    truncated = max_seconds is not None and seconds > max_seconds
    if truncated:  # cut before resampling: no work on samples that are dropped anyway
        x = x[:math.ceil(max_seconds * sr)]
    x = x.mean(1) if x.shape[1] > 1 else x[:, 0]  # (T,)
    peak = float(np.abs(x).max())
    if peak < 10 ** (SILENCE_DBFS / 20):
        db = "-inf" if peak == 0 else f"{20 * math.log10(peak):.0f}"
        raise BadSample("silent_audio", f"peak level {db} dBFS{' in the kept window' if truncated else ''} "
                                        f"(below {SILENCE_DBFS:.0f} dBFS)")
    x = resample(x, sr, sampling_rate)
    if truncated:
        x = x[:int(round(max_seconds * sampling_rate))]
    return DecodedAudio(np.ascontiguousarray(x, dtype=np.float32), sampling_rate, seconds, truncated)


def flac_bytes(samples: Any, sampling_rate: int) -> bytes:
    """A mono clip as the bytes of a FLAC file (16-bit): how datasets keep audio, a fifth of float32's size."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, sampling_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@dataclass
class AudioReport:
    """What clean_audio_rows did: samples skipped by reason, and clips cut to the window."""

    skipped: Counter
    truncated: int = 0
    total: int = 0


def _where(split: str, ident: str, audio: Any) -> str:
    path = audio.get("path") if isinstance(audio, dict) else audio if isinstance(audio, (str, Path)) else None
    return f"'{ident}' (split '{split}'" + (f", file '{path}')" if path else ")")


def clean_audio_rows(rows: Iterable[dict], split: str, on_bad: str, sampling_rate: int,
                     max_seconds: float | None = None) -> tuple[list[dict], AudioReport]:
    """Rows {"id", "audio": any decode_audio value, "captions"} -> (good rows with "audio" (T,) float32
    at `sampling_rate`, report).

    on_bad="error" raises one line naming the sample, its file and the fix; "skip" drops the row and
    counts it by reason (logged once per split, never silent), as data/samples.py does for images.
    Clips longer than `max_seconds` are cut to it and counted in report.truncated.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad_sample={on_bad!r}: allowed: error, skip")
    kept, report = [], AudioReport(Counter())
    for row in rows:
        report.total += 1
        try:
            captions = check_captions(row.get("captions"))
            decoded = decode_audio(row.get("audio"), sampling_rate, max_seconds)
        except BadSample as e:
            where = _where(split, str(row.get("id")), row.get("audio"))
            if on_bad == "error":
                raise ValueError(f"bad sample {where}: {e}. Fix or remove it, "
                                 "or set prepare.on_bad_sample: skip to drop such samples") from None
            log.debug("skipping %s: %s", where, e)
            report.skipped[e.reason] += 1
            continue
        report.truncated += decoded.truncated
        kept.append({**row, "audio": decoded.samples, "sampling_rate": sampling_rate, "captions": captions})
    if report.skipped:
        log.warning("split '%s': skipped %d of %d audio samples (%s)", split, sum(report.skipped.values()),
                    report.total, ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())))
    if report.truncated:
        log.info("split '%s': %d of %d clips longer than %g s were cut to the encoder window", split,
                 report.truncated, report.total, max_seconds)
    return kept, report

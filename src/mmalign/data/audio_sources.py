"""User audio sources -> checked train/val/test splits with columns id, audio (FLAC bytes), captions.

`hf`: a hub id, a save_to_disk directory or a parquet file/directory, loaded as sources.py loads image
datasets; an Audio column is read undecoded (soundfile decodes it: no torchcodec). Captions come from one
column (strings or lists of strings) or a list of columns (Clotho: caption_1..caption_5); rows sharing
`id_column` are one clip with all their captions (AudioCaps: one row per caption); `split_column` re-splits.
`audiofolder`: the Hugging Face audiofolder layout (audio files + metadata.jsonl / metadata.csv), read as
imagefolder.py reads image folders; split subfolders train/, validation/ (or val/), test/, or one metadata
file at the top. A source with one split is divided by `prepare.audio.split_ratios`.

Every clip is decoded and checked by data/audio.py (mono, the encoder's rate, cut to its window; a bad
sample stops the stage or is skipped and counted) a chunk at a time, and kept as a 16-bit FLAC file, so a
big split's float clips are never in memory together.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import AudioPrepareConfig, HFAudioSourceConfig
from .audio import clean_audio_rows
from .imagefolder import read_imagefolder
from .sources import by_column, check_not_empty, load_hf, pick_splits, ratio_split

log = logging.getLogger(__name__)

CHUNK = 64  # clips decoded at once: at most 64 x 30 s (Whisper's window) x 16 kHz float32 = 123 MB
STRINGS = ("string", "large_string")
# The shared image helpers name the image keys in their errors; an audio source's keys are prepare.audio.*
# (not inside a quoted name or a path: the lookbehinds).
AUDIO_WORDING = (
    (re.compile(r"(?<![\w/.'-])prepare\.(?=(?:hf|splits|split_ratios|on_bad_sample)\b)"), "prepare.audio."),
    (re.compile(r"(?<![\w/.'-])prepare\.imagefolder\."), "prepare.audio.audiofolder."),
    (re.compile(r"^image folder "), "audio folder "),
    (re.compile(r"\(the HF imagefolder convention\)"), "(the HF audiofolder convention)"),
)


@contextmanager
def audio_keys() -> Iterator[None]:
    """Re-raise a shared image helper's one-line error naming the audio source's keys."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if type(e) not in (ValueError, FileNotFoundError):  # BadSample, datasets' own errors: as they are
            raise
        message = str(e)
        for pattern, words in AUDIO_WORDING:
            message = pattern.sub(words, message)
        raise type(e)(message) from None


@dataclass(frozen=True)
class Clips:
    """One split before decoding: per clip its id, its captions and its audio, either a decode_audio value
    (a path) or, with `table`, the row of `table` (a Dataset with the one undecoded audio column) holding it."""

    ids: list[str]
    captions: list[list[Any]]
    audio: list[Any]
    table: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, indices: Iterable[int]) -> Clips:
        """The clips at `indices`, in that order (as Dataset.select: what ratio_split and max_samples call)."""
        idx = [int(i) for i in indices]
        return replace(self, ids=[self.ids[i] for i in idx], captions=[self.captions[i] for i in idx],
                       audio=[self.audio[i] for i in idx])

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Clips start:stop as clean_audio_rows' rows {id, audio, captions}, their audio read now."""
        audio = self.audio[start:stop]
        if self.table is not None and audio:
            audio = self.table[audio][self.table.column_names[0]]
        return [{"id": i, "audio": a, "captions": c}
                for i, a, c in zip(self.ids[start:stop], audio, self.captions[start:stop])]


class _ChunkSummaries(logging.Filter):
    """Holds back clean_audio_rows' per-call summaries (it is called once a chunk; one summary a split is logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("split '")


@contextmanager
def _per_split_summaries() -> Iterator[None]:
    """While it lasts, data/audio.py's per-call summaries are held back."""
    audio_log, held = logging.getLogger(clean_audio_rows.__module__), _ChunkSummaries()
    audio_log.addFilter(held)
    try:
        yield
    finally:
        audio_log.removeFilter(held)


@dataclass
class _Encoder:
    """Decodes and checks clips a chunk at a time and keeps the good ones as FLAC bytes; counts what it skipped
    (by reason) and cut to `max_seconds` over every split it encodes."""

    on_bad: str
    sampling_rate: int
    max_seconds: float | None
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def __call__(self, clips: Clips, split: str) -> Any:
        import datasets

        from .audio import flac_bytes

        out: dict[str, list] = {"id": [], "audio": [], "captions": []}
        skipped, truncated = Counter(), 0
        with _per_split_summaries():
            for start in range(0, len(clips), CHUNK):
                good, report = clean_audio_rows(clips.rows(start, start + CHUNK), split, self.on_bad,
                                                self.sampling_rate, self.max_seconds)
                skipped.update(report.skipped)
                truncated += report.truncated
                for row in good:
                    out["id"].append(str(row["id"]))
                    out["audio"].append(flac_bytes(row["audio"], self.sampling_rate))
                    out["captions"].append(row["captions"])
        if skipped:
            log.warning("split '%s': skipped %d of %d audio samples (%s)", split, sum(skipped.values()), len(clips),
                        ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
        if truncated:
            log.info("split '%s': %d of %d clips longer than %g s were cut to the encoder window", split, truncated,
                     len(clips), self.max_seconds)
        self.skipped.update(skipped)
        self.truncated += truncated
        string = datasets.Value("string")
        return datasets.Dataset.from_dict(out, features=datasets.Features(
            {"id": string, "audio": datasets.Value("binary"), "captions": datasets.List(string)}))


def _audiofolder(cfg: AudioPrepareConfig) -> tuple[dict[str, Clips], str]:
    """{split: Clips} of an audio folder: id = file_name, audio = the file's path (a missing one: missing_file)."""
    with audio_keys():
        found = read_imagefolder(Path(cfg.audiofolder.path).expanduser(), cfg.audiofolder.caption_column)
    return ({name: Clips(ds["id"][:], ds["captions"][:], ds["image"][:]) for name, ds in found.items()},
            f"audio folder {cfg.audiofolder.path}")


def _caption_columns(hf: HFAudioSourceConfig) -> list[str]:
    return [hf.caption_column] if isinstance(hf.caption_column, str) else list(hf.caption_column)


def _is_audio(feature: Any) -> bool:
    """datasets.Audio, an undecoded {bytes, path} struct, bytes, or file paths."""
    import datasets

    if isinstance(feature, datasets.Audio):
        return True
    if isinstance(feature, dict):
        return "bytes" in feature or "path" in feature
    return getattr(feature, "dtype", None) in ("binary", "large_binary", *STRINGS)


def _check_hf_columns(ds: Any, hf: HFAudioSourceConfig, where: str) -> None:
    import datasets

    named = [("audio_column", hf.audio_column), ("id_column", hf.id_column), ("split_column", hf.split_column),
             *(("caption_column", c) for c in _caption_columns(hf))]
    absent = [(key, column) for key, column in named if column and column not in ds.column_names]
    if absent:
        key, column = absent[0]
        raise ValueError(f"{where} has no column '{column}' (prepare.audio.hf.{key}); its columns: "
                         f"{', '.join(ds.column_names)}")
    for column in _caption_columns(hf):
        inner = getattr(ds.features[column], "feature", ds.features[column])  # List(Value) -> Value
        if not isinstance(inner, datasets.Value) or inner.dtype not in STRINGS:
            raise ValueError(f"column '{column}' of {where} holds {ds.features[column]}, not a string or a list of "
                             "strings (prepare.audio.hf.caption_column)")
    if not _is_audio(ds.features[hf.audio_column]):
        raise ValueError(f"column '{hf.audio_column}' of {where} holds {ds.features[hf.audio_column]}, not audio, "
                         "bytes or file paths (prepare.audio.hf.audio_column)")


def _hf_clips(ds: Any, hf: HFAudioSourceConfig, split: str) -> Clips:
    """One split of a dataset -> Clips; rows sharing the id column's value are one clip, captions in row order."""
    import datasets

    # ds[column][:] reads the column as one list: 100x faster than iterating datasets' Column row by row
    keys = [str(v) for v in ds[hf.id_column][:]] if hf.id_column else [f"{split}-{i}" for i in range(len(ds))]
    first: dict[str, int] = {}
    captions: dict[str, list] = {}
    for i, (key, *values) in enumerate(zip(keys, *(ds[c][:] for c in _caption_columns(hf)))):
        first.setdefault(key, i)
        for value in values:  # Clotho: one value a caption column
            captions.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    table = ds.select_columns([hf.audio_column])
    if isinstance(table.features[hf.audio_column], datasets.Audio):  # decode=True would need torchcodec
        table = table.cast_column(hf.audio_column, datasets.Audio(decode=False))
    return Clips(list(first), list(captions.values()), list(first.values()), table)


def _hf(hf: HFAudioSourceConfig) -> tuple[dict[str, Clips], str]:
    """{split (or split_column value): Clips} of a `datasets` dataset, and its description."""
    where = f"dataset {hf.path}" + (f" ({hf.name})" if hf.name else "")
    with audio_keys():
        found = load_hf(hf)  # type: ignore[arg-type]  # reads path, name and revision: the same keys
    if hf.split_column:
        _check_hf_columns(next(iter(found.values())), hf, where)
        found = by_column(found, hf.split_column)
        where += f" split by column '{hf.split_column}'"
    for name, ds in found.items():
        _check_hf_columns(ds, hf, f"{where}, split '{name}'")
    return {name: _hf_clips(ds, hf, name) for name, ds in found.items()}, where


def load_audio_source(cfg: AudioPrepareConfig, sampling_rate: int, max_seconds: float | None
                      ) -> tuple[dict[str, Any], dict[str, int], int, str]:
    """({train, val, test}: Dataset(id, audio: FLAC bytes, mono 16-bit at `sampling_rate`, captions), skipped
    samples by reason, clips cut to `max_seconds`, a description of the source).

    A source with one split is decoded and checked whole, then divided by split_ratios (every split gets
    its share of good clips); `max_samples` keeps the first clips of each split. A split left empty after
    skipping bad samples stops the stage with one line.
    """
    found, where = _audiofolder(cfg) if cfg.source == "audiofolder" else _hf(cfg.hf)
    if cfg.splits.val == "validation" and "validation" not in found and "val" in found:
        found["validation"] = found.pop("val")  # an audio folder's val/ subfolder

    def first(ds: Any) -> Any:
        return ds.select(range(min(cfg.max_samples, len(ds)))) if cfg.max_samples else ds

    encode = _Encoder(cfg.on_bad_sample, sampling_rate, max_seconds)
    with audio_keys():
        picked = pick_splits(found, cfg.splits, where)
        check_not_empty(picked or found, where)
        if picked is not None:
            splits = {role: encode(first(clips), role) for role, clips in picked.items()}
        else:
            (name, clips), = found.items()
            whole = encode(clips, "all")
            log.info("%s has one split ('%s', %d good clips): dividing it %s into train/val/test "
                     "(prepare.audio.split_ratios)", where, name, len(whole), cfg.split_ratios)
            splits = {role: first(part) for role, part in ratio_split(whole, cfg.split_ratios, cfg.seed).items()}
        skipped = dict(sorted(encode.skipped.items()))
        check_not_empty(splits, where, after=f" left after skipping bad samples ({skipped})" if skipped else "")
    return splits, skipped, encode.truncated, where

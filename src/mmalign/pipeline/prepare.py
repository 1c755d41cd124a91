"""prepare: one modality's dataset (synthetic or the user's) -> HF `datasets` on disk; its builtin stand-in
encoder; its frozen-encoder feature cache; a report with split sizes and bad samples skipped by reason.

One DVC stage per modality (prepare: image, prepare_audio: audio) runs this with its own params, so an
audio change never re-extracts an image feature and the reverse. The LLM is not touched here (stage
`llm`), so changing it never re-extracts a feature either."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import BUILTIN_AUDIO, BUILTIN_VISION, ModelsConfig, PrepareConfig
from ..data.audio import flac_bytes
from ..data.features import build_feature_cache
from ..data.samples import clean_split
from ..data.sources import check_not_empty, load_source, split_sizes
from ..modalities import modality as spec
from ..models.encoders import FrozenTextEncoder
from ..training import distributed
from ..utils import atomic_path, get_device, read_json, write_json

log = logging.getLogger(__name__)


def synthetic_dataset(cfg: PrepareConfig) -> Any:
    """The default image data as a `datasets.DatasetDict` (id, image, captions, objects as JSON)."""
    import datasets

    from ..data.synthetic import generate_synthetic

    splits = generate_synthetic(cfg.seed, cfg.n_train, cfg.n_val, cfg.n_test, image_size=cfg.image_size,
                                captions_per_image=cfg.captions_per_image, max_objects=cfg.max_objects)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string")),
                                  "objects": datasets.Value("string")})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({
            "id": [s["id"] for s in rows], "image": [s["image"] for s in rows],
            "captions": [s["captions"] for s in rows], "objects": [json.dumps(s["objects"]) for s in rows],
        }, features=features)
        for name, rows in splits.items()})


def synthetic_audio_dataset(cfg: PrepareConfig) -> Any:
    """The default audio data as a `datasets.DatasetDict` (id, audio as FLAC bytes, captions, events as JSON)."""
    import datasets

    from ..data.synthetic_audio import generate_synthetic_audio

    a = cfg.audio
    splits = generate_synthetic_audio(a.seed, a.n_train, a.n_val, a.n_test, captions_per_clip=a.captions_per_clip,
                                      max_events=a.max_events)
    features = datasets.Features({"id": datasets.Value("string"), "audio": datasets.Value("binary"),
                                  "captions": datasets.List(datasets.Value("string")),
                                  "events": datasets.Value("string")})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({
            "id": [c["id"] for c in clips], "audio": [flac_bytes(c["audio"], c["sampling_rate"]) for c in clips],
            "captions": [c["captions"] for c in clips], "events": [json.dumps(c["events"]) for c in clips],
        }, features=features)
        for name, clips in splits.items()})


def user_dataset(cfg: PrepareConfig, work_dir: Path) -> tuple[Any, dict[str, int]]:
    """An hf / imagefolder / webdataset image source as a checked `datasets.DatasetDict` (id, image, captions)
    + skipped counts."""
    import datasets

    skipped: Counter = Counter()

    def clean(split: Any, role: str) -> Any:
        good, counts = clean_split(split, role, cfg.on_bad_sample, work_dir / f"{role}.arrow", cfg.num_workers)
        skipped.update(counts)
        return good

    splits, where = load_source(cfg, clean, work_dir)
    check_not_empty(splits, where, after=f" left after skipping bad samples ({dict(skipped)})" if skipped else "")
    log.info("%s: %s images (%d bad samples skipped)", where, split_sizes(splits), sum(skipped.values()))
    return datasets.DatasetDict(splits), dict(sorted(skipped.items()))


def user_audio_dataset(cfg: PrepareConfig, encoder: Any) -> tuple[Any, dict[str, int]]:
    """An hf / audiofolder audio source, decoded at the encoder's rate and cut to its window, as a checked
    `datasets.DatasetDict` (id, audio as FLAC bytes, captions) + skipped counts (and `truncated`)."""
    import datasets

    from ..data.audio_sources import load_audio_source

    splits, skipped, truncated, where = load_audio_source(cfg.audio, encoder.sampling_rate, encoder.window_seconds)
    log.info("%s: %s clips (%d bad samples skipped, %d cut to the %g s window)", where, split_sizes(splits),
             sum(skipped.values()), truncated, encoder.window_seconds)
    return datasets.DatasetDict(splits), {**dict(sorted(skipped.items())), "truncated": truncated}


@dataclass(frozen=True)
class Recipe:
    """What prepare needs to know of one modality: its params, builtin stand-in and data sources."""

    model: str  # the models.<key> value
    builtin: str  # the offline stand-in's name
    build_builtin: Callable[[Path], Path]  # build the stand-in into a directory
    encoder_kwargs: dict[str, Any]  # pooling, grid
    batch_size: int
    source: str
    on_bad_sample: str
    synthetic: Callable[[], tuple[Any, dict[str, int]]]
    user: Callable[[Path, Any], tuple[Any, dict[str, int]]]  # (work dir, encoder) -> dataset, skipped


def recipe(modality: str, models: ModelsConfig, cfg: PrepareConfig) -> Recipe:
    if modality == "audio":
        from ..standins.tiny_whisper import build_tiny_whisper

        a = cfg.audio
        return Recipe(models.audio, BUILTIN_AUDIO, lambda d: build_tiny_whisper(d / "tiny-whisper", a.tiny_whisper),
                      {"pooling": a.pooling, "grid": a.grid}, a.batch_size, a.source, a.on_bad_sample,
                      lambda: (synthetic_audio_dataset(cfg), {"truncated": 0}),
                      lambda work, enc: user_audio_dataset(cfg, enc))
    from ..standins.tiny_clip import build_tiny_clip

    return Recipe(models.vision, BUILTIN_VISION,
                  lambda d: build_tiny_clip(d / "tiny-clip", cfg.tiny_clip, cfg.image_size),
                  {"pooling": cfg.vision_pooling, "grid": cfg.vision_grid}, cfg.batch_size, cfg.source,
                  cfg.on_bad_sample, lambda: (synthetic_dataset(cfg), {}), lambda work, enc: user_dataset(cfg, work))


def build_models(r: Recipe, models: ModelsConfig, out_dir: Path) -> dict[str, str]:
    """Build the modality's `builtin:` stand-in into out_dir; return the resolved name/path of both encoders."""
    resolved = {"encoder": r.model, "text": models.text}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if r.model == r.builtin:
            resolved["encoder"] = str(out_dir / r.build_builtin(tmp).name)
        (tmp / "models.json").write_text(json.dumps(resolved, indent=2) + "\n")
    return resolved


def write_disabled(modality: str, dataset_dir: Path, models_dir: Path, features_dir: Path, report_path: Path
                   ) -> dict[str, Any]:
    """A modality that is off (modalities.<name>: false) leaves marked-empty outputs: DVC has its outs, the
    later stages skip it."""
    report = {"modality": modality, "enabled": False}
    for d in (dataset_dir, models_dir, features_dir):
        with atomic_path(d) as tmp:
            tmp.mkdir()
            write_json(tmp / ("fingerprint.json" if d == features_dir else "disabled.json"), report)
    write_json(report_path, report)
    log.info("prepare: modality '%s' is off (modalities.%s: false): nothing to do", modality, modality)
    return report


def run(models: ModelsConfig, cfg: PrepareConfig, dataset_dir: Path, models_dir: Path, features_dir: Path,
        report_path: Path, tracker: Any, modality: str = "image", enabled: bool = True) -> dict[str, Any]:
    """Under `accelerate launch` with N processes, rank 0 builds the dataset and the stand-in, then
    every rank encodes its share of the batches (features.build_feature_cache) and rank 0 writes."""
    import datasets

    if not enabled:
        return write_disabled(modality, dataset_dir, models_dir, features_dir, report_path) \
            if distributed.is_main_process() else {}
    r, column = recipe(modality, models, cfg), spec(modality).column
    main = distributed.is_main_process()
    work = dataset_dir.parent / f".{dataset_dir.name}.work"  # beside the outputs (real datasets are large)
    try:
        if main:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            build_models(r, models, models_dir)
        distributed.barrier()
        resolved = read_json(models_dir / "models.json")
        encoder = spec(modality).encoder_class()(resolved["encoder"], trust_remote_code=models.trust_remote_code,
                                                 **r.encoder_kwargs)
        if main:
            dataset, skipped = r.synthetic() if r.source == "synthetic" else r.user(work, encoder)
            dataset.save_to_disk(str(work / "full"))
        distributed.barrier()
        dataset = datasets.load_from_disk(str(work / "full"))  # re-open: fingerprints/media now come from disk
        text = FrozenTextEncoder(resolved["text"], models.trust_remote_code)
        encoder.to(get_device())
        text.to(get_device())
        fingerprint = build_feature_cache(dataset, encoder, text, features_dir, r.batch_size, cfg.num_workers,
                                          cfg.feature_dtype, modality, cfg.mixed_precision)
        if not main:
            return {}
        # Later stages read captions and ids; the media only of the test split (evaluate's figures): no second
        # copy of the training images (benchmarks/bench_prepare_disk.py measures the ratio).
        lean = datasets.DatasetDict({name: split if name == "test" else split.remove_columns(column)
                                     for name, split in dataset.items()})
        with atomic_path(dataset_dir) as tmp:
            lean.save_to_disk(str(tmp))
    finally:
        if main:
            shutil.rmtree(work, ignore_errors=True)
    truncated = skipped.pop("truncated", None)  # clips cut to the encoder window (audio sources): kept, counted
    report = {
        "modality": modality, "enabled": True, "source": r.source,
        "splits": {name: {"items": len(split), "captions": sum(len(c) for c in split["captions"])}
                   for name, split in dataset.items()},
        "on_bad_sample": r.on_bad_sample,
        "skipped": skipped,
        **({"truncated": truncated} if truncated is not None else {}),
        "models": resolved,
        "dim": fingerprint["dim"], "text_dim": fingerprint["text_dim"],
        "mixed_precision": fingerprint["mixed_precision"],  # what `auto` resolved to on this machine
    }
    write_json(report_path, report)
    tracker.log_metrics({f"{name}_{k}": v for name, s in report["splits"].items() for k, v in s.items()})
    tracker.log_metrics({"skipped": {**skipped, "total": sum(skipped.values())}, "truncated": truncated or 0})
    tracker.log_artifact(report_path)
    return report

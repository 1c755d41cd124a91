"""prepare: dataset (synthetic, hf or imagefolder) -> HF `datasets` on disk; the builtin stand-in vision
tower; frozen-encoder feature cache; a report with split sizes and bad samples skipped by reason.

The LLM is not touched here (stage `llm`), so changing it never re-extracts a feature."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import BUILTIN_VISION, ModelsConfig, PrepareConfig
from ..data.features import build_feature_cache
from ..data.samples import clean_split
from ..data.sources import check_not_empty, load_source, split_sizes
from ..models.encoders import FrozenTextEncoder, FrozenVisionEncoder
from ..standins.tiny_clip import build_tiny_clip
from ..training import distributed
from ..utils import atomic_path, get_device, read_json, write_json

log = logging.getLogger(__name__)


def synthetic_dataset(cfg: PrepareConfig) -> Any:
    """The default data as a `datasets.DatasetDict` (id, image, captions, objects as JSON)."""
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


def user_dataset(cfg: PrepareConfig, work_dir: Path) -> tuple[Any, dict[str, int]]:
    """An hf / imagefolder source as a checked `datasets.DatasetDict` (id, image, captions) + skipped counts."""
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


def build_models(models: ModelsConfig, cfg: PrepareConfig, out_dir: Path) -> dict[str, str]:
    """Build the `builtin:` vision stand-in into out_dir; return the resolved name/path of both encoders."""
    resolved = {"vision": models.vision, "text": models.text}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if models.vision == BUILTIN_VISION:
            build_tiny_clip(tmp / "tiny-clip", cfg.tiny_clip, cfg.image_size)
            resolved["vision"] = str(out_dir / "tiny-clip")
        (tmp / "models.json").write_text(json.dumps(resolved, indent=2) + "\n")
    return resolved


def run(models: ModelsConfig, cfg: PrepareConfig, dataset_dir: Path, models_dir: Path, features_dir: Path,
        report_path: Path, tracker: Any) -> dict[str, Any]:
    """Under `accelerate launch` with N processes, rank 0 builds the dataset and the stand-in, then
    every rank encodes its share of the batches (features.build_feature_cache) and rank 0 writes."""
    import datasets

    main = distributed.is_main_process()
    work = dataset_dir.parent / f".{dataset_dir.name}.work"  # beside the outputs (real datasets are large)
    try:
        if main:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            dataset, skipped = (synthetic_dataset(cfg), {}) if cfg.source == "synthetic" else user_dataset(cfg, work)
            dataset.save_to_disk(str(work / "full"))
            build_models(models, cfg, models_dir)
        distributed.barrier()
        resolved = read_json(models_dir / "models.json")
        dataset = datasets.load_from_disk(str(work / "full"))  # re-open: fingerprints/images now come from disk
        vision = FrozenVisionEncoder(resolved["vision"], models.trust_remote_code, cfg.vision_pooling,
                                     cfg.vision_grid)
        text = FrozenTextEncoder(resolved["text"], models.trust_remote_code)
        vision.to(get_device())
        text.to(get_device())
        fingerprint = build_feature_cache(dataset, vision, text, features_dir, cfg.batch_size, cfg.num_workers,
                                          cfg.feature_dtype)
        if not main:
            return {}
        # Later stages read captions and ids; images only of the test split (evaluate's figures): no second
        # copy of the training images (benchmarks/bench_prepare_disk.py measures the ratio).
        lean = datasets.DatasetDict({name: split if name == "test" else split.remove_columns("image")
                                     for name, split in dataset.items()})
        with atomic_path(dataset_dir) as tmp:
            lean.save_to_disk(str(tmp))
    finally:
        if main:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "source": cfg.source,
        "splits": {name: {"images": len(split), "captions": sum(len(c) for c in split["captions"])}
                   for name, split in dataset.items()},
        "on_bad_sample": cfg.on_bad_sample,
        "skipped": skipped,
        "models": resolved,
        "vision_dim": fingerprint["vision_dim"], "text_dim": fingerprint["text_dim"],
    }
    write_json(report_path, report)
    tracker.log_metrics({f"{name}_{k}": v for name, s in report["splits"].items() for k, v in s.items()})
    tracker.log_metrics({"skipped": {**skipped, "total": sum(skipped.values())}})
    tracker.log_artifact(report_path)
    return report

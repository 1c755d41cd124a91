"""align: train the Phase 1 adapters from the feature caches of the enabled modalities; keep the best
checkpoint by val R@1 (the mean over modalities and both directions)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..config import AlignerConfig, AlignmentConfig, EncoderSpec, part
from ..data.dataset import FeaturePairBatches, PairBatches
from ..data.features import Features, load_features
from ..metrics import retrieval_metrics
from ..modalities import modality as spec
from ..models.aligner import VisionTextAligner
from ..training import distributed
from ..training.train import train_alignment
from ..utils import get_device, read_json, set_seed
from .common import state_options, write_history

log = logging.getLogger(__name__)


def val_retrieval(model: VisionTextAligner, feats: dict[str, Features]) -> dict[str, float]:
    """R@k both ways per modality (i2t, t2i, a2t, ...) and their mean R@1 (what picks the kept epoch)."""
    out: dict[str, float] = {}
    for m, f in feats.items():
        x = spec(m).letter
        r = retrieval_metrics(*model.embed_features(f.items, f.text, modality=m), f.text_to_item)
        out |= {f"val/{x}2t_{k}" if d == "i2t" else f"val/t2{x}_{k}": v
                for d in ("i2t", "t2i") for k, v in r[d].items() if k[0] == "R"}
    r1 = [v for k, v in out.items() if k.endswith("_R1")]
    out["val/mean_R1"] = sum(r1) / len(r1)
    return out


def clamp_batch_size(cfg: AlignmentConfig, n_images: int, world: int, what: str = "images") -> int:
    """A batch larger than the training split (small data on the defaults) shrinks to the split, with a
    warning; under N processes it must stay a multiple of N (each rank takes an equal share)."""
    if n_images < max(2, world):
        raise ValueError(f"align needs at least {max(2, world)} training {what} (a contrastive batch needs "
                         f"negatives), the feature cache has {n_images}: add data or change the split ratios")
    size = cfg.batch_size
    if size > n_images:
        size = n_images // world * world
        log.warning("align.batch_size=%d is larger than the %d training %s: training with batches of %d",
                    cfg.batch_size, n_images, what, size)
    if size % world:
        raise ValueError(f"align.batch_size={size} must be a multiple of the {world} processes (each rank takes an "
                         "equal share of the global batch)")
    return size


def encoders_config(cfg: AlignmentConfig, caches: dict[str, Path], modalities: list[str]) -> AlignmentConfig:
    """The frozen encoders as the feature caches of `modalities` were made (models, pooling, sizes)."""
    fps = {m: read_json(caches[m] / "fingerprint.json") for m in modalities}
    for m, fp in fps.items():
        if "files" not in fp or fp.get("modality", "image") != m:
            raise ValueError(f"feature cache {caches[m]} holds no {m} features (modalities.{m} was off when it was "
                             f"prepared): run `dvc repro` so prepare re-runs")
    text = {fp["text_model"] for fp in fps.values()}
    if len(text) > 1:
        raise ValueError(f"the feature caches were made with different text encoders ({sorted(text)}): re-run prepare")
    image = fps.get("image")
    return dataclasses.replace(
        cfg, modalities=list(modalities), text_model_name=text.pop(), text_dim=next(iter(fps.values()))["text_dim"],
        encoders={m: EncoderSpec(fp["model"], fp["dim"], fp["pooling"], fp["grid"]) for m, fp in fps.items()
                  if m != "image"},
        **({"vision_model_name": image["model"], "vision_dim": image["dim"], "vision_pooling": image["pooling"],
            "vision_grid": image["grid"]} if image else {}))


def run(cfg: AlignmentConfig, caches: dict[str, Path], modalities: list[str], out_dir: Path, plots_dir: Path,
        tracker: Any, state_dir: Path | None = None) -> dict[str, Any]:
    """caches: feature cache directory per modality; modalities: the enabled ones (modalities: in params)."""
    cfg = encoders_config(cfg, caches, modalities)
    # Streamed: a batch of features in memory at a time, however large the cache (benchmarks/bench_memory.py).
    train = {m: load_features(caches[m], "train", stream=True) for m in modalities}
    val = {m: load_features(caches[m], "val", stream=True) for m in modalities}
    world = distributed.world_size()
    sizes = {m: clamp_batch_size(cfg, f.num_items, world, f"{spec(m).noun}s") for m, f in train.items()}
    set_seed(cfg.seed)
    model = VisionTextAligner(part(cfg, AlignerConfig), device=get_device())
    loaders = {m: FeaturePairBatches(f.items, f.text, f.text_to_item, sizes[m], seed=cfg.seed)
               for m, f in train.items()}
    loader = PairBatches(loaders)  # one modality: exactly its FeaturePairBatches' batches
    for m in modalities:
        log.info("align %s: %d train, %d val %ss, %d steps/epoch of %d (%d processes)", m, train[m].num_items,
                 val[m].num_items, spec(m).noun, len(loaders[m]), sizes[m], world)
    history = train_alignment(
        model, loader, cfg=cfg, evaluate=lambda: val_retrieval(model, val), monitor="val/mean_R1",
        save_best=lambda epoch: model.save_pretrained(out_dir), checkpoint=str(out_dir), on_log=tracker.log_metrics,
        **state_options(cfg, state_dir, {m: read_json(caches[m] / "fingerprint.json")["files"] for m in modalities}))
    write_history(history, plots_dir, tracker, "align", "val/mean_R1")
    return history

"""align: train the Phase 1 adapters from the feature cache; keep the best checkpoint by val R@1."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any


from ..config import AlignerConfig, AlignmentConfig, part
from ..data.dataset import FeaturePairBatches
from ..data.features import Features, load_features
from ..metrics import retrieval_metrics
from ..models.aligner import VisionTextAligner
from ..training import distributed
from ..training.train import train_alignment
from ..utils import get_device, read_json, set_seed
from .common import state_options, write_history

log = logging.getLogger(__name__)


def val_retrieval(model: VisionTextAligner, feats: Features) -> dict[str, float]:
    m = retrieval_metrics(*model.embed_features(feats.vision, feats.text), feats.text_to_image)
    out = {f"val/{d}_{k}": v for d in ("i2t", "t2i") for k, v in m[d].items() if k[0] == "R"}
    out["val/mean_R1"] = (m["i2t"]["R1"] + m["t2i"]["R1"]) / 2
    return out


def clamp_batch_size(cfg: AlignmentConfig, n_images: int, world: int) -> AlignmentConfig:
    """A batch larger than the training split (small data on the defaults) shrinks to the split, with a
    warning; under N processes it must stay a multiple of N (each rank takes an equal share)."""
    if n_images < max(2, world):
        raise ValueError(f"align needs at least {max(2, world)} training images (a contrastive batch needs "
                         f"negatives), the feature cache has {n_images}: add data or change prepare.split_ratios")
    size = cfg.batch_size
    if size > n_images:
        size = n_images // world * world
        log.warning("align.batch_size=%d is larger than the %d training images: training with batches of %d",
                    cfg.batch_size, n_images, size)
    if size % world:
        raise ValueError(f"align.batch_size={size} must be a multiple of the {world} processes (each rank takes an "
                         "equal share of the global batch)")
    return dataclasses.replace(cfg, batch_size=size)


def run(cfg: AlignmentConfig, features_dir: Path, out_dir: Path, plots_dir: Path, tracker: Any,
        state_dir: Path | None = None) -> dict[str, Any]:
    fp = read_json(features_dir / "fingerprint.json")
    cfg = dataclasses.replace(cfg, vision_model_name=fp["vision_model"], text_model_name=fp["text_model"],
                              vision_dim=fp["vision_dim"], text_dim=fp["text_dim"],
                              vision_pooling=fp["vision_pooling"], vision_grid=fp["vision_grid"])
    # Streamed: a batch of features in memory at a time, however large the cache (benchmarks/bench_memory.py).
    train, val = load_features(features_dir, "train", stream=True), load_features(features_dir, "val", stream=True)
    cfg = clamp_batch_size(cfg, train.num_images, distributed.world_size())
    set_seed(cfg.seed)
    model = VisionTextAligner(part(cfg, AlignerConfig), device=get_device())
    loader = FeaturePairBatches(train.vision, train.text, train.text_to_image, cfg.batch_size, seed=cfg.seed)
    log.info("align: %d train images, %d val images, %d steps/epoch of %d (%d processes)", train.num_images,
             val.num_images, len(loader), cfg.batch_size, distributed.world_size())
    history = train_alignment(
        model, loader, cfg=cfg, evaluate=lambda: val_retrieval(model, val), monitor="val/mean_R1",
        save_best=lambda epoch: model.save_pretrained(out_dir), checkpoint=str(out_dir), on_log=tracker.log_metrics,
        **state_options(cfg, state_dir, fp["files"]))
    write_history(history, plots_dir, tracker, "align", "val/mean_R1")
    return history

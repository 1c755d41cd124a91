"""project: train the vision-to-LLM projector from the feature cache; keep the best by val loss."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .. import distributed
from ..aligner import VisionTextAligner
from ..config import LLMConfig, ProjectTrainConfig
from ..data.dataset import CaptionBatches
from ..features import load_features, sha256
from ..llm import MultimodalLLM
from ..train import mean_caption_loss, train_projector
from ..utils import get_device, read_json, set_seed
from .common import state_options, write_history

log = logging.getLogger(__name__)


def caption_ids(tokenizer: Any, dataset_split: Any) -> list[list[int]]:
    """All captions of a split, flattened in the feature cache's order, as token ids (no specials)."""
    flat = [c for caps in dataset_split["captions"] for c in caps]
    return tokenizer(flat, add_special_tokens=False)["input_ids"]


def run(llm_cfg: LLMConfig, cfg: ProjectTrainConfig, aligner_dir: Path, features_dir: Path, dataset_dir: Path,
        out_dir: Path, plots_dir: Path, tracker: Any, state_dir: Path | None = None) -> dict[str, Any]:
    import datasets

    set_seed(cfg.seed)
    model = MultimodalLLM(VisionTextAligner.from_pretrained(aligner_dir), llm_cfg).to(get_device())
    ds = datasets.load_from_disk(str(dataset_dir))
    loaders = {}
    for split in ("train", "val"):
        feats = load_features(features_dir, split, stream=True)
        ids = caption_ids(model.tokenizer, ds[split].select_columns(["captions"]))
        loaders[split] = CaptionBatches(feats.vision, ids, feats.text_to_image, cfg.batch_size, seed=cfg.seed,
                                        shuffle=split == "train", group_by_length=cfg.group_by_length)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("project: %d trainable parameters, %d train captions, %d steps/epoch (%d processes)", n_train,
             len(loaders["train"].captions), len(loaders["train"]), distributed.world_size())
    tracker.log_metrics({"trainable_params": n_train})
    history = train_projector(
        model, loaders["train"], cfg, evaluate=lambda: {"val/loss": mean_caption_loss(model, loaders["val"])},
        monitor="val/loss", mode="min", save_best=lambda epoch: model.save_pretrained(out_dir), checkpoint=str(out_dir),
        on_log=tracker.log_metrics,
        **state_options(cfg, state_dir, dataclasses.asdict(llm_cfg), sha256(aligner_dir / "model.safetensors"), read_json(
            features_dir / "fingerprint.json")["files"]))
    write_history(history, plots_dir, tracker)
    return history

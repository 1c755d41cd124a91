"""project: train the vision-to-LLM projector from the feature cache; keep the best by val loss."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import LLMConfig, ProjectConfig, part
from ..data.dataset import CaptionBatches
from ..data.features import load_features, sha256
from ..metrics import distinct_share
from ..models.aligner import VisionTextAligner
from ..models.llm import MultimodalLLM
from ..training import distributed
from ..training.train import mean_caption_loss, train_projector
from ..utils import get_device, read_json, set_seed
from .common import state_options, write_history

log = logging.getLogger(__name__)


def caption_ids(tokenizer: Any, dataset_split: Any) -> list[list[int]]:
    """All captions of a split, flattened in the feature cache's order, as token ids (no specials)."""
    flat = [c for caps in dataset_split["captions"] for c in caps]
    return tokenizer(flat, add_special_tokens=False)["input_ids"]


def caption_watch(model: MultimodalLLM, vision: torch.Tensor, ids: list[str], references: list[str], tracker: Any,
                  max_new_tokens: int) -> tuple[Callable[[], dict[str, float]], Callable[[dict, int], None]]:
    """Greedy captions of fixed val images after each epoch: an MLflow table (log_table's JSON layout) per
    epoch and their distinct share as `val/distinct`, so a collapse to one caption shows in epoch 1.

    vision (n, Dv). Returns (evaluate part, on_log hook that tracks the step the tables are named by).
    """
    at = {"step": 0}

    def watch() -> dict[str, float]:
        with torch.no_grad():  # the full z: in training mode a Matryoshka model would draw a dim per row
            prefix = model.prefix_from_features(vision, model.aligner.cfg.d_align)
            caps = model.generate_from_prefix(prefix, max_new_tokens=max_new_tokens)
        table = {"columns": ["step", "id", "generated", "reference"],
                 "data": [[at["step"], i, c, r] for i, c, r in zip(ids, caps, references)]}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{at['step']:06d}.json"
            path.write_text(json.dumps(table, indent=1))
            tracker.log_artifact(path, "watch_captions")
        return {"val/distinct": distinct_share(caps)}

    def on_log(row: dict, step: int) -> None:
        at["step"] = step
        tracker.log_metrics(row, step)
    return watch, on_log


def run(cfg: ProjectConfig, aligner_dir: Path, features_dir: Path, dataset_dir: Path, out_dir: Path, plots_dir: Path,
        tracker: Any, state_dir: Path | None = None) -> dict[str, Any]:
    import datasets

    set_seed(cfg.seed)
    llm_cfg = part(cfg, LLMConfig)
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
    watch, on_log = lambda: {}, tracker.log_metrics
    if n := min(cfg.watch_images, len(ds["val"])):
        val = ds["val"].select(range(n)).select_columns(["id", "captions"])
        watch, on_log = caption_watch(model, loaders["val"].vision[torch.arange(n)], val["id"],
                                      [caps[0] for caps in val["captions"]], tracker, llm_cfg.max_caption_tokens)
    history = train_projector(
        model, loaders["train"], cfg, evaluate=lambda: {"val/loss": mean_caption_loss(model, loaders["val"]), **watch()},
        monitor="val/loss", mode="min", save_best=lambda epoch: model.save_pretrained(out_dir), checkpoint=str(out_dir),
        on_log=on_log,
        **state_options(cfg, state_dir, sha256(aligner_dir / "model.safetensors"),
                        read_json(features_dir / "fingerprint.json")["files"]))
    write_history(history, plots_dir, tracker, "project", "val/loss")
    return history

"""project: train the projector (aligned embedding z -> LLM prefix) on the captions of every enabled modality,
from the feature caches; keep the best by val loss."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import LLMConfig, ProjectConfig, part
from ..data.dataset import CaptionBatches, MixedBatches
from ..data.features import load_features, sha256
from ..metrics import distinct_share
from ..modalities import modality as spec
from ..models.aligner import VisionTextAligner
from ..models.llm import MultimodalLLM
from ..training import distributed
from ..training.train import mean_caption_loss, train_projector
from ..utils import get_device, read_json, set_seed
from .common import IMAGE_ONLY, state_options, write_history

log = logging.getLogger(__name__)


def caption_ids(tokenizer: Any, dataset_split: Any) -> list[list[int]]:
    """All captions of a split, flattened in the feature cache's order, as token ids (no specials)."""
    flat = [c for caps in dataset_split["captions"] for c in caps]
    return tokenizer(flat, add_special_tokens=False)["input_ids"]


def caption_watch(model: MultimodalLLM, z: dict[str, torch.Tensor], ids: dict[str, list[str]],
                  references: dict[str, list[str]], tracker: Any, max_new_tokens: int
                  ) -> tuple[Callable[[], dict[str, float]], Callable[[dict, int], None]]:
    """Greedy captions of fixed val items of each modality after each epoch: an MLflow table (log_table's JSON
    layout) per epoch and their distinct share as `val/distinct` (`val/audio_distinct`, ...), so a collapse to
    one caption shows in epoch 1.

    z: {modality: (n, d) aligned embeddings}. Returns (evaluate part, on_log hook that tracks the step the
    tables are named by).
    """
    at = {"step": 0}

    def watch() -> dict[str, float]:
        out, rows = {}, []
        for m, zm in z.items():
            with torch.no_grad():  # the full z: in training mode a Matryoshka model would draw a dim per row
                caps = model.generate_from_prefix(model.prefix_from_z(zm), model.cfg.prompt_for(m),
                                                  max_new_tokens=max_new_tokens)
            rows += [[at["step"], m, i, c, r] for i, c, r in zip(ids[m], caps, references[m])]
            out[f"val/{spec(m).prefix}distinct"] = distinct_share(caps)
        table = {"columns": ["step", "modality", "id", "generated", "reference"], "data": rows}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{at['step']:06d}.json"
            path.write_text(json.dumps(table, indent=1))
            tracker.log_artifact(path, "watch_captions")
        return out

    def on_log(row: dict, step: int) -> None:
        at["step"] = step
        tracker.log_metrics(row, step)
    return watch, on_log


def caption_loaders(model: MultimodalLLM, cfg: ProjectConfig, caches: dict[str, Path], datasets_: dict[str, Any],
                    split: str) -> dict[str, CaptionBatches]:
    """Per modality, batches of (z, caption ids) of a split: z computed once per item by the frozen aligner
    (not once per caption and epoch), captions tokenised once."""
    out = {}
    for m, cache in caches.items():
        feats = load_features(cache, split, stream=True)
        z = model.aligner.embed_features(feats.items, modality=m)  # (N, d_align)
        ids = caption_ids(model.tokenizer, datasets_[m][split].select_columns(["captions"]))
        out[m] = CaptionBatches(z, ids, feats.text_to_item, cfg.batch_size, seed=cfg.seed, shuffle=split == "train",
                                group_by_length=cfg.group_by_length, key="z", modality=m,
                                one_per_item=split == "train" and cfg.caption_sampling == "one")
    return out


def run(cfg: ProjectConfig, aligner_dir: Path, caches: dict[str, Path], dataset_dirs: dict[str, Path], out_dir: Path,
        plots_dir: Path, tracker: Any, state_dir: Path | None = None) -> dict[str, Any]:
    """caches / dataset_dirs: feature cache and dataset directory of each enabled modality."""
    import datasets

    set_seed(cfg.seed)
    llm_cfg = part(cfg, LLMConfig)
    model = MultimodalLLM(VisionTextAligner.from_pretrained(aligner_dir), llm_cfg).to(get_device())
    missing = [m for m in caches if m not in model.aligner.modalities]
    if missing:
        raise ValueError(f"the aligner {aligner_dir} has no {missing[0]} adapter (trained with modalities "
                         f"{model.aligner.modalities}): run `dvc repro` so align re-runs")
    ds = {m: datasets.load_from_disk(str(d)) for m, d in dataset_dirs.items()}
    loaders = {split: caption_loaders(model, cfg, caches, ds, split) for split in ("train", "val")}
    train = next(iter(loaders["train"].values())) if len(caches) == 1 else \
        MixedBatches(loaders["train"], cfg.seed, cfg.modality_passes)
    val = next(iter(loaders["val"].values())) if len(caches) == 1 else MixedBatches(loaders["val"], cfg.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("project: %d trainable parameters, %s train captions, %d steps/epoch (%d processes)", n_train,
             " + ".join(f"{len(ls.captions)} {m}" for m, ls in loaders["train"].items()), len(train),
             distributed.world_size())
    tracker.log_metrics({"trainable_params": n_train})
    watch, on_log = lambda: {}, tracker.log_metrics
    sizes = {m: min(cfg.watch_images, len(ds[m]["val"])) for m in caches}
    if any(sizes.values()):
        picked = {m: ds[m]["val"].select(range(n)).select_columns(["id", "captions"]) for m, n in sizes.items() if n}
        watch, on_log = caption_watch(model, {m: loaders["val"][m].vision[:n] for m, n in sizes.items() if n},
                                      {m: p["id"] for m, p in picked.items()},
                                      {m: [caps[0] for caps in p["captions"]] for m, p in picked.items()},
                                      tracker, llm_cfg.max_caption_tokens)
    history = train_projector(
        model, train, cfg, evaluate=lambda: {"val/loss": mean_caption_loss(model, val), **watch()},
        monitor="val/loss", mode="min", save_best=lambda epoch: model.save_pretrained(out_dir), checkpoint=str(out_dir),
        on_log=on_log,
        **state_options(cfg, state_dir, sha256(aligner_dir / "model.safetensors"),
                        *(read_json(c / "fingerprint.json")["files"] for c in caches.values())))
    write_history(history, plots_dir, tracker, "project", "val/loss")
    if cfg.zero_shot_check and "image" in caches and len(caches) > 1:
        zero_shot_projector(cfg, model.aligner, loaders, out_dir / IMAGE_ONLY, tracker)
    return history


def zero_shot_projector(cfg: ProjectConfig, aligner: VisionTextAligner, loaders: dict[str, dict[str, Any]],
                        out_dir: Path, tracker: Any) -> None:
    """The same recipe (seed, schedule, batches) on the image captions alone: a projector that never saw audio.
    evaluate feeds it audio embeddings to see whether the aligned space transfers (`zero_shot` in the audio
    captioning metrics). Its curves go to MLflow under `image_only/`."""
    set_seed(cfg.seed)
    solo = MultimodalLLM(aligner, part(cfg, LLMConfig)).to(get_device())
    log.info("project: training the image-only projector of the zero-shot check (project.zero_shot_check)")
    train_projector(solo, loaders["train"]["image"], cfg,
                    evaluate=lambda: {"val/loss": mean_caption_loss(solo, loaders["val"]["image"])},
                    monitor="val/loss", mode="min", save_best=lambda epoch: solo.save_pretrained(out_dir),
                    checkpoint=str(out_dir),
                    on_log=lambda row, step: tracker.log_metrics({f"image_only/{k}": v for k, v in row.items()}, step))

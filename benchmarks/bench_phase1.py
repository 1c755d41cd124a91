"""Benchmark 1: Phase 1 training throughput, feature cache vs frozen encoders on every batch.

A (the seed's design): ImageTextDataset + create_dataloader; every step preprocesses the PIL
images and runs the frozen tiny CLIP and MiniLM, then trains the adapters.
B (this project): the same models run once (encode_split), then steps read FeaturePairBatches.
Same aligner config and batch size (params.yaml `align`), same loss and optimiser (`fit`).

    python benchmarks/bench_phase1.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import Row, build_default_clip, default_params, print_rows, timed

N_IMAGES = 768  # reduced from the default 3000 training images to keep the run short
SEED_STEPS = 3  # steps of the encoder-per-batch path (after 1 warm-up step)
CACHE_EPOCHS = 8  # epochs of the cache path (N_IMAGES // batch steps each)


def run() -> dict:
    import datasets
    import torch

    from mmalign.models.aligner import VisionTextAligner
    from mmalign.config import AlignmentConfig
    from mmalign.data.dataset import FeaturePairBatches, ImageTextDataset, create_dataloader
    from mmalign.data.synthetic import generate_synthetic
    from mmalign.models.encoders import FrozenTextEncoder, FrozenVisionEncoder
    from mmalign.data.features import encode_split
    from mmalign.training.train import train_alignment

    p = default_params()
    prep, align = p["prepare"], dict(p["align"])
    bs = align["batch_size"]
    rows = generate_synthetic(0, N_IMAGES, 0, 0, image_size=prep["image_size"],
                              captions_per_image=prep["captions_per_image"], max_objects=prep["max_objects"])["train"]
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = build_default_clip(Path(tmp))
        vision = FrozenVisionEncoder(str(clip_dir), pooling=prep["vision_pooling"], grid=prep["vision_grid"])
        text = FrozenTextEncoder(p["models"]["text"])
    for k in ("seed", "resume", "state_every"):
        align.pop(k)
    cfg = AlignmentConfig(vision_model_name=str(clip_dir), text_model_name=p["models"]["text"],
                          vision_dim=vision.dim, text_dim=text.dim, vision_pooling=prep["vision_pooling"],
                          vision_grid=prep["vision_grid"], **align)

    # B: the cache. Its one-time cost is reported, not counted in the training rate.
    split = datasets.Dataset.from_dict({"image": [r["image"] for r in rows], "captions": [r["captions"] for r in rows]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "captions": datasets.List(datasets.Value("string"))}))
    t_cache, feats = timed(lambda: encode_split(split, vision, text, batch_size=prep["batch_size"]))

    def cache_run(epochs: int) -> int:
        torch.manual_seed(0)
        model = VisionTextAligner(cfg)
        loader = FeaturePairBatches(feats["vision"], feats["text"], feats["text_to_image"], bs, seed=0)
        train_alignment(model, loader, num_epochs=epochs, progress=False)
        return epochs * len(loader)

    # A: encoders on every batch, through the seed's dataset/loader and the raw-image branch of the loss.
    def seed_run(steps: int) -> int:
        torch.manual_seed(0)
        model = VisionTextAligner(cfg, vision_encoder=vision, text_encoder=text)
        dataset = ImageTextDataset(rows[: steps * bs], seed=0)
        train_alignment(model, create_dataloader(dataset, batch_size=bs, seed=0), num_epochs=1, progress=False)
        return steps

    seed_run(1), cache_run(1)  # warm-up: lazy init, allocator, thread pools
    t_seed, seed_steps = timed(lambda: seed_run(SEED_STEPS))
    t_cached, cache_steps = timed(lambda: cache_run(CACHE_EPOCHS))
    a, b = seed_steps * bs / t_seed, cache_steps * bs / t_cached
    note = (f"{N_IMAGES} synthetic images (default 3000), batch {bs}, tiny CLIP 64 px grid-pooled (dim {vision.dim}) + "
            f"MiniLM (dim {text.dim}); A: {seed_steps} steps in {t_seed:.1f} s, B: {cache_steps} steps in "
            f"{t_cached:.1f} s. One-time cache build for these {N_IMAGES} images + {len(feats['text'])} captions: "
            f"{t_cache:.1f} s.")
    return {"rows": [Row("1. Phase 1 training", "encoders per batch", a, "feature cache", b, "samples/s", 20.0,
                         note=note)]}


if __name__ == "__main__":
    out = run()
    print_rows(out["rows"])
    for r in out["rows"]:
        print(r.note)

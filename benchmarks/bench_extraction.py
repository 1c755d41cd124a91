"""Benchmark 2: feature extraction, end to end vs the bare vision forward.

B (end to end): mmalign.data.features.encode_images, as `prepare` runs it, on a `datasets.Dataset` read
back from disk (PNG decode + CLIP preprocessing in the DataLoader, the next batch prepared in a
thread while the encoder runs the current one, forward, pooling), plus writing the features with
safetensors. A: the same FrozenVisionEncoder on pixel tensors stacked beforehand. Target: B/A >= 0.85.
Also reported: the same without the prefetch thread (serial), to show what the overlap buys.

This machine's speed drifts by up to 1.5x within seconds, so each round times the three passes back
to back (the order alternating between rounds) and the ratio is the median of the rounds' ratios.

    python benchmarks/bench_extraction.py
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from _common import Row, build_default_clip, default_params, print_rows, timed

N_IMAGES = 1024  # reduced from the default 3600 images (train + val + test)
ROUNDS = 15


def run() -> dict:
    import datasets
    import torch
    from safetensors.torch import save_file

    from mmalign.data.synthetic import generate_synthetic
    from mmalign.models.encoders import FrozenVisionEncoder
    from mmalign.data.features import encode_images

    prep = default_params()["prepare"]
    bs = prep["batch_size"]
    rows = generate_synthetic(0, N_IMAGES, 0, 0, image_size=prep["image_size"],
                              captions_per_image=prep["captions_per_image"], max_objects=prep["max_objects"])["train"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vision = FrozenVisionEncoder(str(build_default_clip(tmp)), pooling=prep["vision_pooling"],
                                     grid=prep["vision_grid"])
        # as prepare does: save_to_disk, then read back so images are PNG bytes decoded on access
        datasets.Dataset.from_dict({"image": [r["image"] for r in rows]},
                                   features=datasets.Features({"image": datasets.Image()})).save_to_disk(str(tmp / "ds"))
        split = datasets.load_from_disk(str(tmp / "ds"))
        pixels = [vision.preprocess([r["image"] for r in rows[i:i + bs]]) for i in range(0, N_IMAGES, bs)]

        @torch.inference_mode()
        def bare() -> None:
            torch.cat([vision(px) for px in pixels])

        def end_to_end(overlap: bool) -> None:
            feats = torch.cat(encode_images(split, vision, bs, num_workers=0, overlap=overlap))
            save_file({"vision": feats}, tmp / "vision.safetensors")

        passes = {"bare": bare, "overlapped": lambda: end_to_end(True), "serial": lambda: end_to_end(False)}
        for fn in passes.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in passes}
        for r in range(ROUNDS):
            for name in (list(passes) if r % 2 == 0 else list(reversed(passes))):
                times[name].append(timed(passes[name])[0])
    ratios = {k: [b / e for b, e in zip(times["bare"], times[k])] for k in ("overlapped", "serial")}
    rate = {k: N_IMAGES / statistics.median(v) for k, v in times.items()}
    out = []
    for k, target in (("overlapped", 0.85), ("serial", None)):
        r = ratios[k]
        note = (f"{N_IMAGES} synthetic 64 px PNGs, batch {bs}, tiny CLIP grid pooling, num_workers=0, torch threads "
                f"{torch.get_num_threads()}; {'prefetch thread (the default)' if k == 'overlapped' else 'no prefetch'}"
                f"; median of {ROUNDS} rounds' ratios (range {min(r):.2f}-{max(r):.2f}); rates are medians.")
        out.append(Row(f"2. Extraction ({k})", "bare forward", rate["bare"], "end to end", rate[k], "images/s", target,
                       ratio=statistics.median(r), note=note))
    return {"rows": out}


if __name__ == "__main__":
    res = run()
    print_rows(res["rows"])
    for r in res["rows"]:
        print(r.note)

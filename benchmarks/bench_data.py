"""Benchmark 7: what real-scale data costs on disk, and what a float16 feature cache costs in R@1.

A. Disk: a 10,000-image JPEG folder (the synthetic scenes with their 4 captions each, metadata.jsonl:
   the Hugging Face imagefolder layout) through the real `prepare` stage. Its outputs other than the
   feature cache (data/dataset + the report) against the source folder's bytes. Target: <= 0.2
   (prepare keeps captions and ids; images only of the test split). Two kinds of JPEG: "photo-like"
   (256 px with sensor-like noise, JPEG quality 90: tens of KB each, as photos are; COCO's average
   is ~160 KB) is the target's case; "flat" (160 px flat-colour scenes, ~3 KB each) is the worst
   case, where the captions weigh as much as the images. The text encoder here is a tiny
   sentence-transformers model built locally (BERT, hidden 32): what prepare keeps on disk does not
   depend on the encoders, and MiniLM over 40,000 captions would add minutes.
B. float16 cache: `prepare` on the default params, then the same cache stored as float16 (exactly what
   `prepare.feature_dtype: float16` writes: the float32 features rounded to half), `align` trained on
   each with the default params, and test retrieval (evaluate, retrieval only) on each. Reported: R@1
   both ways, float32 vs float16, and the cache's size.

    python benchmarks/bench_data.py [disk|fp16]      # both by default: ~8 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _common import ROOT, default_params

sys.path.insert(0, str(ROOT / "tests"))
from helpers.tiny_models import tiny_sentence_transformer  # noqa: E402  (shared with the tests)

N_IMAGES = 10_000


def stage(name: str, args: list[str], cwd: Path, params: dict) -> None:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / f"stages/{name}.py"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


PREPARE = ["--dataset", "data/dataset", "--models", "models/builtin", "--features", "data/features",
           "--report", "data/prepare_report.json"]


def disk_ratio(work: Path, photo_like: bool) -> tuple[int, int, dict]:
    import numpy as np
    from PIL import Image

    from mmalign.data.synthetic import generate_synthetic

    src = work / "jpegs"
    src.mkdir()
    rows = generate_synthetic(0, N_IMAGES, 0, 0, image_size=256 if photo_like else 160)["train"]
    rng = np.random.default_rng(0)
    with (src / "metadata.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            im = row["image"].convert("RGB")
            if photo_like:  # sensor-like noise: the entropy of a photo, which JPEG cannot squeeze away
                noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 12, (256, 256, 3))
                im = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
            im.save(src / f"{i:05d}.jpg", quality=90)
            f.write(json.dumps({"file_name": f"{i:05d}.jpg", "text": row["captions"]}) + "\n")
    params = default_params()
    params["models"]["text"] = str(tiny_sentence_transformer(work / "text"))
    params["prepare"].update(source="imagefolder", imagefolder={"path": str(src), "caption_column": "text"})
    stage("prepare", PREPARE, work, params)
    kept = bytes_under(work / "data/dataset") + bytes_under(work / "data/prepare_report.json")
    return bytes_under(src), kept, json.loads((work / "data/prepare_report.json").read_text())["splits"]


def fp16_cost(work: Path) -> dict:
    from safetensors.torch import load_file

    from mmalign.data.features import write_feature_cache
    from mmalign.utils import read_json

    params = default_params()
    params["evaluate"]["captioning"] = False
    stage("prepare", PREPARE, work, params)
    fp = read_json(work / "data/features/fingerprint.json")
    half = work / "data/features16"
    write_feature_cache(half, ((s, {k: v.half() if k != "text_to_image" else v for k, v in
                                    load_file(work / f"data/features/{s}.safetensors").items()})
                               for s in fp["files"]), {k: v for k, v in fp.items() if k != "files"} | {
                                   "feature_dtype": "float16"})
    out = {}
    for name, feats in (("float32", "data/features"), ("float16", "data/features16")):
        stage("align", ["--features", feats, "--out", f"aligner-{name}", "--plots", f"plots-{name}"], work, params)
        stage("evaluate", ["--aligner", f"aligner-{name}", "--features", feats, "--align-plots", f"plots-{name}",
                           "--out", f"eval-{name}"], work, params)
        ret = json.loads((work / f"eval-{name}/metrics.json").read_text())["retrieval"]
        out[name] = {"i2t_R1": ret["i2t"]["R1"], "t2i_R1": ret["t2i"]["R1"],
                     "cache_MB": bytes_under(work / feats) / 2**20}
    return out


def main() -> None:
    which = sys.argv[1:] or ["disk", "fp16"]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for kind in ("photo-like", "flat") if "disk" in which else ():
            (Path(tmp) / kind).mkdir()
            src, kept, splits = disk_ratio(Path(tmp) / kind, kind == "photo-like")
            print(f"A. disk, {kind}: {N_IMAGES} JPEGs {src / 2**20:.1f} MB -> prepare outputs other than features "
                  f"{kept / 2**20:.1f} MB: ratio {kept / src:.3f} (target <= 0.2: "
                  f"{'met' if kept / src <= 0.2 else 'NOT met'}); images per split "
                  f"{ {k: v['images'] for k, v in splits.items()} }")
        if "fp16" not in which:
            return
        (Path(tmp) / "b").mkdir()
        r = fp16_cost(Path(tmp) / "b")
        for name, m in r.items():
            print(f"B. {name} cache ({m['cache_MB']:.1f} MB): test i2t R@1 {m['i2t_R1']:.4f}, "
                  f"t2i R@1 {m['t2i_R1']:.4f}")
        print(f"B. float16 - float32: i2t {r['float16']['i2t_R1'] - r['float32']['i2t_R1']:+.4f}, "
              f"t2i {r['float16']['t2i_R1'] - r['float32']['t2i_R1']:+.4f}; cache size ratio "
              f"{r['float16']['cache_MB'] / r['float32']['cache_MB']:.2f}")


if __name__ == "__main__":
    main()

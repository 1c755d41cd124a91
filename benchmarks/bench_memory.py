"""Benchmark 4: peak RSS of the `align` stage with 10x the default dataset vs 1x.

Both runs are the real stage (`python stages/align.py`, default params, MLflow to a temp sqlite
store) on feature caches of the default shapes: 3000/300 train/val images (tiny CLIP grid features,
dim 2048) with 3 captions each (MiniLM, dim 384), and 10x that. The features are random: align's
memory depends on the cache's size, not its values, and building a real 10x cache would take
~10 minutes of encoding. num_epochs is cut to 2 on both sides (memory does not grow per epoch).
Peak RSS comes from the kernel (wait4's ru_maxrss of the stage process). Target: 10x / 1x <= 1.3.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from _common import ROOT, Row, default_params, print_rows, timed

from mmalign.features import write_feature_cache

EPOCHS = 2


def make_cache(out: Path, scale: int, params: dict) -> tuple[int, int]:
    """A cache with the default shapes times `scale`; returns (train images, file MB)."""
    p = params["prepare"]
    dv = p["vision_grid"] ** 2 * p["tiny_clip"]["hidden_size"]  # grid pooling: grid^2 patch-token means
    dt = 384  # all-MiniLM-L6-v2
    g = torch.Generator().manual_seed(scale)

    def split(n: int) -> dict[str, torch.Tensor]:
        m = n * p["captions_per_image"]
        return {"vision": torch.randn(n, dv, generator=g), "text": torch.randn(m, dt, generator=g),
                "text_to_image": torch.arange(m) // p["captions_per_image"]}

    sizes = {"train": p["n_train"] * scale, "val": p["n_val"] * scale}
    write_feature_cache(out, ((name, split(n)) for name, n in sizes.items()),
                        {"vision_model": "builtin:tiny-clip", "text_model": params["models"]["text"],
                         "vision_pooling": p["vision_pooling"], "vision_grid": p["vision_grid"],
                         "vision_dim": dv, "text_dim": dt})
    return sizes["train"], sum(f.stat().st_size for f in out.glob("*.safetensors")) // 2**20


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> float:
    """Run cmd to completion; its peak resident set size in MB, as the kernel counted it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def run() -> dict:
    params = default_params()
    params["align"]["num_epochs"] = EPOCHS
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
               "MMALIGN_LOG_LEVEL": "WARNING"}
        for scale in (1, 10):
            n, mb = make_cache(tmp / f"features{scale}", scale, params)
            cmd = [sys.executable, str(ROOT / "stages/align.py"), "--params", str(tmp / "params.yaml"),
                   "--features", str(tmp / f"features{scale}"), "--out", str(tmp / f"aligner{scale}"),
                   "--plots", str(tmp / f"plots{scale}")]
            secs, rss = timed(lambda: peak_rss_mb(cmd, env))
            measured[scale] = (n, mb, rss, secs)
            print(f"align on {n} train images ({mb} MB of features): peak RSS {rss:.0f} MB in {secs:.0f} s",
                  file=sys.stderr)
    (n1, mb1, rss1, s1), (n10, mb10, rss10, s10) = measured[1], measured[10]
    return {"rows": [Row("4. Memory (align peak RSS)", "1x data", rss1, "10x data", rss10, "MB", 1.3, at_most=True,
                         note=f"`python stages/align.py` on feature caches of the default shapes, {n1} vs {n10} "
                              f"train images ({mb1} vs {mb10} MB of features on disk), random values, "
                              f"{EPOCHS} epochs; {s1:.0f} s vs {s10:.0f} s. Features are streamed from the cache "
                              "a batch at a time (features.StreamedRows).")]}


if __name__ == "__main__":
    res = run()
    print_rows(res["rows"])

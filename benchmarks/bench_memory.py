"""Benchmark 4: peak RSS of the `align` stage with 10x the default dataset vs 1x.

Both runs are the real stage (`python stages/align.py`, default params, MLflow to a temp sqlite
store) on feature caches of the default shapes: 3000/300 train/val images (tiny CLIP grid features,
dim 2048) with 3 captions each (MiniLM, dim 384), and 10x that. The features are random: align's
memory depends on the cache's size, not its values, and building a real 10x cache would take
~10 minutes of encoding. num_epochs is cut to 2 on both sides (memory does not grow per epoch).
Peak RSS is the stage process's VmHWM from /proc (Linux). Target: 10x / 1x <= 1.3.

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

from mmalign.data.features import write_feature_cache

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


# Runs a script as __main__ and then writes this process's VmHWM (peak resident set of its memory
# map, which exec starts afresh). Not wait4's ru_maxrss: Linux carries the parent's peak across
# fork + exec into it, so it would count this benchmark's own memory.
PEAK = """
import runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    open(out, "w").write(hwm.split()[1])
"""


def peak_rss_mb(cmd: list[str], env: dict[str, str], out: Path) -> float:
    """Run the script cmd[0] with args cmd[1:] to completion; its peak resident set size in MB."""
    proc = subprocess.run([sys.executable, "-c", PEAK, str(out), *cmd], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return int(out.read_text()) / 1024  # kB


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
            cmd = [str(ROOT / "stages/align.py"), "--params", str(tmp / "params.yaml"),
                   "--features", str(tmp / f"features{scale}"), "--out", str(tmp / f"aligner{scale}"),
                   "--plots", str(tmp / f"plots{scale}")]
            secs, rss = timed(lambda: peak_rss_mb(cmd, env, tmp / f"peak{scale}"))
            measured[scale] = (n, mb, rss, secs)
            print(f"align on {n} train images ({mb} MB of features): peak RSS {rss:.0f} MB in {secs:.0f} s",
                  file=sys.stderr)
    (n1, mb1, rss1, s1), (n10, mb10, rss10, s10) = measured[1], measured[10]
    return {"rows": [Row("4. Memory (align peak RSS)", "1x data", rss1, "10x data", rss10, "MB", 1.3, at_most=True,
                         note=f"`python stages/align.py` on feature caches of the default shapes, {n1} vs {n10} "
                              f"train images ({mb1} vs {mb10} MB of features on disk), random values, "
                              f"{EPOCHS} epochs; {s1:.0f} s vs {s10:.0f} s. Features are streamed from the cache "
                              "a batch at a time (features.StreamedRows); loading it whole measured 1.68x (2026-11-27).")]}


if __name__ == "__main__":
    res = run()
    print_rows(res["rows"])

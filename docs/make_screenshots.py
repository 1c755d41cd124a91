"""Render README's two screenshots from this workspace's runs (run from the repo root, after `dvc repro`
and at least one `dvc exp run`, so two evaluate runs exist):

- docs/dvc_plots.png: every panel of `dvc plots show --json`, rendered from DVC's own Vega-Lite specs
  with vl-convert (no browser, no CDN), side by side.
- docs/mlflow_compare.png: `mlflow ui`'s compare view of the two latest evaluate runs, rendered by
  headless Chromium.

Needs `pip install vl-convert-python` and a Chromium binary (Debian: `apt-get install chromium`);
neither is a dependency of mmalign. Usage: python docs/make_screenshots.py [--chromium PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def dvc_plots(out: Path) -> None:
    import vl_convert as vlc
    from PIL import Image

    panels = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], capture_output=True, text=True,
                                       check=True).stdout)["data"]
    images = []
    for name, (panel,) in panels.items():
        spec = panel["content"]
        spec["width"], spec["height"] = 420, 240
        images.append(Image.open(io.BytesIO(vlc.vegalite_to_png(json.dumps(spec), scale=1.5))).convert("RGB"))
    cols = 3
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h), "white")
    for k, im in enumerate(images):
        sheet.paste(im, ((k % cols) * w, (k // cols) * h))
    sheet.save(out, optimize=True)
    print(f"{out}: {len(images)} panels ({', '.join(panels)})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_compare(out: Path, chromium: str) -> None:
    import mlflow

    uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["mmalign"], filter_string="tags.`mmalign.stage` = 'evaluate' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=2, output_format="list")
    if len(runs) < 2:
        sys.exit("need two finished evaluate runs: `dvc exp run -S ...` once after `dvc repro`")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(180):  # the server takes ~40 s to start on a busy 2-core machine
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        ids = json.dumps([r.info.run_id for r in runs])
        url = f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([runs[0].info.experiment_id])}"
        # new headless mode; a virtual-time budget lets the React app finish its fetches before the shot
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1500,1200", "--virtual-time-budget=60000",
                        "--run-all-compositor-stages-before-draw", f"--screenshot={out.resolve()}", url],
                       check=True, capture_output=True, timeout=300)
        print(f"{out}: compare view of runs {', '.join(r.info.run_name for r in runs)}")
    finally:
        os.killpg(server.pid, 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    dvc_plots(DOCS / "dvc_plots.png")
    mlflow_compare(DOCS / "mlflow_compare.png", args.chromium)


if __name__ == "__main__":
    main()

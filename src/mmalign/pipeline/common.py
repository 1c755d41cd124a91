"""Helpers the stage `run` functions share."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ..training import distributed
from ..utils import atomic_path

log = logging.getLogger(__name__)
IMAGE_ONLY = "image_only"  # project.zero_shot_check's image-only projector: a subdir of the project stage's out


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_history(history: dict[str, Any], plots_dir: Path, tracker: Any, stage: str, monitor: str) -> None:
    """Per-step training terms -> loss.csv, per-epoch validation -> val.csv (DVC plots), and to MLflow;
    says which epoch the checkpoint kept. Rank 0 alone writes them in a multi-process run."""
    if not distributed.is_main_process():
        return
    best = history["best"]
    if best:
        log.info("%s: kept epoch %d of %d (val %s %.4f); every val metric: %s", stage, best["epoch"],
                 len(history["epochs"]), monitor.removeprefix("val/"), best[monitor], plots_dir / "val.csv")
    steps = pd.DataFrame(history["steps"]).rename(columns=lambda c: c.replace("train/", ""))
    write_csv(steps, plots_dir / "loss.csv")
    write_csv(pd.DataFrame(history["epochs"]).rename(columns=lambda c: c.replace("val/", "")), plots_dir / "val.csv")
    tracker.log_metrics({k.replace("val/", "best_val/"): v for k, v in history["best"].items() if k.startswith("val/")})
    tracker.log_artifact(plots_dir, "plots")
    if tracker.active:
        from .. import plots

        terms = ("loss", "clip", "mrl") if stage == "align" else ("loss",)
        tracker.log_figure(plots.loss_curve(steps, f"{stage}: training loss", terms), f"figures/{stage}_loss.png")


def state_options(cfg: Any, state_dir: Path | None, *inputs: Any) -> dict[str, Any]:
    """fit() kwargs for resumable training: the state lives in `state_dir` unless cfg.resume is never.

    The fingerprint covers every param of the stage and its inputs, so a state left by a run with
    other params or data is never resumed.
    """
    if state_dir is None or cfg.resume == "never":
        return {}
    blob = json.dumps([dataclasses.asdict(cfg), *inputs], sort_keys=True, default=str)
    return {"state_dir": state_dir, "state_every": cfg.state_every,
            "fingerprint": hashlib.sha256(blob.encode()).hexdigest()}

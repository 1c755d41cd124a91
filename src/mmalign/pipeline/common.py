"""Helpers the stage `run` functions share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..utils import atomic_path


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_history(history: dict[str, Any], plots_dir: Path, tracker: Any) -> None:
    """Per-step training terms -> loss.csv, per-epoch validation -> val.csv (DVC plots), and to MLflow."""
    write_csv(pd.DataFrame(history["steps"]).rename(columns=lambda c: c.replace("train/", "")), plots_dir / "loss.csv")
    write_csv(pd.DataFrame(history["epochs"]).rename(columns=lambda c: c.replace("val/", "")), plots_dir / "val.csv")
    tracker.log_metrics({k.replace("val/", "best_val/"): v for k, v in history["best"].items() if k.startswith("val/")})
    tracker.log_artifact(plots_dir, "plots")

"""DVC stage `align`: Phase 1 adapters trained from the feature cache."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.training import distributed
from mmalign.entry import run_entry
from mmalign.params import (align_config, enabled_dirs, load_params, modality_dirs, preflight, setup_logging,
                            tracking_config)
from mmalign.pipeline import align
from mmalign.tracking import stage_run


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--features", multiple=True, required=True,
              help="feature cache dir per modality, MODALITY=DIR (repeat); a bare DIR is the image's")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="aligner checkpoint dir")
@click.option("--plots", type=click.Path(path_type=Path), required=True, help="training curves dir")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="resumable training state dir (not a DVC out, so it survives a killed run)")
def main(params_path: str, features: tuple[str, ...], out: Path, plots: Path, state: Path | None) -> None:
    distributed.init()  # a no-op unless started by `accelerate launch` with several processes
    setup_logging()
    params = load_params(params_path)
    preflight(params)
    cfg, tracking = align_config(params), tracking_config(params)
    caches = enabled_dirs(params, modality_dirs(features), "features")
    with stage_run("align", tracking.experiment, tracking.required,
                   {"modalities": params.get("modalities", {}), "align": params.get("align", {})}, params) as tracker:
        align.run(cfg, caches, list(caches), out, plots, tracker, state)


if __name__ == "__main__":
    run_entry(main, "align")

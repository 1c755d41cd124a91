"""DVC stage `align`: Phase 1 adapters trained from the feature cache."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.training import distributed
from mmalign.entry import run_entry
from mmalign.params import align_config, load_params, preflight, setup_logging, tracking_config
from mmalign.pipeline import align
from mmalign.tracking import stage_run


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--features", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="aligner checkpoint dir")
@click.option("--plots", type=click.Path(path_type=Path), required=True, help="training curves dir")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="resumable training state dir (not a DVC out, so it survives a killed run)")
def main(params_path: str, features: Path, out: Path, plots: Path, state: Path | None) -> None:
    distributed.init()  # a no-op unless started by `accelerate launch` with several processes
    setup_logging()
    params = load_params(params_path)
    preflight(params)
    cfg, tracking = align_config(params), tracking_config(params)
    with stage_run("align", tracking.experiment, tracking.required, {"align": params.get("align", {})},
                   params) as tracker:
        align.run(cfg, features, out, plots, tracker, state)


if __name__ == "__main__":
    run_entry(main, "align")

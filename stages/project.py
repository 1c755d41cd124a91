"""DVC stage `project`: Phase 2 vision-to-LLM projector trained from the feature cache."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.training import distributed
from mmalign.entry import run_entry
from mmalign.params import (enabled_dirs, load_params, modality_dirs, models_config, preflight, project_config,
                            setup_logging, tracking_config)
from mmalign.pipeline import project
from mmalign.tracking import stage_run
from mmalign.utils import read_json


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--llm", "llm_dir", type=click.Path(path_type=Path, exists=True), required=True,
              help="the llm stage's dir (models.json names the LLM)")
@click.option("--aligner", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--features", multiple=True, required=True, help="feature cache per modality, MODALITY=DIR (repeat)")
@click.option("--dataset", multiple=True, required=True, help="dataset dir per modality, MODALITY=DIR (repeat)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="projector checkpoint dir")
@click.option("--plots", type=click.Path(path_type=Path), required=True, help="training curves dir")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="resumable training state dir (not a DVC out, so it survives a killed run)")
def main(params_path: str, llm_dir: Path, aligner: Path, features: tuple[str, ...], dataset: tuple[str, ...], out: Path,
         plots: Path, state: Path | None) -> None:
    distributed.init()  # a no-op unless started by `accelerate launch` with several processes
    setup_logging()
    params = load_params(params_path)
    preflight(params)
    models, tracking = models_config(params), tracking_config(params)
    cfg = project_config(params, read_json(llm_dir / "models.json")["llm"], models.trust_remote_code)
    caches = enabled_dirs(params, modality_dirs(features), "features")
    datasets = enabled_dirs(params, modality_dirs(dataset), "dataset")
    with stage_run("project", tracking.experiment, tracking.required,
                   {"modalities": params.get("modalities", {}), "project": params.get("project", {})},
                   params) as tracker:
        project.run(cfg, aligner, caches, datasets, out, plots, tracker, state)


if __name__ == "__main__":
    run_entry(main, "project")

"""DVC stages `prepare` (image) and `prepare_audio` (audio): one modality's dataset, its builtin stand-in
encoder, its frozen-encoder feature cache (sharded across the processes of `accelerate launch`)."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.training import distributed
from mmalign.entry import run_entry
from mmalign.params import (load_params, modalities_config, models_config, prepare_config, preflight, setup_logging,
                            tracking_config)
from mmalign.pipeline import prepare
from mmalign.tracking import log_prepared_dataset, stage_run


@click.command()
@click.option("--modality", type=click.Choice(["image", "audio"]), default="image", show_default=True)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Path(path_type=Path), required=True, help="HF dataset (save_to_disk) out")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), required=True, help="builtin encoders out")
@click.option("--features", type=click.Path(path_type=Path), required=True, help="feature cache out")
@click.option("--report", type=click.Path(path_type=Path), required=True, help="prepare report (JSON) out")
def main(modality: str, params_path: str, dataset: Path, models_dir: Path, features: Path, report: Path) -> None:
    distributed.init()  # N processes under `accelerate launch` share the feature extraction
    setup_logging()
    params = load_params(params_path)
    enabled = getattr(modalities_config(params), modality)
    preflight(params, data=True, modalities=[modality] if enabled else [])
    models, cfg, tracking = models_config(params), prepare_config(params), tracking_config(params)
    name = "prepare" if modality == "image" else f"prepare_{modality}"
    with stage_run(name, tracking.experiment, tracking.required,
                   {"models": params.get("models", {}), "prepare": params.get("prepare", {})}, params) as tracker:
        prepare.run(models, cfg, dataset, models_dir, features, report, tracker, modality, enabled)
        if enabled:
            # the run's Datasets: the origin + a digest of what was kept
            log_prepared_dataset(tracker, cfg.section(modality), dataset, modality=modality)


if __name__ == "__main__":
    run_entry(main, "prepare")

"""DVC stage `evaluate`: retrieval + captioning on the test split, figures, eval/metrics.json."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.entry import run_entry
from mmalign.params import (enabled_dirs, evaluate_config, load_params, modality_dirs, prepare_config, preflight,
                            setup_logging, tracking_config)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--aligner", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--features", multiple=True, required=True, help="feature cache per modality, MODALITY=DIR (repeat)")
@click.option("--projector", type=click.Path(path_type=Path, exists=True), help="Phase 2 checkpoint (captioning)")
@click.option("--dataset", multiple=True, help="dataset dir per modality, MODALITY=DIR (test items, references)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="eval output dir")
def main(params_path: str, aligner: Path, features: tuple[str, ...], projector: Path | None,
         dataset: tuple[str, ...], out: Path) -> None:
    setup_logging()
    params = load_params(params_path)
    preflight(params)  # before the heavy imports: a bad id fails in about a second
    from mmalign.pipeline import evaluate
    from mmalign.serving.captioner import log_captioner
    from mmalign.tracking import log_prepared_dataset, stage_run

    cfg, tracking = evaluate_config(params), tracking_config(params)
    caches = enabled_dirs(params, modality_dirs(features), "features")
    datasets = enabled_dirs(params, modality_dirs(dataset), "dataset") if dataset else {}
    # The evaluate run carries every param so one table in `mlflow ui` compares experiments.
    with stage_run("evaluate", tracking.experiment, tracking.required, params, params) as tracker:
        prepare = prepare_config(params)
        for m, d in datasets.items():  # the test splits this run scores (also the registered model's data)
            log_prepared_dataset(tracker, prepare.section(m), d, splits=("test",), modality=m)
        evaluate.run(cfg, aligner, caches, out, tracker, projector, datasets)
        if cfg.captioning and projector is not None:  # logged, not registered: `mmalign register` is a choice
            log_captioner(tracker, aligner, projector, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)


if __name__ == "__main__":
    run_entry(main, "evaluate")

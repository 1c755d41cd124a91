"""DVC stage `evaluate`: retrieval + captioning on the test split, figures, eval/metrics.json."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.entry import run_entry
from mmalign.params import evaluate_config, load_params, prepare_config, preflight, setup_logging, tracking_config


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--aligner", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--features", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--projector", type=click.Path(path_type=Path, exists=True), help="Phase 2 checkpoint (captioning)")
@click.option("--dataset", type=click.Path(path_type=Path, exists=True), help="dataset dir (test images, references)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="eval output dir")
def main(params_path: str, aligner: Path, features: Path, projector: Path | None, dataset: Path | None,
         out: Path) -> None:
    setup_logging()
    params = load_params(params_path)
    preflight(params)  # before the heavy imports: a bad id fails in about a second
    from mmalign.pipeline import evaluate
    from mmalign.serving.captioner import log_captioner
    from mmalign.tracking import log_prepared_dataset, stage_run

    cfg, tracking = evaluate_config(params), tracking_config(params)
    # The evaluate run carries every param so one table in `mlflow ui` compares experiments.
    with stage_run("evaluate", tracking.experiment, tracking.required, params, params) as tracker:
        if dataset is not None:  # the test split this run scores (also the registered model's data)
            log_prepared_dataset(tracker, prepare_config(params), dataset, splits=("test",))
        evaluate.run(cfg, aligner, features, out, tracker, projector, dataset)
        if cfg.captioning and projector is not None:  # logged, not registered: `mmalign register` is a choice
            log_captioner(tracker, aligner, projector, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)


if __name__ == "__main__":
    run_entry(main, "evaluate")

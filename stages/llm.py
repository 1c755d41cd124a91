"""DVC stage `llm`: the Phase 2 decoder LLM (records a hub id or path; builds the builtin stand-in)."""

from __future__ import annotations

from pathlib import Path

import click

from mmalign.entry import run_entry
from mmalign.params import (enabled_dirs, load_params, modality_dirs, models_config, prepare_config, preflight,
                            setup_logging, tracking_config)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--dataset", multiple=True, required=True,
              help="dataset dir per modality, MODALITY=DIR (repeat); the stand-in pretrains on their train captions")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="LLM dir out (models.json names the LLM)")
def main(params_path: str, dataset: tuple[str, ...], out: Path) -> None:
    setup_logging()
    params = load_params(params_path)
    preflight(params)  # before the heavy imports: a bad id fails in about a second
    from mmalign.pipeline import build_llm
    from mmalign.tracking import stage_run

    models, tracking = models_config(params), tracking_config(params)
    datasets = enabled_dirs(params, modality_dirs(dataset), "dataset")
    with stage_run("llm", tracking.experiment, tracking.required,
                   {"models": {"llm": models.llm}, "prepare": {"tiny_llm": params.get("prepare", {}).get("tiny_llm")}},
                   params) as tracker:
        build_llm.run(models, prepare_config(params).tiny_llm, list(datasets.values()), out, tracker)


if __name__ == "__main__":
    run_entry(main, "llm")

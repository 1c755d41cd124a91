"""Registering a trained captioner in the MLflow Model Registry: a deliberate step, not a side effect.

`evaluate` logs the captioner into its run; `mmalign register` picks one evaluate run (given by id, or
the best finished one of an experiment by a headline metric), registers its model as a new version
with a description (metrics beside their baselines, a params hash, the data), and points an alias
(`champion`) at it, so serving reads `models:/mmalign-captioner@champion`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

log = logging.getLogger(__name__)

MODEL_NAME = "captioner"  # the name evaluate logs the pyfunc model under, in its run
RUN_ID = re.compile(r"[0-9a-f]{32}")


def evaluate_runs(client: Any, experiment: str, metric: str) -> list[Any]:
    """Finished evaluate runs of `experiment` that logged a captioner, best `metric` first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no MLflow experiment named '{experiment}' (there are: {', '.join(names) or 'none'}); "
                         "run `dvc repro` first, or name a run id")
    runs = client.search_runs([exp.experiment_id], "tags.`mmalign.stage` = 'evaluate' and attributes.status = "
                              "'FINISHED'", order_by=[f"metrics.`{metric}` DESC"], max_results=1000)
    return [r for r in runs if metric in r.data.metrics and captioner_uri(client, r) is not None]


def captioner_uri(client: Any, run: Any) -> str | None:
    """The URI of the captioner model `run` logged (MLflow 3: a logged model whose source is the run)."""
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}' and name = '{MODEL_NAME}'",
                                         max_results=1)
    return f"models:/{models[0].model_id}" if models else None


def describe(run: Any) -> tuple[str, dict[str, str]]:
    """A model version's description (headline metrics beside their baselines, params hash, data, run)
    and its tags."""
    m, params = run.data.metrics, run.data.params
    params_hash = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    data = sorted({f"{d.dataset.name}@{d.dataset.digest}" for d in run.inputs.dataset_inputs}) if run.inputs else []

    def pair(key: str, base: str) -> str:
        return f"{m[key]:.3f} (vs {m[base]:.3f})" if key in m and base in m else "n/a"

    lines = [f"CIDEr {pair('CIDEr', 'blind_CIDEr')} blind; distinct captions "
             f"{m.get('distinct', float('nan')):.2f}",
             f"test R@1 i2t {pair('i2t_R1', 'chance_i2t_R1')} chance, "
             f"t2i {pair('t2i_R1', 'chance_t2i_R1')} chance",
             f"params sha256 {params_hash}; data {', '.join(data) or 'not logged'}",
             f"from run {run.info.run_id} ({run.data.tags.get('mmalign.pipeline', '?')}, "
             f"commit {run.data.tags.get('git.commit', '?')[:10]})"]
    tags = {"params_sha256": params_hash, "data": ", ".join(data), "run_id": run.info.run_id,
            "mmalign.pipeline": run.data.tags.get("mmalign.pipeline", ""), "git.commit": run.data.tags.get("git.commit", "")}
    return "\n".join(lines), tags


def register(target: str | None, experiment: str, name: str = "mmalign-captioner", alias: str = "champion",
             metric: str = "CIDEr") -> Any:
    """Register the captioner of run `target` (a run id), or of the best finished evaluate run of
    experiment `target` (default `experiment`) by `metric`; set the description, tags and `alias`.
    Returns the ModelVersion."""
    import mlflow

    from ..tracking import store_lock, tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if target and RUN_ID.fullmatch(target):
        run = client.get_run(target)
        model_uri = captioner_uri(client, run)
        if model_uri is None:
            raise ValueError(f"run {target} logged no captioner model: name an evaluate run with captioning on")
    else:
        runs = evaluate_runs(client, target or experiment, metric)
        if not runs:
            raise ValueError(f"experiment '{target or experiment}' has no finished evaluate run with a captioner and "
                             f"a '{metric}' metric: run `dvc repro` (evaluate.captioning: true) first")
        run, model_uri = runs[0], captioner_uri(client, runs[0])
        log.info("best of %d evaluate runs by %s: %s (%s = %.4f)", len(runs), metric, run.info.run_id, metric,
                 run.data.metrics[metric])
    description, tags = describe(run)
    with store_lock(uri):
        version = mlflow.register_model(model_uri, name, tags=tags)
        client.update_model_version(name, version.version, description=description)
        client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s as models:/%s/%s, alias @%s", model_uri, name, version.version, alias)
    return client.get_model_version(name, version.version)

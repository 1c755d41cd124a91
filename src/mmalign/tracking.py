"""MLflow tracking: the only module in the library that imports mlflow.

Default store: `sqlite:///<repo root>/mlflow.db`, artifacts in `<repo root>/mlartifacts/`, where the
repo root is `DVC_ROOT` when DVC runs the stage (so `dvc exp run --temp/--queue` runs land in the
workspace's database) and the current directory otherwise. `MLFLOW_TRACKING_URI` overrides it.

Structure: one experiment, marked as model development (MLflow 3 opens it on the runs table, not the
GenAI overview); one parent run per pipeline execution (tag `mmalign.pipeline`), found or created by
whichever stage runs first, with each stage's run nested under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from .training import distributed

log = logging.getLogger(__name__)

# MLflow 3's experiment type (the UI's "Experiment type"): traditional model development, not GenAI.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PIPELINE_ROLE = "mmalign.role"  # = "pipeline" on the parent run of a pipeline execution


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """What a stage logs to. With `active=False` every call is a no-op (tracking disabled/failed)."""

    FLUSH_AT = 900  # buffered step metrics sent in one log_batch (MLflow takes at most 1000 a call)

    def __init__(self, mlflow: Any = None):
        self.mlflow = mlflow
        self.active = mlflow is not None
        self._pending: list[Any] = []  # per-step training metrics, sent in batches (one sqlite write each)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            flat = flatten(params)
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics with a `step` (training curves) are buffered and sent every FLUSH_AT values and when the run
        ends, with the time they were logged: one store write per ~100 steps instead of one per step (a
        sqlite write per step cost 10% of the project stage); the rest are sent at once."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if step is None:
            self.mlflow.log_metrics(clean)
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, v, now, step) for k, v in clean.items()]
        if len(self._pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Send the buffered step metrics (stage_run calls this when the run ends, failed or not)."""
        if self.active and self._pending:
            run_id = self.mlflow.active_run().info.run_id
            for i in range(0, len(self._pending), 1000):
                self.mlflow.MlflowClient().log_batch(run_id, metrics=self._pending[i:i + 1000])
            self._pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            if Path(path).is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path)
            else:
                self.mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact, then close it (stages make many; none is shown)."""
        try:
            if self.active:
                self.mlflow.log_figure(fig, name)
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self.mlflow.set_tags(tags)

    def log_dataset(self, splits: dict[str, Any], name: str, source: str, hub: bool = False) -> None:
        """Log each split (a pandas DataFrame) as a run input: the run's Datasets column shows `name`, a
        content digest (all rows) and the split as context. `source`: the local path the data came from,
        or (hub=True) its Hugging Face dataset id."""
        if not self.active:
            return
        import warnings

        import pandas as pd
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        for split, df in splits.items():
            digest = hashlib.sha256(pd.util.hash_pandas_object(df.astype(str), index=False).values.tobytes())
            with warnings.catch_warnings():  # MLflow registers its local source twice, then warns about it
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")  # ids: no NaN
                dataset = self.mlflow.data.from_pandas(
                    df, source=HuggingFaceDatasetSource(source) if hub else Path(source).resolve().as_uri(),
                    name=name, digest=digest.hexdigest()[:16])
            self.mlflow.log_input(dataset, context=split)


def dataset_splits(dataset_dir: str | Path) -> dict[str, Any]:
    """An HF dataset saved by `prepare` -> {split: DataFrame of its columns but the media (ids, captions)}."""
    import datasets

    def media(f: Any) -> bool:  # images, audio file bytes
        return isinstance(f, datasets.Image) or (isinstance(f, datasets.Value) and f.dtype in ("binary", "large_binary"))

    dd = datasets.load_from_disk(str(dataset_dir))
    return {name: split.remove_columns([c for c, f in split.features.items() if media(f)]).to_pandas()
            for name, split in dd.items()}


def log_prepared_dataset(tracker: Tracker, prepare_cfg: Any, dataset_dir: str | Path,
                         splits: tuple[str, ...] | None = None, modality: str = "image") -> None:
    """Log the dataset `prepare` wrote (all splits, or `splits`) as the run's inputs, named by where the
    data came from: `synthetic` (`synthetic-audio`, ...), or the source's path or hub id. `prepare_cfg`:
    the modality's prepare section (`prepare`, `prepare.audio`)."""
    if not tracker.active:
        return
    source = prepare_cfg.source
    origin = str(dataset_dir) if source == "synthetic" else getattr(prepare_cfg, source).path
    frames = dataset_splits(dataset_dir)
    synthetic = "synthetic" if modality == "image" else f"synthetic-{modality}"
    tracker.log_dataset({k: v for k, v in frames.items() if splits is None or k in splits},
                        name=synthetic if source == "synthetic" else origin, source=origin,
                        hub=source == "hf" and not Path(origin).expanduser().exists())


def _configure_timeouts() -> None:
    # A tracking server that is down must fail a stage in seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def store_lock(uri: str) -> Any:
    """A file lock beside a sqlite store (a no-op for servers): parallel queued experiments
    (`dvc queue start -j 2`) must not both create/migrate the database or a registered model."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///"):] + ".lock", timeout=120)


def _experiment_id(mlflow: Any, name: str, root: Path, uri: str) -> str:
    """Get or create the experiment (for sqlite this also creates the database), under store_lock, marked as
    model development; warns when its artifacts go outside this repo (a moved or copied checkout)."""
    with store_lock(uri):
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            return mlflow.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri(),
                                            tags=EXPERIMENT_KIND)
        for key, value in EXPERIMENT_KIND.items():  # an experiment created before the tag existed
            if exp.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    _check_artifact_location(exp, root, uri)
    return exp.experiment_id


def _check_artifact_location(exp: Any, root: Path, uri: str) -> None:
    """MLflow fixes an experiment's artifact location when it is created (an absolute path): a store that
    lives in this repo but points its artifacts elsewhere means the checkout was moved or copied."""
    from urllib.parse import unquote, urlparse

    location = urlparse(exp.artifact_location)
    if location.scheme not in ("", "file") or not uri.startswith("sqlite:///"):
        return  # a server or object store: shared on purpose
    store = Path(uri[len("sqlite:///"):]).resolve()
    path = Path(unquote(location.path)).resolve()
    if store.is_relative_to(root) and not path.is_relative_to(root):
        log.warning("MLflow experiment '%s' in %s keeps its artifacts in %s, outside this repo (%s): the "
                    "checkout was moved or copied, and this run's artifacts go to the old place. Use a new "
                    "tracking.experiment name, or delete %s to start a fresh store here.",
                    exp.name, store, path, root, store)


def _parent_run_id(mlflow: Any, exp_id: str, pipeline: str, tags: dict[str, str], uri: str) -> str:
    """The parent run of this pipeline execution: found by its `mmalign.pipeline` tag, or created by the
    first stage that runs (the stages are separate processes, so under store_lock). Marked RUNNING while
    a stage runs; stage_run ends it with the stage's status."""
    client = mlflow.MlflowClient()
    with store_lock(uri):
        found = mlflow.search_runs([exp_id], filter_string=f"tags.`mmalign.pipeline` = '{pipeline}' "
                                                           f"and tags.`{PIPELINE_ROLE}` = 'pipeline'",
                                   output_format="list", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        return client.create_run(exp_id, run_name=pipeline, tags={**tags, PIPELINE_ROLE: "pipeline"}).info.run_id


def _close_stale_runs(mlflow: Any, exp_id: str, stage: str, pipeline: str) -> None:
    """A stage killed by a signal (or a lost machine) leaves its run RUNNING forever: when the same stage
    of the same pipeline starts again, that earlier run is marked KILLED."""
    stale = mlflow.search_runs(
        [exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`mmalign.stage` = '{stage}' "
                                f"and tags.`mmalign.pipeline` = '{pipeline}'", output_format="list")
    for run in stale:
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by a killed run: marked KILLED", run.info.run_id, stage)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, required: bool = True, params: dict[str, Any] | None = None,
              pipeline_params: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for one stage, nested under the parent run of its pipeline execution.

    Tags: mmalign.stage, mmalign.pipeline (the DVC experiment name, or a hash of commit + params for
    a plain `dvc repro`; the parent run carries it too), dvc.exp_name, git.commit. `params` are logged
    as run params.
    If the store is unreachable: raise (required) or warn once and yield an inactive Tracker.
    In a multi-process run only rank 0 tracks; the other ranks get an inactive Tracker.
    """
    if not distributed.is_main_process():
        yield Tracker(None)
        return
    _configure_timeouts()
    root = repo_root()
    commit = git_commit(root)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    digest = hashlib.sha256(f"{commit}{sorted(flatten(pipeline_params or params or {}).items())}".encode()).hexdigest()
    pipeline = exp_name or f"workspace-{digest[:10]}"
    uri = tracking_uri()
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        exp_id = _experiment_id(mlflow, experiment, root, uri)
        _close_stale_runs(mlflow, exp_id, stage, pipeline)
        tags = {"mmalign.pipeline": pipeline, "dvc.exp_name": exp_name or "workspace", "git.commit": commit}
        parent_id = _parent_run_id(mlflow, exp_id, pipeline, tags, uri)
        run = mlflow.start_run(experiment_id=exp_id, run_name=f"{exp_name or 'workspace'}/{stage}",
                               tags={**tags, "mmalign.stage": stage, "mlflow.parentRunId": parent_id,
                                     "mmalign.num_processes": str(distributed.world_size())})
    except Exception as e:
        msg = f"MLflow tracking store {uri} is unreachable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        if required:
            raise RuntimeError(f"{msg}. Start the server / fix MLFLOW_TRACKING_URI, or set tracking.required: "
                               "false to train without tracking.") from None
        log.warning("%s; tracking.required is false, so this %s run is NOT tracked", msg, stage)
        yield Tracker(None)
        return
    tracker = Tracker(mlflow)
    status = "FAILED"
    try:
        if params:
            tracker.log_params(params)
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            tracker.flush()
        finally:
            mlflow.end_run(status=status)
            mlflow.MlflowClient().set_terminated(parent_id, status=status)  # the parent ends with its last stage
        log.info("MLflow run %s (%s) logged to %s", run.info.run_id, stage, uri)

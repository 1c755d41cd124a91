"""MLflow tracking: the only module in the library that imports mlflow.

Default store: `sqlite:///<repo root>/mlflow.db`, artifacts in `<repo root>/mlartifacts/`, where the
repo root is `DVC_ROOT` when DVC runs the stage (so `dvc exp run --temp/--queue` runs land in the
workspace's database) and the current directory otherwise. `MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from . import distributed

log = logging.getLogger(__name__)


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

    def __init__(self, mlflow: Any = None):
        self.mlflow = mlflow
        self.active = mlflow is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            flat = flatten(params)
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            clean = {k.replace("@", "_at_"): float(v) for k, v in flatten(metrics).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.mlflow.log_metrics(clean, step=step)

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
    """Get or create the experiment (for sqlite this also creates the database), under store_lock."""
    with store_lock(uri):
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return mlflow.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())


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
    """Open an MLflow run for one stage, tagged so runs of one pipeline execution group together.

    Tags: mmalign.stage, mmalign.pipeline (the DVC experiment name, or a hash of commit + params for
    a plain `dvc repro`), dvc.exp_name, git.commit. `params` are logged as run params.
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
        run = mlflow.start_run(experiment_id=exp_id, run_name=f"{exp_name or 'workspace'}/{stage}",
                               tags={"mmalign.stage": stage, "mmalign.pipeline": pipeline,
                                     "dvc.exp_name": exp_name or "workspace", "git.commit": commit,
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
        mlflow.end_run(status=status)
        log.info("MLflow run %s (%s) logged to %s", run.info.run_id, stage, uri)

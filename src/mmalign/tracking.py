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
import re
import subprocess
import tempfile
import warnings
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
    finally:
        mlflow.end_run(status=status)
        log.info("MLflow run %s (%s) logged to %s", run.info.run_id, stage, uri)


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# -- the trained captioner as an MLflow model -----------------------------------------------------------
def __getattr__(name: str) -> Any:
    # PEP 562: CaptionerModel subclasses mlflow's PythonModel, so it is defined on first use. Importing this
    # module (every stage does) stays free of mlflow, which stage_run imports inside its error handling.
    if name == "CaptionerModel":
        return captioner_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def captioner_model_class() -> type:
    """`CaptionerModel`, defined once (on first use)."""
    if "CaptionerModel" not in globals():
        globals()["CaptionerModel"] = _define_captioner_model()
    return globals()["CaptionerModel"]


def _define_captioner_model() -> type:
    import mlflow.pyfunc

    class CaptionerModel(mlflow.pyfunc.PythonModel):
        """Images -> captions with a trained aligner + projector + LLM (`mlflow models serve` answers with it).

        Artifacts: `aligner`, `projector` (checkpoint dirs), `llm`, `vision` (model dirs in HF format; a model
        trained from a hub id is referenced by that id in model_config instead of copied).
        Input: a DataFrame with column `image` (encoded image bytes, or the same as a base64 string; a
        served model receives JSON, where binary columns are base64) and optional `prompt` (empty: the
        prompt the projector was trained with). Param `max_new_tokens`. Output: a DataFrame, column `caption`.
        """

        def load_context(self, context: Any) -> None:
            from .inference import load_captioner

            a, config = context.artifacts, context.model_config or {}
            self.model = load_captioner(a["aligner"], a["projector"], llm=a.get("llm") or config["llm"],
                                        vision=a.get("vision") or config["vision"])
            self.max_new_tokens = int(config.get("max_new_tokens", 48))
            self.batch_size = int(config.get("batch_size", 16))

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
            import pandas as pd

            from .inference import decode_image

            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            if "image" not in df.columns:
                raise ValueError(f"the input needs a column 'image' (image bytes or base64); got {list(df.columns)}")
            max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
            images = [decode_image(v, f"row {i}, column image") for i, v in enumerate(df["image"])]
            given = df["prompt"] if "prompt" in df.columns else [None] * len(df)
            prompts = [p if isinstance(p, str) and p else self.model.cfg.prompt for p in given]
            captions = [""] * len(df)
            for prompt in dict.fromkeys(prompts):  # one batched generate per distinct prompt
                rows = [i for i, p in enumerate(prompts) if p == prompt]
                out = self.model.generate([images[i] for i in rows], prompt=prompt, max_new_tokens=max_new_tokens,
                                          batch_size=self.batch_size)
                for i, caption in zip(rows, out):
                    captions[i] = caption
            return pd.DataFrame({"caption": captions})

    return CaptionerModel


# MLflow "models from code": the model is this script (saved with it), so loading unpickles nothing.
MODEL_CODE = """\
import mlflow

from mmalign.tracking import captioner_model_class

mlflow.models.set_model(captioner_model_class()())
"""


def example_image_png(size: int = 64) -> bytes:
    """A small generated test image (a red disc and a blue square on white), PNG bytes."""
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(220, 30, 30))
    draw.rectangle((size // 2, size // 2, size - size // 8, size - size // 8), fill=(30, 60, 220))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _model_source(given: str | Path | None, named: str, key: str, checkpoint: Path) -> tuple[str, str]:
    """("artifact", local dir to copy into the model) or ("id", hub id the served model loads by name)."""
    if given is None and re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not Path(named).exists():
        return "id", named  # e.g. Qwen/Qwen2.5-1.5B-Instruct: gigabytes, already in the HF cache
    path = Path(given if given is not None else named)
    if not (path / "config.json").is_file():
        where = "given" if given is not None else f"named in {checkpoint}/config.json, from {Path.cwd()}"
        raise ValueError(f"log_captioner: the {key} '{path}' ({where}) is not a model directory (no config.json)")
    return "artifact", str(path)


def _requirements() -> list[str]:
    """Pinned to this environment; given explicitly because MLflow's inference of them loads the model."""
    from importlib import metadata

    out = []
    for dist in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "sentence-transformers",
                 "pillow", "pandas", "numpy"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out + ["mmalign"]  # not on PyPI: serve with --env-manager local from an env that has it installed


def log_captioner(tracker_or_run: Any, aligner_dir: str | Path, projector_dir: str | Path,
                  llm_dir: str | Path | None = None, registered_name: str | None = None, *,
                  vision_dir: str | Path | None = None, max_new_tokens: int = 48, batch_size: int = 16,
                  name: str = "captioner") -> Any:
    """Log the trained captioner as an MLflow pyfunc model (signature + input example) and register it.

    tracker_or_run: the Tracker of an open stage run (an inactive one logs nothing and this returns None),
    or a run id or mlflow Run to log into. llm_dir / vision_dir default to the model paths the checkpoints
    name (the projector's model_name, the aligner's vision_model_name: the directories `prepare` wrote,
    relative to the cwd); they are copied into the model with the aligner and projector checkpoints, except
    a hub id (`Qwen/Qwen2.5-1.5B-Instruct`), which the served model loads by name (from the HF cache).
    registered_name: register the logged model under this name (a new version each call); None: log only.
    Returns mlflow's ModelInfo; `registered_model_version` is the version registered.
    """
    if getattr(tracker_or_run, "active", True) is False:
        log.info("tracking is off: the captioner is not logged")
        return None
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from .utils import read_json

    aligner_dir, projector_dir = Path(aligner_dir), Path(projector_dir)
    models = {"llm": _model_source(llm_dir, read_json(projector_dir / "config.json")["model_name"], "LLM",
                                   projector_dir),
              "vision": _model_source(vision_dir, read_json(aligner_dir / "config.json")["vision_model_name"],
                                      "vision encoder", aligner_dir)}
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string", "caption")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]))
    kwargs = dict(
        name=name,
        artifacts={"aligner": str(aligner_dir), "projector": str(projector_dir),
                   **{k: v for k, (kind, v) in models.items() if kind == "artifact"}},
        model_config={"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                      **{k: v for k, (kind, v) in models.items() if kind == "id"}},
        signature=signature, input_example=pd.DataFrame({"image": [example_image_png()]}),
        pip_requirements=_requirements(), registered_model_name=registered_name)
    with tempfile.TemporaryDirectory(prefix="mmalign-captioner-") as tmp, warnings.catch_warnings():
        # predict takes a DataFrame and has no type hints on purpose: the signature above is the schema.
        warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
        code = Path(tmp) / "captioner_model.py"
        code.write_text(MODEL_CODE)
        if isinstance(tracker_or_run, Tracker):  # logs into the stage's open run
            with store_lock(mlflow.get_tracking_uri()):
                info = mlflow.pyfunc.log_model(python_model=str(code), **kwargs)
        else:
            run_id = tracker_or_run if isinstance(tracker_or_run, str) else tracker_or_run.info.run_id
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                info = mlflow.pyfunc.log_model(python_model=str(code), **kwargs)
    log.info("captioner logged as %s%s", info.model_uri,
             f", registered as models:/{registered_name}/{info.registered_model_version}" if registered_name else "")
    return info

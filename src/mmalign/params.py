"""Reading params.yaml and setting up stage logging (shared by the stage scripts and the CLI)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .config import (AlignmentConfig, EvaluateConfig, ModalitiesConfig, ModelsConfig, PrepareConfig, ProjectConfig,
                     TrackingConfig, from_dict, unknown_key)

SECTIONS = ("modalities", "models", "prepare", "align", "project", "evaluate", "tracking")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"params file {path} not found: run from the repo root or pass --params") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    for key in params:
        if key not in SECTIONS:
            raise ValueError(unknown_key(path.name, key, list(SECTIONS)))
    return params


def modalities_config(params: dict[str, Any]) -> ModalitiesConfig:
    return from_dict(ModalitiesConfig, params.get("modalities"))


def models_config(params: dict[str, Any]) -> ModelsConfig:
    return from_dict(ModelsConfig, params.get("models"))


def prepare_config(params: dict[str, Any]) -> PrepareConfig:
    return from_dict(PrepareConfig, params.get("prepare"))


def align_config(params: dict[str, Any]) -> AlignmentConfig:
    """The align section; the encoder fields (AlignerConfig.GIVEN) are the feature cache's, set by the stage."""
    return from_dict(AlignmentConfig, params.get("align"), exclude=AlignmentConfig.GIVEN)


def project_config(params: dict[str, Any], model_name: str | None = None,
                   trust_remote_code: bool = False) -> ProjectConfig:
    """The project section + the LLM (LLMConfig.GIVEN): `model_name` as the llm stage resolved it (None:
    LLMConfig's default, enough to validate) and models.trust_remote_code."""
    llm = {"model_name": model_name} if model_name is not None else {}
    return from_dict(ProjectConfig, params.get("project"), exclude=ProjectConfig.GIVEN,
                     trust_remote_code=trust_remote_code, **llm)


def evaluate_config(params: dict[str, Any]) -> EvaluateConfig:
    return from_dict(EvaluateConfig, params.get("evaluate"))


def tracking_config(params: dict[str, Any]) -> TrackingConfig:
    return from_dict(TrackingConfig, params.get("tracking"))


def modality_dirs(values: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """A stage's `--features image=data/features --features audio=data/audio/features` -> {modality: dir}; a bare
    path is the image's (the one-modality pipeline's command lines)."""
    from .modalities import modality

    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = (name, path) if sep else ("image", value)
        modality(name)  # an unknown modality name fails here, naming the allowed ones
        out[name] = Path(path)
    return out


def enabled_dirs(params: dict[str, Any], dirs: dict[str, Path], what: str) -> dict[str, Path]:
    """The dirs of the modalities that are on, in modality order; one of them missing is an error."""
    enabled = modalities_config(params).enabled
    missing = [m for m in enabled if m not in dirs]
    if missing:
        raise ValueError(f"modalities.{missing[0]} is on but no {what} directory was given for it "
                         f"(--{what} {missing[0]}=DIR): check the stage's cmd in dvc.yaml")
    for m in enabled:
        if not dirs[m].exists():
            raise ValueError(f"{m} {what} directory '{dirs[m]}' does not exist: run `dvc repro` (the prepare stages "
                             "write it)")
    return {m: dirs[m] for m in enabled}


def validate_all(params: dict[str, Any]) -> None:
    """Check every section, so a typo anywhere fails before the first stage does any work."""
    modalities_config(params), models_config(params), prepare_config(params), align_config(params)
    project_config(params), evaluate_config(params), tracking_config(params)


def preflight(params: dict[str, Any], data: bool = False, modalities: list[str] | None = None) -> None:
    """Validate every section, then check every model id of the enabled modalities (and with `data`, their
    data sources) in seconds: each stage calls this before any work, so a bad id stops the first stage
    that runs. `modalities`: the ones to check (default: every enabled one)."""
    from .modalities import modality
    from .preflight import check_data, check_models

    validate_all(params)
    enabled = modalities_config(params).enabled if modalities is None else modalities
    check_models(models_config(params), (*(modality(m).model_key for m in enabled), "text", "llm"))
    if data:
        check_data(prepare_config(params), enabled)


def setup_logging() -> None:
    level = os.environ.get("MMALIGN_LOG_LEVEL", "INFO").upper()
    if int(os.environ.get("RANK", 0)) > 0:  # the other ranks of `accelerate launch`: warnings and errors only
        level = "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store", "filelock", "datasets", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

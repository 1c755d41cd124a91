"""Shared tiny fixtures: everything is built locally in seconds (no hub, no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see mmalign.entry.process_env)
import torch  # noqa: E402
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so tests can import the click commands in stages/

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One thread: tiny models gain nothing from two, and two threads stall badly when another process
# shares the 2 cores (measured: 4 s vs 70 s for the unit tests).
torch.set_num_threads(1)

from mmalign.config import TinyCLIPConfig  # noqa: E402
from mmalign.data.synthetic import generate_synthetic  # noqa: E402
from mmalign.standins.tiny_clip import build_tiny_clip  # noqa: E402
from mmalign.standins.tiny_llm import TinyLLMSpec, build_tiny_llm, caption_documents  # noqa: E402

TINY_CLIP = TinyCLIPConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, patch_size=8)
TINY_LLM = dict(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                steps=30, batch_size=16, lr=3e-3)

# params.yaml overrides that make every stage run in seconds.
TINY_WHISPER = {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "num_mel_bins": 16, "chunk_length": 2}
TINY_PARAMS = {
    "prepare": {"n_train": 48, "n_val": 16, "n_test": 16, "image_size": 32, "batch_size": 16,
                "tiny_clip": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "tiny_llm": TINY_LLM,
                "audio": {"n_train": 32, "n_val": 8, "n_test": 8, "batch_size": 16, "max_events": 2,
                          "tiny_whisper": TINY_WHISPER}},
    "align": {"d_align": 32, "hidden_dim": 64, "mrl_dims": [8, 16, 32], "batch_size": 16, "num_epochs": 2},
    "project": {"k": 2, "projector_hidden": 32, "batch_size": 16, "num_epochs": 1},
    "evaluate": {"max_new_tokens": 8, "gallery_size": 4, "batch_size": 8},
}


# Each stage's argv as dvc.yaml runs it (tests call the click commands with these, in this order).
FEATURES = ["--features", "image=data/features", "--features", "audio=data/audio/features"]
DATASETS = ["--dataset", "image=data/dataset", "--dataset", "audio=data/audio/dataset"]
STAGE_ARGS = {
    "prepare": ["--dataset", "data/dataset", "--models", "models/builtin", "--features", "data/features",
                "--report", "data/prepare_report.json"],
    "prepare_audio": ["--modality", "audio", "--dataset", "data/audio/dataset", "--models", "models/builtin_audio",
                      "--features", "data/audio/features", "--report", "data/audio/prepare_report.json"],
    "llm": [*DATASETS, "--out", "models/llm"],
    "align": [*FEATURES, "--out", "models/aligner", "--plots", "plots/align"],
    "project": ["--llm", "models/llm", "--aligner", "models/aligner", *FEATURES, *DATASETS,
                "--out", "models/projector", "--plots", "plots/project"],
    "evaluate": ["--aligner", "models/aligner", *FEATURES, "--projector", "models/projector", *DATASETS, "--out", "eval"],
}
SCRIPTS = {"prepare_audio": "prepare"}  # stage name -> its script in stages/, where they differ


def run_stages(params: Path, *names: str, args: dict[str, list[str]] | None = None) -> None:
    """Run the named stages' click commands in the current directory (all five by default); `args`
    replaces a stage's argv."""
    import importlib

    for name in names or STAGE_ARGS:
        argv = (args or {}).get(name, STAGE_ARGS[name])
        script = SCRIPTS.get(name, name)
        importlib.import_module(f"stages.{script}").main(["--params", str(params), *argv], standalone_mode=False)


@pytest.fixture(scope="session")
def tiny_data() -> dict:
    return generate_synthetic(0, 24, 8, 8, image_size=32, captions_per_image=3)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", TINY_CLIP, image_size=32)


def _llm(tmp_path_factory, data: dict, chat: bool) -> Path:
    out = tmp_path_factory.mktemp("llm") / "tiny-qwen2"
    docs = caption_documents([s["captions"] for s in data["train"]], seed=0)
    build_tiny_llm(docs, out, TinyLLMSpec(**TINY_LLM, chat_template=chat), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tiny_data) -> Path:
    return _llm(tmp_path_factory, tiny_data, chat=False)


@pytest.fixture(scope="session")
def tiny_chat_llm_dir(tmp_path_factory, tiny_data) -> Path:
    return _llm(tmp_path_factory, tiny_data, chat=True)


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def tiny_params_file(tmp_path) -> Path:
    """A copy of the repo's params.yaml with TINY_PARAMS applied, in a fresh working dir."""
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A working dir holding a tiny trained pipeline (prepare, align, project on TINY_PARAMS): data/,
    models/builtin, models/llm, models/aligner, models/projector. Checkpoints name their models by paths relative to
    it, so tests chdir into it before loading them."""
    work = tmp_path_factory.mktemp("checkpoint")
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        run_stages(params, "prepare", "prepare_audio", "llm", "align", "project")
    return work

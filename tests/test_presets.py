"""Presets are one switch each (`dvc exp run -S model=... -S data=...`, DVC's Hydra composition of conf/):
every preset composes to params that validate, and the default composition is params.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from helpers.presets import compose, pin_overrides
from mmalign.params import validate_all

CONF = ROOT / "conf"
MODEL_PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA_PRESETS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
REAL_MODEL = "clip-b32_minilm_qwen2.5-1.5b"


def leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


def check(params: dict) -> None:
    missing = [k for k, v in leaves(params) if v == "???"]
    assert not missing, f"keys no preset set (??? in conf/config.yaml): {missing}"
    validate_all(params)


def test_default_composition_is_params_yaml():
    """`dvc exp run` with no preset writes what params.yaml holds, so `dvc repro` on the default is unchanged."""
    assert compose(CONF) == yaml.safe_load((ROOT / "params.yaml").read_text())
    assert compose(CONF, ["model=offline", "data=synthetic"]) == compose(CONF)


def test_the_presets_are_there():
    assert {"offline", REAL_MODEL} <= set(MODEL_PRESETS)
    assert {"synthetic", "flickr30k", "coco", "cc3m"} <= set(DATA_PRESETS)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_preset_validates(preset):
    check(compose(CONF, [f"model={preset}"]))


@pytest.mark.parametrize("preset", DATA_PRESETS)
def test_data_preset_validates(preset):
    check(compose(CONF, [f"data={preset}"]))
    check(compose(CONF, [f"model={REAL_MODEL}", f"data={preset}"]))


def test_real_preset_values():
    p = compose(CONF, [f"model={REAL_MODEL}", "data=flickr30k", "audio_data=clotho"])
    assert p["models"] == {"vision": "openai/clip-vit-base-patch32", "audio": "openai/whisper-base",
                           "text": "sentence-transformers/all-MiniLM-L6-v2", "llm": "Qwen/Qwen2.5-1.5B-Instruct",
                           "trust_remote_code": False}
    assert p["prepare"]["vision_pooling"] == "cls" and p["prepare"]["audio"]["pooling"] == "mean"
    audio = p["prepare"]["audio"]
    assert audio["source"] == "audiofolder" and audio["splits"] == {"train": "development", "val": "validation",
                                                                   "test": "evaluation"}
    assert (p["project"]["k"], p["project"]["dtype"], p["project"]["mixed_precision"]) == (10, "bfloat16", "bf16")
    assert p["prepare"]["source"] == "hf" and p["prepare"]["hf"]["split_column"] == "split"
    assert p["prepare"]["splits"] == {"train": "train", "val": "val", "test": "test"}
    # A key given with -S lands on top of the presets.
    assert compose(CONF, [f"model={REAL_MODEL}", "project.k=4"])["project"]["k"] == 4


@pytest.fixture
def scratch_repo(tmp_path) -> Path:
    """A git repo holding what DVC reads to stash experiments (no stage runs)."""
    for f in ("dvc.yaml", "params.yaml", "conf", "configs", ".dvc/config", ".dvc/.gitignore"):
        src, dst = ROOT / f, tmp_path / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    return tmp_path


def dvc(repo: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def queued_params(repo: Path) -> dict[str, dict]:
    import json

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    return {r["name"]: {f: v["data"] for f, v in r["data"]["params"].items()}
            for row in shown for ex in row.get("experiments") or [] for r in ex["revs"]}


def test_dvc_exp_run_switches_presets_with_one_flag_each(scratch_repo):
    """The real mechanism: DVC composes conf/ into each queued experiment's params.yaml, and -S on a
    second params file (configs/accelerate.yaml) still applies as before."""
    dvc(scratch_repo, "exp", "run", "--queue", "-n", "real", "-S", f"model={REAL_MODEL}", "-S", "data=flickr30k")
    dvc(scratch_repo, "exp", "run", "--queue", "-n", "lr", "-S", "align.lr=0.002",
        "-S", "configs/accelerate.yaml:num_processes=2")
    exps = queued_params(scratch_repo)
    assert exps["real"]["params.yaml"] == compose(CONF, [f"model={REAL_MODEL}", "data=flickr30k"])
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    default["align"]["lr"] = 0.002
    assert exps["lr"]["params.yaml"] == default
    assert exps["lr"]["configs/accelerate.yaml"]["num_processes"] == 2
    assert subprocess.run(["git", "status", "--porcelain"], cwd=scratch_repo, capture_output=True,
                          text=True).stdout == ""  # --queue leaves the workspace's params.yaml alone


def test_pin_overrides_keeps_extra_values_under_composition(tmp_path):
    """tests/test_dvc_repro.py pins its tiny sizes this way, so its `dvc exp run -S` runs stay tiny."""
    shutil.copytree(CONF, tmp_path / "conf")
    pin_overrides(tmp_path / "conf", {"prepare": {"n_train": 48}})
    p = compose(tmp_path / "conf", ["align.lr=0.002"])
    assert (p["prepare"]["n_train"], p["align"]["lr"], p["models"]["vision"]) == (48, 0.002, "builtin:tiny-clip")

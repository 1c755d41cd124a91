"""Fail first: model ids and data paths checked in seconds before any work, one-line errors as the
last line (also under `accelerate launch`), stale MLflow runs closed, small data trains on defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from conftest import ROOT
from mmalign.config import AlignmentConfig, ModelsConfig
from mmalign.pipeline.align import clamp_batch_size
from mmalign.preflight import check_models
from mmalign.tracking import stage_run

MISSING = "nonexistent-org/nonexistent-model-xyz"


def test_builtins_packaged_minilm_and_local_dirs_pass(tiny_clip_dir, tiny_llm_dir):
    check_models(ModelsConfig())
    check_models(ModelsConfig(vision=str(tiny_clip_dir), llm=str(tiny_llm_dir)))


@pytest.mark.parametrize("key", ["vision", "text", "llm"])
def test_unknown_hub_id_is_refused_in_seconds_naming_the_key(key):
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^models\.{key}='{MISSING}' .* not in the Hugging Face cache .*Fix:"):
        check_models(ModelsConfig(**{key: MISSING}))
    assert time.monotonic() - start < 5


def test_local_dirs_without_safetensors_or_missing_are_refused(tmp_path, tiny_llm_dir):
    pickled = tmp_path / "llm-bin"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_llm_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match=r"^models\.llm='.*llm-bin' \(LLM\) has only pickle weights "
                                         r"\(pytorch_model\.bin\).*safe_serialization=True"):
        check_models(ModelsConfig(llm=str(pickled)))
    with pytest.raises(ValueError, match=r"^models\.vision='\./no/such/dir' .* is no such directory"):
        check_models(ModelsConfig(vision="./no/such/dir"))


def test_clamp_batch_size_to_small_data(caplog):
    cfg = AlignmentConfig(batch_size=256, d_align=32, mrl_dims=[32])
    assert clamp_batch_size(cfg, 1000, 1) == 256
    assert clamp_batch_size(cfg, 37, 1) == 37 and "larger than the 37 training images" in caplog.text
    assert clamp_batch_size(cfg, 37, 2) == 36  # a multiple of the processes
    with pytest.raises(ValueError, match="align needs at least 2 training images"):
        clamp_batch_size(cfg, 1, 1)


def _stage(args: list[str], cwd, launcher: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("MMALIGN_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "stages/launch.py")] if launcher else [sys.executable]
    return subprocess.run([*cmd, str(ROOT / "stages/align.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("processes", [0, 1, 2], ids=["python", "accelerate-1-process", "accelerate-2-processes"])
def test_a_param_error_is_the_last_line(tmp_path, tiny_params_file, processes):
    """The same one line ends the output of a plain stage and of `accelerate launch` with 2 processes."""
    params = yaml.safe_load(tiny_params_file.read_text())
    params["align"]["lr"] = -1.0
    tiny_params_file.write_text(yaml.safe_dump(params))
    (tmp_path / "configs").mkdir()
    cfg = yaml.safe_load((ROOT / "configs/accelerate.yaml").read_text())
    (tmp_path / "configs/accelerate.yaml").write_text(yaml.safe_dump({**cfg, "num_processes": max(processes, 1)}))
    (tmp_path / "feats").mkdir()
    out = _stage(["--params", str(tiny_params_file), "--features", "feats", "--out", "a", "--plots", "p"], tmp_path,
                 launcher=processes > 0)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last == "ERROR: align failed: align.lr=-1.0 is invalid: must be > 0", out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
    assert len(out.stderr.splitlines()) < 12  # no multi-screen dump


def test_a_stage_marks_its_own_stale_running_run_killed(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    with pytest.raises(KeyboardInterrupt):
        with stage_run("align", "mmalign"):
            raise KeyboardInterrupt
    # A SIGKILLed stage never ends its run: simulate one left RUNNING, then start the stage again.
    exp = mlflow.get_experiment_by_name("mmalign")
    stale = mlflow.MlflowClient().create_run(exp.experiment_id, tags={"mmalign.stage": "align",
                                                                      "mmalign.pipeline": "exp-a"})
    other = mlflow.MlflowClient().create_run(exp.experiment_id, tags={"mmalign.stage": "align",
                                                                      "mmalign.pipeline": "exp-b"})
    with stage_run("align", "mmalign"):
        pass
    client = mlflow.MlflowClient()
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # another pipeline's run is left alone
    statuses = sorted(r.info.status for r in mlflow.search_runs([exp.experiment_id], output_format="list")
                      if "mmalign.stage" in r.data.tags)  # not the pipeline's parent runs
    assert statuses == ["FINISHED", "KILLED", "KILLED", "RUNNING"]

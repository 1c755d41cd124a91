"""MLflow tracking: default store location, grouping tags, and an unreachable server."""

from __future__ import annotations

import logging
import socket
import time

import mlflow
import pytest

from mmalign.tracking import EXPERIMENT_KIND, Tracker, flatten, stage_run, tracking_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_runs(experiment: str, stage: str | None = None) -> list:
    where = f"tags.`mmalign.stage` = '{stage}'" if stage else "tags.`mmalign.stage` != ''"
    return mlflow.search_runs(experiment_names=[experiment], filter_string=where, output_format="list")


def pipeline_runs(experiment: str) -> list:
    return mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`mmalign.role` = 'pipeline'",
                              output_format="list")


def test_default_uri_follows_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid")
    assert tracking_uri() == "http://example.invalid"


def test_stage_run_tags_and_params(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    with stage_run("align", "t", params={"align": {"lr": 0.1}}) as tracker:
        tracker.log_metrics({"a": {"b": 1.0}, "R1": 0.5}, step=3)
    (run,) = stage_runs("t")
    assert run.data.tags["mmalign.stage"] == "align" and run.data.tags["dvc.exp_name"] == "exp-1"
    assert run.data.tags["mmalign.pipeline"] == "exp-1" and run.info.run_name == "exp-1/align"
    assert run.data.params == {"align.lr": "0.1"}
    assert run.data.metrics == {"a.b": 1.0, "R1": 0.5}
    assert run.info.status == "FINISHED"


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError), stage_run("align", "t"):
        1 / 0
    (run,) = stage_runs("t")
    assert run.info.status == "FAILED"
    assert mlflow.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_unreachable_server_required_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable.*tracking.required: false"):
        with stage_run("align", "t", required=True):
            pass
    assert time.monotonic() - start < 15


def test_unreachable_server_not_required_warns_and_runs(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    ran = False
    with caplog.at_level(logging.WARNING), stage_run("align", "t", required=False) as tracker:
        tracker.log_metrics({"x": 1.0})  # a no-op, not an error
        ran = True
    assert ran and not tracker.active and time.monotonic() - start < 15
    assert sum("NOT tracked" in r.message for r in caplog.records) == 1


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_experiment_is_model_development_and_stage_runs_nest_under_one_parent(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    for stage in ("prepare", "align"):  # each stage is its own process under DVC; the parent is found by tag
        with stage_run(stage, "t"):
            pass
    monkeypatch.setenv("DVC_EXP_NAME", "exp-2")
    with stage_run("prepare", "t"):
        pass

    exp = mlflow.get_experiment_by_name("t")
    assert exp.tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"] == "custom_model_development"
    parents = {r.data.tags["mmalign.pipeline"]: r for r in pipeline_runs("t")}
    assert set(parents) == {"exp-1", "exp-2"}
    assert parents["exp-1"].info.run_name == "exp-1" and parents["exp-1"].info.status == "FINISHED"
    assert "mmalign.stage" not in parents["exp-1"].data.tags
    children = {(r.data.tags["mmalign.pipeline"], r.data.tags["mmalign.stage"]): r.data.tags["mlflow.parentRunId"]
                for r in stage_runs("t")}
    assert children == {("exp-1", "prepare"): parents["exp-1"].info.run_id,
                        ("exp-1", "align"): parents["exp-1"].info.run_id,
                        ("exp-2", "prepare"): parents["exp-2"].info.run_id}


def test_an_experiment_without_the_kind_tag_gets_it(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.create_experiment("old", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with stage_run("align", "old"):
        pass
    assert mlflow.get_experiment_by_name("old").tags["mlflow.experimentKind"] == "custom_model_development"


def test_artifacts_outside_the_repo_warn(tmp_path, monkeypatch, caplog):
    """A checkout moved or copied with its mlflow.db: the experiment still points at the old folder."""
    repo, old = tmp_path / "copy", tmp_path / "original"
    repo.mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.create_experiment("t", artifact_location=(old / "mlartifacts").as_uri())
    with caplog.at_level(logging.WARNING), stage_run("align", "t"):
        pass
    (warning,) = [r.getMessage() for r in caplog.records if "outside this repo" in r.getMessage()]
    assert str(old / "mlartifacts") in warning and "tracking.experiment" in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING), stage_run("align", "u"):  # created here: inside the repo, no warning
        pass
    assert not [r for r in caplog.records if "outside this repo" in r.getMessage()]
    assert mlflow.get_experiment_by_name("u").artifact_location == (repo / "mlartifacts").as_uri()


def test_dataset_logged_as_run_input(tmp_path, monkeypatch, mlflow_uri):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    splits = {"train": pd.DataFrame({"id": [1, 2], "captions": [["a red circle"], ["a blue square", "x"]]}),
              "test": pd.DataFrame({"id": [3], "captions": [["a green triangle"]]})}
    with stage_run("prepare", "t") as tracker:
        tracker.log_dataset(splits, name="synthetic", source="data/dataset")
    Tracker(None).log_dataset(splits, name="synthetic", source="x")  # tracking off: a no-op
    (run,) = stage_runs("t", "prepare")
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "test"}
    assert {d.name for d in inputs.values()} == {"synthetic"}
    assert inputs["train"].digest != inputs["test"].digest and len(inputs["train"].digest) == 16
    assert (tmp_path / "data/dataset").as_uri() in inputs["train"].source
    assert '"num_rows": 2' in inputs["train"].profile

    with stage_run("prepare", "t") as tracker:  # the same data: the same digest
        tracker.log_dataset({"train": splits["train"].copy()}, name="synthetic", source="data/dataset")
    runs = stage_runs("t", "prepare")
    assert len({i.dataset.digest for r in runs for i in r.inputs.dataset_inputs
                if i.tags[0].value == "train"}) == 1

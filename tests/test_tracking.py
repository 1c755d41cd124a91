"""MLflow tracking: default store location, grouping tags, and an unreachable server."""

from __future__ import annotations

import logging
import socket
import time

import mlflow
import pytest

from mmalign.tracking import flatten, stage_run, tracking_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        tracker.log_metrics({"a": {"b": 1.0}, "R@1": 0.5}, step=3)
    (run,) = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert run.data.tags["mmalign.stage"] == "align" and run.data.tags["dvc.exp_name"] == "exp-1"
    assert run.data.tags["mmalign.pipeline"] == "exp-1" and run.info.run_name == "exp-1/align"
    assert run.data.params == {"align.lr": "0.1"}
    assert run.data.metrics == {"a.b": 1.0, "R_at_1": 0.5}
    assert run.info.status == "FINISHED"


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError), stage_run("align", "t"):
        1 / 0
    (run,) = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert run.info.status == "FAILED"


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

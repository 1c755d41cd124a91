"""The trained captioner as an MLflow model: logged with a signature, registered, served, and answering a POST
with the same caption as MultimodalLLM.generate."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from mmalign import MultimodalLLM, VisionTextAligner
from mmalign.captioner import example_image_png, log_captioner
from mmalign.tracking import stage_run

NAME = "mmalign-captioner"
MAX_NEW_TOKENS = 12
SERVE_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url} answered {e.code}: {e.read().decode()[:2000]}") from None


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {SERVE_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """The server runs uvicorn under the mlflow CLI: end its whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


@pytest.fixture(scope="module")
def registered(tiny_checkpoint, tmp_path_factory) -> tuple[str, str]:
    """The tiny checkpoint logged + registered in a fresh sqlite store: (tracking uri, version)."""
    store = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny_checkpoint)  # the checkpoints name their models relative to it
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DVC_ROOT", str(store))  # artifacts go to <store>/mlartifacts
        with stage_run("evaluate", "mmalign") as tracker:
            info = log_captioner(tracker, "models/aligner", "models/projector", registered_name=NAME,
                                 max_new_tokens=MAX_NEW_TOKENS)
    return uri, str(info.registered_model_version)


def test_logged_model_has_signature_example_and_registered_version(registered):
    uri, version = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    sig = model.metadata.signature
    assert [c.name for c in sig.inputs.inputs] == ["image", "prompt"] and not sig.inputs.inputs[1].required
    assert [c.name for c in sig.outputs.inputs] == ["caption"]
    assert sig.params.params[0].name == "max_new_tokens" and sig.params.params[0].default == MAX_NEW_TOKENS
    assert model.metadata.saved_input_example_info is not None
    # bytes and base64 strings are both images; a row without a prompt gets the trained one
    png = example_image_png()
    out = model.predict(pd.DataFrame({"image": [png, base64.b64encode(png).decode()], "prompt": [None, ""]}))
    assert list(out.columns) == ["caption"] and out["caption"][0] == out["caption"][1] != ""
    assert mlflow.MlflowClient().get_model_version(NAME, version).status == "READY"


def test_served_model_answers_a_post_with_the_generate_caption(registered, tiny_checkpoint, tmp_path, monkeypatch):
    uri, version = registered
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    elsewhere = tmp_path / "cwd"  # not the checkpoint's dir: the served model must carry its models
    elsewhere.mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{version}",
             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", proc, log)
        png = example_image_png(48)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}}
        answer = post(f"http://127.0.0.1:{port}/invocations", body)
    finally:
        stop(proc)

    monkeypatch.chdir(tiny_checkpoint)  # the checkpoints name their models relative to it
    mm = MultimodalLLM.from_pretrained("models/projector", VisionTextAligner.from_pretrained("models/aligner"))
    image = Image.open(io.BytesIO(png)).convert("RGB")
    expected = mm.generate([image], prompt=mm.cfg.prompt, max_new_tokens=MAX_NEW_TOKENS)[0]
    assert answer == {"predictions": [{"caption": expected}]} and expected


def test_log_into_a_run_by_id_and_model_sources(tiny_checkpoint, tmp_path, monkeypatch):
    from mmalign.captioner import _model_source
    from mmalign.tracking import Tracker

    assert log_captioner(Tracker(None), "models/aligner", "models/projector") is None  # tracking off: no-op
    assert _model_source(None, "Qwen/Qwen2.5-1.5B-Instruct", "LLM", Path("p")) == ("id", "Qwen/Qwen2.5-1.5B-Instruct")
    with pytest.raises(ValueError, match=r"the LLM 'models/builtin/gone' \(named in p/config.json"):
        _model_source(None, "models/builtin/gone", "LLM", Path("p"))

    monkeypatch.chdir(tiny_checkpoint)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("x")).info.run_id
    info = log_captioner(run_id, "models/aligner", "models/projector")  # logged, not registered
    assert info.run_id == run_id and info.registered_model_version is None
    assert set(info.flavors["python_function"]["artifacts"]) == {"aligner", "projector", "llm", "vision"}

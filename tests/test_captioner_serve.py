"""The trained captioner as an MLflow model: logged with a signature, registered, served, and answering a POST
(any of MLflow's payload formats) with the same caption as MultimodalLLM.generate, for images and audio clips;
a bad image is a 400 with one line; the model carries its code and installs from its own requirements.txt."""

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
from mmalign.serving.captioner import BadInput, example_image_png, log_captioner
from mmalign.tracking import stage_run
from test_cli import trained_without

NAME = "mmalign-captioner"
MAX_NEW_TOKENS = 12
SERVE_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, status: int = 200) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    assert code == status, f"{url} answered {code}: {text[:2000]}"
    return json.loads(text)


def serve(model_uri: str, python: str, log: Path, cwd: Path, env: dict) -> subprocess.Popen:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [python, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-p", str(port),
             "-h", "127.0.0.1"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{proc.url}/ping", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def payloads(png: bytes) -> dict[str, dict]:
    """One image in each JSON format the scoring server takes."""
    b64 = base64.b64encode(png).decode()
    return {"dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[b64]]}},
            "dataframe_records": {"dataframe_records": [{"image": b64}]},
            "inputs": {"inputs": {"image": [b64]}},
            "inputs records": {"inputs": [{"image": b64}]},
            "instances": {"instances": [{"image": b64}]}}


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
    assert [c.name for c in sig.inputs.inputs] == ["image", "audio", "prompt"]  # one of image, audio per row
    assert not any(c.required for c in sig.inputs.inputs)
    assert [c.name for c in sig.outputs.inputs] == ["caption"]
    assert sig.params.params[0].name == "max_new_tokens" and sig.params.params[0].default == MAX_NEW_TOKENS
    assert model.metadata.saved_input_example_info is not None
    # bytes and base64 strings are both images; a row without a prompt gets the trained one
    png = example_image_png()
    out = model.predict(pd.DataFrame({"image": [png, base64.b64encode(png).decode()], "prompt": [None, ""]}))
    assert list(out.columns) == ["caption"] and out["caption"][0] == out["caption"][1] != ""
    assert mlflow.MlflowClient().get_model_version(NAME, version).status == "READY"


def captioner(tiny_checkpoint: Path, monkeypatch) -> MultimodalLLM:
    monkeypatch.chdir(tiny_checkpoint)  # the checkpoints name their models relative to it
    return MultimodalLLM.from_pretrained("models/projector", VisionTextAligner.from_pretrained("models/aligner"))


def expected_caption(tiny_checkpoint: Path, png: bytes, monkeypatch) -> str:
    mm = captioner(tiny_checkpoint, monkeypatch)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return mm.generate([image], prompt=mm.cfg.prompt, max_new_tokens=MAX_NEW_TOKENS)[0]


def flac_clips(tiny_checkpoint: Path, n: int = 2) -> list[bytes]:
    """FLAC bytes of the tiny audio dataset's test split."""
    import datasets

    return datasets.load_from_disk(str(tiny_checkpoint / "data/audio/dataset"))["test"][:n]["audio"]


def test_logged_model_captions_audio_rows(registered, tiny_checkpoint, monkeypatch):
    uri, version = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    clips, png = flac_clips(tiny_checkpoint), example_image_png()
    # each row an image or a clip (bytes or base64), the other column empty; prompts per row
    out = model.predict(pd.DataFrame({"image": [None, png, None, None],
                                      "audio": [clips[0], None, base64.b64encode(clips[1]).decode(), clips[1]],
                                      "prompt": [None, None, "", "What is here?"]}))
    mm = captioner(tiny_checkpoint, monkeypatch)
    heard = mm.generate(clips, max_new_tokens=MAX_NEW_TOKENS, modality="audio")  # "Describe this sound:"
    asked = mm.generate(clips[1:], "What is here?", MAX_NEW_TOKENS, modality="audio")
    seen = mm.generate([Image.open(io.BytesIO(png)).convert("RGB")], max_new_tokens=MAX_NEW_TOKENS)
    assert list(out["caption"]) == [heard[0], seen[0], heard[1], asked[0]]
    assert list(model.predict(pd.DataFrame({"audio": clips}))["caption"]) == heard  # no image column at all

    for frame, message in [({"image": [png, png], "audio": [None, clips[0]]}, "row 1: give an image or an audio "
                            "clip, not both"),
                           ({"image": [png, None], "audio": [None, None]}, "row 1: no image and no audio"),
                           ({"audio": [clips[0], b"RIFF not a wav"]}, "row 1, column audio: unreadable audio"),
                           ({"prompt": ["hi"]}, "needs a column 'image' .* or 'audio'")]:
        with pytest.raises(BadInput, match=message):
            model.predict(pd.DataFrame(frame))


def test_served_model_answers_every_payload_and_a_bad_image_with_one_line(registered, tiny_checkpoint, tmp_path,
                                                                           monkeypatch):
    uri, version = registered
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    elsewhere = tmp_path / "cwd"  # not the checkpoint's dir: the served model must carry its models
    elsewhere.mkdir()
    png = example_image_png(48)
    proc = serve(f"models:/{NAME}/{version}", sys.executable, tmp_path / "serve.log", elsewhere, env)
    try:
        answers = {name: post(f"{proc.url}/invocations", body) for name, body in payloads(png).items()}
        clip = base64.b64encode(flac_clips(tiny_checkpoint, 1)[0]).decode()
        heard = [post(f"{proc.url}/invocations", body) for body in (
            {"dataframe_records": [{"audio": clip}]},
            {"inputs": [{"image": base64.b64encode(png).decode()}, {"audio": clip}]})]  # records may mix
        bad = {"inputs": {"image": [base64.b64encode(b"not an image").decode()]}}
        error = post(f"{proc.url}/invocations", bad, status=400)
        error_split = post(f"{proc.url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["%%"]]}},
                           status=400)
    finally:
        stop(proc)

    expected = expected_caption(tiny_checkpoint, png, monkeypatch)
    assert expected and answers == dict.fromkeys(answers, {"predictions": [{"caption": expected}]})
    sound = captioner(tiny_checkpoint, monkeypatch).generate(flac_clips(tiny_checkpoint, 1),
                                                             max_new_tokens=MAX_NEW_TOKENS, modality="audio")[0]
    assert heard == [{"predictions": [{"caption": sound}]},
                     {"predictions": [{"caption": expected}, {"caption": sound}]}]
    for e in (error, error_split):
        assert e["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in e
        assert "\n" not in e["message"] and e["message"].startswith("row 0, column image:"), e
    assert "not an image file PIL can read" in error["message"]


def test_model_ships_its_code_and_pypi_requirements(registered):
    uri, version = registered
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}"))
    requirements = (local / "requirements.txt").read_text().split()
    names = [r.split("==")[0] for r in requirements]
    assert "mmalign" not in names and {"mlflow", "torch", "transformers", "pillow"} <= set(names)
    assert all("+" not in r for r in requirements)  # no local version label (2.13.0+cpu is not on PyPI)
    assert (local / "code/mmalign/serving/captioner.py").is_file()


@pytest.mark.slow
def test_model_serves_from_a_fresh_venv_with_only_its_requirements(registered, tiny_checkpoint, tmp_path, monkeypatch):
    """What `mlflow models serve --env-manager virtualenv` does: a new environment with the model's
    requirements.txt and nothing else (no mmalign installed), then serve. Minutes: it installs torch."""
    uri, version = registered
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(tmp_path / "model")))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([python, "-m", "pip", "install", "-q", "-r", str(local / "requirements.txt")], check=True,
                   env=env, timeout=1200)
    assert subprocess.run([python, "-c", "import mmalign"], env=env, capture_output=True).returncode != 0

    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"})
    png = example_image_png(48)
    (tmp_path / "cwd").mkdir()
    proc = serve(str(local), python, tmp_path / "serve.log", tmp_path / "cwd", env)
    try:
        answer = post(f"{proc.url}/invocations", payloads(png)["inputs"])
    finally:
        stop(proc)
    assert answer == {"predictions": [{"caption": expected_caption(tiny_checkpoint, png, monkeypatch)}]}


def test_log_into_a_run_by_id_and_model_sources(tiny_checkpoint, tmp_path, monkeypatch):
    from mmalign.serving.captioner import _model_source
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
    assert set(info.flavors["python_function"]["artifacts"]) == {"aligner", "projector", "llm", "vision", "audio"}


def test_aligner_trained_without_images_logs_no_vision_encoder(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint)
    aligner = trained_without("image", tmp_path / "aligner")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("x")).info.run_id
    info = log_captioner(run_id, aligner, "models/projector", max_new_tokens=4)
    assert set(info.flavors["python_function"]["artifacts"]) == {"aligner", "projector", "llm", "audio"}
    model = mlflow.pyfunc.load_model(info.model_uri)  # its input example is a clip
    clip = flac_clips(tiny_checkpoint, 1)
    assert len(model.predict(pd.DataFrame({"audio": clip}))) == 1
    with pytest.raises(BadInput, match="row 0, column image: this model was trained without image"):
        model.predict(pd.DataFrame({"image": [example_image_png()]}))

"""The trained captioner as an MLflow pyfunc model: logging (with its signature, input example and
requirements) and the model class `mlflow models serve` answers with: images and audio clips -> captions."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ..tracking import Tracker, store_lock

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the mmalign package, shipped inside the logged model (code_paths)


class BadInput(MlflowException):
    """An input the model cannot use: the scoring server answers 400 with this one line as `message`.

    The server rewrites the message of an MlflowException raised in predict to "Failed to predict data
    '<the whole input>'. \\nError: ..." (for an image, kilobytes of base64 over two lines); this class
    keeps its own message. Any other exception would be a 400 with the server's stack trace in the body.
    """

    def __init__(self, message: str):
        self._line = " ".join(str(message).split())
        super().__init__(self._line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass  # the scoring server's rewrite, see the class docstring


# MLflow warns (in ANSI colours, through a "once" filter of its own that no filter of ours precedes) when a
# PythonModel subclass's predict has no type hints; this one has none on purpose: the logged signature is
# its schema. The class statement's stderr is dropped, and nothing else runs in it.
with contextlib.redirect_stderr(io.StringIO()):

    class CaptionerModel(mlflow.pyfunc.PythonModel):
        """Images and audio clips -> captions with a trained aligner + projector + LLM (`mlflow models serve`
        answers with it).

        Artifacts: `aligner`, `projector` (checkpoint dirs), `llm`, and the encoder of each modality the aligner
        was trained on: `vision`, `audio` (model dirs in HF format; a model trained from a hub id is referenced
        by that id in model_config instead of copied).
        Input: a DataFrame with columns `image` (encoded image bytes, or the same as a base64 string; a served
        model receives JSON, where binary columns are base64) and `audio` (WAV/FLAC/OGG/MP3 file bytes, or
        base64), exactly one of them per row, and optional `prompt` (empty: the prompt the projector was
        trained with for the row's modality). Param `max_new_tokens`. Output: a DataFrame, column `caption`.
        Served, it answers the `dataframe_split`, `dataframe_records`, `inputs` and `instances` payloads; an
        unreadable image or clip is a 400 whose message is one line naming the row. One request may mix images
        and clips as `inputs` records ({"inputs": [{"image": ...}, {"audio": ...}]}): MLflow's parsing of the
        other payloads fails on an empty binary cell.
        """

        def load_context(self, context: Any) -> None:
            from .inference import load_captioner

            a, config = context.artifacts, context.model_config or {}
            models = {k: a.get(k) or config.get(k) for k in ("llm", "vision", "audio")}
            self.model = load_captioner(a["aligner"], a["projector"], models, need=None)
            self.max_new_tokens = int(config.get("max_new_tokens", 48))
            self.batch_size = int(config.get("batch_size", 16))

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
            import pandas as pd

            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            if not {"image", "audio"} & set(df.columns):
                raise BadInput("the input needs a column 'image' (image bytes or base64) or 'audio' (audio file "
                               f"bytes or base64); got {list(df.columns)}")
            max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
            rows = [self._decode(i, row) for i, row in enumerate(df.to_dict("records"))]
            given = df["prompt"] if "prompt" in df.columns else [None] * len(df)
            keys = [(m, p if isinstance(p, str) and p else self.model.cfg.prompt_for(m))
                    for (m, _), p in zip(rows, given)]
            captions = [""] * len(df)
            for modality, prompt in dict.fromkeys(keys):  # one batched generate per modality and distinct prompt
                group = [i for i, k in enumerate(keys) if k == (modality, prompt)]
                out = self.model.generate([rows[i][1] for i in group], prompt=prompt, max_new_tokens=max_new_tokens,
                                          batch_size=self.batch_size, modality=modality)
                for i, caption in zip(group, out):
                    captions[i] = caption
            return pd.DataFrame({"caption": captions})

        def _decode(self, i: int, row: dict) -> tuple[str, Any]:
            """Row i -> (its modality, its decoded image or clip); BadInput naming the row."""
            from .inference import InputError, clip_decoder, decode_image, decode_value

            given = [m for m in ("image", "audio") if _present(row.get(m))]
            if len(given) != 1:
                raise BadInput(f"row {i}: " + ("give an image or an audio clip, not both" if given else
                                                "no image and no audio (each row needs one of them)"))
            modality, name = given[0], f"row {i}, column {given[0]}"
            if modality not in self.model.aligner.modalities:
                raise BadInput(f"{name}: this model was trained without {modality}")
            try:
                if modality == "image":
                    return modality, decode_image(row[modality], name)
                return modality, decode_value(row[modality], clip_decoder(self.model.aligner), name, "audio")
            except InputError as e:
                raise BadInput(str(e)) from None


def _present(value: Any) -> bool:
    """A cell that holds something: not None, NaN or NA (what pandas fills a row's missing column with)."""
    import pandas as pd

    return not (value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)))


# MLflow "models from code": the model is this script (saved with it), so loading unpickles nothing.
MODEL_CODE = """\
import mlflow

from mmalign.serving.captioner import CaptionerModel

mlflow.models.set_model(CaptionerModel())
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


def example_audio_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A small generated test clip (a 440 Hz tone fading out), WAV bytes."""
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.5 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t), rate, format="WAV")
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
    """What the served model imports, pinned to this environment and installable from PyPI (mmalign itself
    travels in the model as code). Given explicitly because MLflow's inference of them loads the model."""
    from importlib import metadata

    out = []
    for dist in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "sentence-transformers", "peft",
                 "pillow", "soundfile", "scipy", "pandas", "numpy", "tqdm"):
        try:
            # A local version label (torch 2.13.0+cpu) is not on PyPI; the public version is.
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def log_captioner(tracker_or_run: Any, aligner_dir: str | Path, projector_dir: str | Path,
                  llm_dir: str | Path | None = None, registered_name: str | None = None, *,
                  vision_dir: str | Path | None = None, audio_dir: str | Path | None = None,
                  max_new_tokens: int = 48, batch_size: int = 16, name: str = "captioner") -> Any:
    """Log the trained captioner as an MLflow pyfunc model (signature + input example) and register it.

    tracker_or_run: the Tracker of an open stage run (an inactive one logs nothing and this returns None),
    or a run id or mlflow Run to log into. llm_dir / vision_dir / audio_dir default to the model paths the
    checkpoints name (the projector's model_name, the aligner's encoder of each modality it was trained on: the
    directories `prepare` wrote, relative to the cwd); they are copied into the model with the aligner and
    projector checkpoints, except a hub id (`Qwen/Qwen2.5-1.5B-Instruct`), which the served model loads by name
    (from the HF cache). An encoder of a modality the aligner has no adapter for is left out.
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

    from ..utils import read_json
    from .inference import model_slots

    aligner_dir, projector_dir = Path(aligner_dir), Path(projector_dir)
    given = {"vision": vision_dir, "audio": audio_dir}
    encoders = {k: _model_source(given.get(k), holder[field], f"{k} encoder", aligner_dir)
                for k, (holder, field) in model_slots(read_json(aligner_dir / "config.json")).items() if k != "text"}
    models = {"llm": _model_source(llm_dir, read_json(projector_dir / "config.json")["model_name"], "LLM",
                                   projector_dir), **encoders}
    # the example is an image, or a clip for an aligner trained without images
    example = {"image": [example_image_png()]} if "vision" in encoders else {"audio": [example_audio_wav()]}
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("binary", "audio", required=False),
                       ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string", "caption")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]))
    kwargs = dict(
        name=name,
        artifacts={"aligner": str(aligner_dir), "projector": str(projector_dir),
                   **{k: v for k, (kind, v) in models.items() if kind == "artifact"}},
        model_config={"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                      **{k: v for k, (kind, v) in models.items() if kind == "id"}},
        signature=signature, input_example=pd.DataFrame(example),
        pip_requirements=_requirements(), code_paths=[str(PACKAGE_DIR)], registered_model_name=registered_name)
    with tempfile.TemporaryDirectory(prefix="mmalign-captioner-") as tmp, warnings.catch_warnings():
        # predict takes a DataFrame and has no type hints on purpose: the signature above is the schema.
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # after an ANSI code
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

"""Models by id or path: an unknown model (or hub dataset) id fails in seconds with a message that names
it and the fix (with and without HF_HUB_OFFLINE), a broken local directory names the path, and SigLIP
vision towers load too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mmalign.config import LLMConfig
from mmalign.models.encoders import FrozenTextEncoder, FrozenVisionEncoder, ModelLoadError
from mmalign.models.llm import load_llm

MISSING = "nonexistent-org/nonexistent-model-xyz"
KINDS = {"vision": "vision encoder", "text": "text encoder", "llm": "LLM", "dataset": "dataset"}

# Loads MISSING with each loader in a fresh process (huggingface_hub reads HF_HUB_OFFLINE at import).
SCRIPT = f"""
import json, time
from mmalign.config import LLMConfig
from mmalign.models.encoders import FrozenTextEncoder, FrozenVisionEncoder, ModelLoadError
from mmalign.config import PrepareConfig, from_dict
from mmalign.data.sources import load_source
from mmalign.models.llm import load_llm
out = {{}}
for kind, load in (("vision", FrozenVisionEncoder), ("text", FrozenTextEncoder),
                   ("llm", lambda n: load_llm(LLMConfig(model_name=n))),
                   ("dataset", lambda n: load_source(from_dict(PrepareConfig, {{"source": "hf",
                                                                               "hf": {{"path": n}}}})))):
    start = time.monotonic()
    try:
        load({MISSING!r})
        out[kind] = {{"error": None}}
    except (ModelLoadError, ValueError) as e:
        out[kind] = {{"error": str(e)}}
    out[kind]["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "no-offline-flag"])
def test_unknown_id_fails_fast_with_the_fix(offline, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=90,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, what in KINDS.items():
        msg, seconds = result[kind]["error"], result[kind]["seconds"]
        assert msg is not None and seconds < 30, (kind, seconds)
        assert msg.startswith(f"cannot load {what} '{MISSING}'") and "\n" not in msg and "Fix:" in msg
        if offline:
            assert "HF_HUB_OFFLINE is set" in msg and "HF_HOME" in msg
            assert f"set models.{kind} to a local directory" in msg or kind == "dataset"
    if not offline:  # here the hub is unreachable: one quick probe, then the local cache only
        assert all(result[k]["seconds"] < 10 for k in KINDS), result


def test_broken_local_directory_names_the_path(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for load, what in ((FrozenVisionEncoder, "vision encoder"), (FrozenTextEncoder, "text encoder"),
                       (lambda n: load_llm(LLMConfig(model_name=n)), "LLM")):
        with pytest.raises(ModelLoadError, match=f"^cannot load {what} from local path '{tmp_path}': "):
            load(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"'\./no/such/dir': no such directory\. Fix: check the path"):
        FrozenVisionEncoder("./no/such/dir")


def test_non_vision_tower_is_refused(tiny_llm_dir):
    with pytest.raises(ModelLoadError, match=r"is a 'qwen2' model; supported: CLIP and SigLIP vision towers"):
        FrozenVisionEncoder(str(tiny_llm_dir))


def test_siglip_vision_tower_loads_by_path(tmp_path):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    SiglipVisionModel(config).save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    from PIL import Image

    px = FrozenVisionEncoder(str(tmp_path)).preprocess([Image.new("RGB", (40, 30), (200, 10, 10))] * 2)
    assert px.shape == (2, 3, 32, 32)
    for pooling, dim in (("cls", 32), ("mean", 32), ("grid", 32 * 4)):
        enc = FrozenVisionEncoder(str(tmp_path), pooling=pooling, grid=2)
        assert not enc.has_cls and enc.dim == dim and enc(px).shape == (2, dim)

"""A trained model as one directory that loads from any working directory (`mmalign export`).

The pipeline's checkpoints name their frozen models as `dvc repro` wrote them: paths relative to the
repo root. An export rewrites those names so the directory stands alone:

    DIR/mmalign.json                          which checkpoints the directory holds
    DIR/aligner/   model.safetensors config.json checksums.json
    DIR/projector/ (the same; absent for an aligner-only export)
    DIR/models/vision, models/audio, models/llm, ...   only with copy_models: the frozen models themselves
                                              (an encoder only for a modality the aligner was trained on)

A frozen model given by hub id stays a hub id; a local one is named by its absolute path, or, copied
in, by its path inside DIR (resolved against DIR when loading: inference.load_aligner/load_captioner).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..utils import atomic_path, read_json
from .inference import MANIFEST, model_slots

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model.safetensors", "config.json", "checksums.json")


def export_model(aligner_dir: str | Path, projector_dir: str | Path | None, out: str | Path,
                 copy_models: bool = False) -> Path:
    """Write the export directory `out` (atomically; an existing `out` is replaced). Local model paths in the
    checkpoints are read relative to the current directory, as the pipeline wrote them."""
    out = Path(out)
    sources = {"aligner": Path(aligner_dir), **({"projector": Path(projector_dir)} if projector_dir else {})}
    for kind, d in sources.items():
        if not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
            raise FileNotFoundError(f"{kind} checkpoint {d} has no model.safetensors + config.json: train it "
                                    f"(`dvc repro`) or pass --{kind}")
    models: dict[str, str] = {}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for kind, d in sources.items():
            (tmp / kind).mkdir()
            for name in CHECKPOINT_FILES:
                if (d / name).is_file():
                    shutil.copy2(d / name, tmp / kind / name)
            cfg = read_json(d / "config.json")
            for folder, (holder, key) in model_slots(cfg).items():  # folder: vision, audio, text, llm
                name = holder.get(key)
                if not name or not Path(name).expanduser().exists():
                    continue  # a hub id (or unset): loads by name wherever the hub or its cache is
                local = Path(name).expanduser().resolve()
                if copy_models:
                    shutil.copytree(local, tmp / "models" / folder)
                    holder[key] = f"models/{folder}"
                else:
                    holder[key] = str(local)
                models[folder] = holder[key]
            (tmp / kind / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        manifest = {"format": "mmalign-export", "version": 1, "aligner": "aligner",
                    "projector": "projector" if projector_dir else None, "models": models}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s to %s", " + ".join(sources), out)
    return out

"""The modalities paired with text: what each one is, in one table.

A modality is data, not a code path: every stage loops over the enabled ones (`modalities:` in
params.yaml) and reads what it needs from its row here. Adding one means a row, a frozen-encoder
class with the same interface (name, dim, preprocess, forward, fingerprint), a data source and its
params; the stages, the feature cache, the aligner, the losses, evaluate and serving need no edit.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import MODALITIES as NAMES


@dataclass(frozen=True)
class Modality:
    name: str  # the key under `modalities:`, in metrics (eval/metrics_all.json) and MLflow
    letter: str  # retrieval directions: i2t / t2i, a2t / t2a
    column: str  # the dataset column holding the media (images, audio file bytes)
    model_key: str  # `models.<model_key>` names its frozen encoder
    noun: str  # "image" / "sound": messages and the default caption prompt
    load_encoder: Callable[[], type]  # its frozen-encoder class, imported when first used
    prefix: str  # metric and file prefix ("" for the image: the seed-era keys CIDEr, eval/plots/r1_by_dim.csv stay)
    task_metric: str | None = None  # the text->item retrieval metric its field reports besides R@1 (headline)

    def encoder_class(self) -> Any:
        return self.load_encoder()


def _vision() -> type:
    from .models.encoders import FrozenVisionEncoder

    return FrozenVisionEncoder


def _audio() -> type:
    from .models.audio_encoder import FrozenAudioEncoder

    return FrozenAudioEncoder


MODALITIES: dict[str, Modality] = {m.name: m for m in (
    Modality("image", "i", "image", "vision", "image", _vision, ""),
    Modality("audio", "a", "audio", "audio", "sound", _audio, "audio_",
             "mAP10"),  # DCASE language-based audio retrieval ranks by text->audio mAP@10
)}
assert tuple(MODALITIES) == NAMES, "config.MODALITIES and this table list the same modalities, in order"


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise ValueError(f"unknown modality '{name}': allowed: {', '.join(MODALITIES)}")
    return MODALITIES[name]

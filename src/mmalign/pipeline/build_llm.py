"""llm: the decoder LLM of Phase 2. A hub id or path is recorded as is; `builtin:tiny-qwen2` is built
here (pretrained on the training captions). A stage of its own, so changing the LLM or the stand-in's
recipe re-runs project and evaluate, never the feature extraction in prepare."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import BUILTIN_LLM, ModelsConfig, TinyLLMSpec
from ..utils import atomic_path

log = logging.getLogger(__name__)


def run(models: ModelsConfig, spec: TinyLLMSpec, dataset_dirs: list[Path], out_dir: Path, tracker: Any
        ) -> dict[str, str]:
    """Write out_dir/models.json {"llm": name or path}, and the stand-in itself when it is builtin (pretrained
    on the training captions of every dataset in `dataset_dirs`: the enabled modalities', in order)."""
    resolved = {"llm": models.llm}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if models.llm == BUILTIN_LLM:
            import datasets

            from ..standins.tiny_llm import build_tiny_llm, caption_documents

            captions = [caps for d in dataset_dirs for caps in datasets.load_from_disk(str(d))["train"]["captions"]]
            stats = build_tiny_llm(caption_documents(captions, spec.seed), tmp / "tiny-qwen2", spec)
            log.info("tiny LLM pretrained: loss %.3f -> %.3f", stats["initial_loss"], stats["final_loss"])
            tracker.log_metrics({"tiny_llm_initial_loss": stats["initial_loss"],
                                 "tiny_llm_final_loss": stats["final_loss"]})
            resolved["llm"] = str(out_dir / "tiny-qwen2")
        (tmp / "models.json").write_text(json.dumps(resolved, indent=2) + "\n")
    return resolved

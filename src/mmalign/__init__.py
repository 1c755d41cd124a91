"""mmalign: frozen encoders -> aligned space (Phase 1) -> LLM prefix captions (Phase 2).

The seed's Quick Start API:
    from mmalign import AlignmentConfig, VisionTextAligner, get_device, set_seed
    from mmalign import train_alignment, create_dataloader, ImageTextDataset
    from mmalign import LLMConfig, MultimodalLLM

Names load on first use (PEP 562), so `import mmalign.params` (every stage does) does not pull in
torch models it never uses, and each DVC stage's import closure stays the modules it really needs.
"""

import importlib

_EXPORTS = {
    "VisionTextAligner": "models.aligner", "AlignmentConfig": "config", "LLMConfig": "config", "LoRAConfig": "config",
    "ImageTextDataset": "data.dataset", "create_dataloader": "data.dataset", "MultimodalLLM": "models.llm",
    "VisionToLLMProjector": "models.projector", "train_alignment": "training.train",
    "train_projector": "training.train", "get_device": "utils", "set_seed": "utils",
    "from_pretrained": "serving.inference", "export_model": "serving.export",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

"""mmalign: frozen encoders -> aligned space (Phase 1) -> LLM prefix captions (Phase 2).

The seed's Quick Start API:
    from mmalign import AlignmentConfig, VisionTextAligner, get_device, set_seed
    from mmalign import train_alignment, create_dataloader, ImageTextDataset
    from mmalign import LLMConfig, MultimodalLLM
"""

from .aligner import VisionTextAligner
from .config import AlignmentConfig, LLMConfig, LoRAConfig
from .data.dataset import ImageTextDataset, create_dataloader
from .llm import MultimodalLLM, VisionToLLMProjector
from .train import train_alignment, train_projector
from .utils import get_device, set_seed

__all__ = [
    "AlignmentConfig", "VisionTextAligner", "get_device", "set_seed", "train_alignment", "create_dataloader",
    "ImageTextDataset", "LLMConfig", "LoRAConfig", "MultimodalLLM", "VisionToLLMProjector", "train_projector",
]
__version__ = "0.1.0"

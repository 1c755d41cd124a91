"""mmalign: frozen encoders -> aligned space (Phase 1) -> LLM prefix captions (Phase 2).

The seed's Quick Start API:
    from mmalign import AlignmentConfig, VisionTextAligner, get_device, set_seed
    from mmalign import train_alignment, create_dataloader, ImageTextDataset
    from mmalign import LLMConfig, MultimodalLLM
"""

import os

# OpenMP threads that spin while waiting stall badly when another process shares the cores (two
# queued experiments, a test run): measured on 2 cores, a small-matmul loop took 24.7 s vs 8.4 s
# with passive waiting, and 1.82 s vs 1.88 s on an idle machine. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .aligner import VisionTextAligner  # noqa: E402
from .config import AlignmentConfig, LLMConfig, LoRAConfig  # noqa: E402
from .data.dataset import ImageTextDataset, create_dataloader  # noqa: E402
from .llm import MultimodalLLM, VisionToLLMProjector  # noqa: E402
from .train import train_alignment, train_projector  # noqa: E402
from .utils import get_device, set_seed  # noqa: E402

__all__ = [
    "AlignmentConfig", "VisionTextAligner", "get_device", "set_seed", "train_alignment", "create_dataloader",
    "ImageTextDataset", "LLMConfig", "LoRAConfig", "MultimodalLLM", "VisionToLLMProjector", "train_projector",
]
__version__ = "0.1.0"

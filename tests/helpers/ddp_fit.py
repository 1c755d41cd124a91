"""Train a tiny aligner for a few steps with `fit`, recording the loss terms and the gradients of every step.

Run in-process (one rank), or under `accelerate launch --num_processes N` (N ranks: DDP over gloo).
Every rank writes <out>/rank<r>.safetensors + rank<r>.json. Used by tests/test_distributed.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmalign.training import distributed
from mmalign.models.aligner import VisionTextAligner
from mmalign.config import AlignmentConfig
from mmalign.data.dataset import FeaturePairBatches
from mmalign.training.train import train_alignment

TERMS = {"clip": dict(clip_weight=1.0, mrl_weight=0.0), "mrl": dict(clip_weight=0.0, mrl_weight=1.0)}


def run(out: Path, term: str, steps: int = 3, batch_size: int = 8) -> None:
    torch.manual_seed(0)
    n = steps * batch_size
    vision, text = torch.randn(n, 12), torch.randn(2 * n, 10)
    t2i = torch.arange(2 * n) // 2
    cfg = AlignmentConfig(vision_dim=12, text_dim=10, d_align=16, hidden_dim=24, depth=2, dropout=0.0,
                          mrl_dims=[4, 8, 16], batch_size=batch_size, num_epochs=1, lr=1e-2, warmup_ratio=0.0,
                          grad_clip=1e3, **TERMS[term])
    model = VisionTextAligner(cfg)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads: dict[str, torch.Tensor] = {}
    rows: list[dict[str, float]] = []

    def record(metrics: dict[str, float], step: int) -> None:  # after each step, whose gradients are still in .grad
        if "train/loss" not in metrics:
            return
        i = len(rows)
        grads.update({f"step{i}.{k}": p.grad.detach().clone() for k, p in named.items()})
        rows.append({})

    hist = train_alignment(model, FeaturePairBatches(vision, text, t2i, batch_size, seed=3), on_log=record,
                           progress=False)
    model.clamp_logit_scale_()
    losses = [{k: v for k, v in s.items() if k.startswith("train/") and k not in ("train/lr",)} for s in hist["steps"]]
    final = {f"final.{k}": p.detach().clone() for k, p in named.items()}
    out.mkdir(parents=True, exist_ok=True)
    r = distributed.rank()
    save_file({**grads, **final}, out / f"rank{r}.safetensors")
    (out / f"rank{r}.json").write_text(json.dumps({"world_size": distributed.world_size(), "losses": losses}))


if __name__ == "__main__":
    distributed.init()
    run(Path(sys.argv[1]), sys.argv[2])

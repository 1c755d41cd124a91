"""Full training state for resuming a killed run: safetensors + JSON, written atomically.

Holds the trainable weights, the optimizer and scheduler state, the torch RNG state, the step and
the history so far, and the best weights seen; nothing is pickled. A state written for other
params or data (`fingerprint`) is never resumed from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..utils import atomic_path

log = logging.getLogger(__name__)


def save_state(directory: Path, *, model_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor] | None,
               optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict[str, Any]) -> None:
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
    for idx, slots in opt["state"].items():
        tensors.update({f"opt.{idx}.{name}": torch.as_tensor(v) for name, v in slots.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "has_best": best_state is not None}
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))


def load_state(directory: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, meta) of a resumable state for `fingerprint`, or None (with the reason logged)."""
    meta_path, tensor_path = directory / "state.json", directory / "state.safetensors"
    if not meta_path.exists() or not tensor_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(tensor_path)
    except Exception as e:  # corrupt state: start over rather than trust it
        log.warning("ignoring unreadable training state in %s (%s); starting from scratch", directory, e)
        return None
    if meta.get("fingerprint") != fingerprint:
        log.warning("training state in %s was written for other params or data; starting from scratch", directory)
        return None
    return tensors, meta


def restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], params: dict[str, torch.nn.Parameter],
            optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, torch.Tensor] | None:
    """Load weights, optimizer, scheduler and RNG in place; return the best weights (or None)."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"model.{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, slot = key.split(".", 2)
            state.setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if not meta.get("has_best"):
        return None
    return {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}

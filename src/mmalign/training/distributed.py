"""Multi-process data-parallel training: `accelerate launch` starts the processes, torch DDP averages
gradients, and the contrastive losses see the global batch through `gather_with_grad`.

Every rank reads the same global batch (loaders are a function of (seed, epoch)) and trains on its
contiguous shard. For the contrastive losses N processes then compute what one process computes on
the whole batch (tests/test_distributed.py); Phase 2's gradient is the mean of the per-rank
token-mean losses, as with any DDP language-model training. Everything here is a no-op in a
single process.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group when launched by `accelerate launch` / torchrun (LOCAL_RANK is set).

    accelerate's PartialState reads the launcher's environment and picks the backend: NCCL on GPUs,
    gloo on CPU. On CPU the launcher pins every process to 1 thread; the cores are shared out instead,
    or `MMALIGN_THREADS` threads each (CPU float reductions round by thread count: equal counts give
    equal bytes, e.g. a 2-process feature cache equal to the 1-process one).
    """
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(int(os.environ.get("MMALIGN_THREADS", 0)) or max(1, cores // local))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def shard(batch: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's contiguous slice of a global batch (tensors and lists alike).

    None when the batch has fewer rows than there are ranks (every rank sees the same batch, so all
    of them skip that step together).
    """
    n_ranks = world_size()
    if n_ranks == 1:
        return batch
    rows = {k: len(v) for k, v in batch.items() if not isinstance(v, str)}  # strings (a batch's modality) go whole
    if min(rows.values()) < n_ranks:
        return None
    r = rank()
    return {k: v[n * r // n_ranks:n * (r + 1) // n_ranks] if k in rows else v
            for k, v in batch.items() for n in [rows.get(k, 0)]}


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own rows.

    Every rank computes the same global loss L, so the gradient reaching rank r's rows is
    N * dL/dz_r; DDP's gradient averaging divides by N again. Same semantics as open_clip's
    gather_features(gather_with_grad=True) (torch.distributed.nn.all_gather).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)  # (N * B, D)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (N * B, D) in rank order, differentiable; `x` itself in one process.

    Every rank must pass the same B (the align loader drops the last partial batch for this).
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call forward on: DDP around `model` when there are several ranks."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # Buffers (rotary tables, ...) are identical on every rank; broadcasting them each step is waste.
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (validation runs on rank 0 only; all ranks need its verdict)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scalar averaged over the ranks, in one all_reduce (Phase 2's per-rank losses; the
    contrastive terms are already the global-batch values on every rank)."""
    if world_size() == 1:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])  # (K,)
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world_size()))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def native_bf16(device: torch.device) -> bool:
    """The device computes bf16 matmuls in hardware: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16
    (elsewhere CPU bf16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_precision(device: torch.device, mixed_precision: str) -> str:
    """`auto` -> `bf16` where the device computes bf16 natively (native_bf16), else `none`; others as they are."""
    return ("bf16" if native_bf16(device) else "none") if mixed_precision == "auto" else mixed_precision


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `mixed_precision: bf16`; nothing for `none` (nanoGPT's ctx)."""
    if mixed_precision == "none":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"mixed_precision=bf16: {torch.cuda.get_device_name(device)} does not support bf16; "
                         "set mixed_precision: none")
    return torch.autocast(device.type, dtype=torch.bfloat16)

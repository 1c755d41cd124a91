"""Training loops. `fit` is the one loop both phases use: AdamW, linear warmup + cosine decay,
gradient clipping, a validation pass per epoch, best-checkpoint keeping, NaN/inf guard."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import AlignTrainConfig, TrainingConfig
from ..utils import eval_mode, progress as progress_bar
from . import distributed
from .losses import alignment_loss
from .state import load_state, restore, save_state

log = logging.getLogger(__name__)

# loss_fn(net, batch) -> {"loss": scalar, other named terms}; `net` is the module to call forward on
# (the DDP wrapper in a multi-process run), batch is this rank's shard.
LossFn = Callable[[nn.Module, dict[str, Any]], dict[str, torch.Tensor]]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable[dict[str, Any]],
    *,
    lr: float,
    num_epochs: int,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    grad_clip: float = 1.0,
    evaluate: Callable[[], dict[str, float]] | None = None,
    monitor: str | None = None,
    mode: str = "max",
    save_best: Callable[[int], None] | None = None,
    checkpoint: str = "the best checkpoint",
    on_log: Callable[[dict[str, float], int], None] | None = None,
    after_step: Callable[[], None] | None = None,
    state_dir: Path | None = None,
    state_every: int = 50,
    fingerprint: str = "",
    desc: str = "train",
    progress: bool = True,
    mixed_precision: str = "none",
) -> dict[str, Any]:
    """Train the parameters of `model` that require grad.

    loss_fn(net, batch) -> {"loss": scalar, other named terms}. evaluate() -> val metrics after each epoch;
    the epoch with the best `monitor` value (max or min per `mode`) calls save_best(epoch), and the
    model ends with the best weights. on_log(metrics, step) gets per-step terms and val metrics.
    With `state_dir`, the full training state is written there every `state_every` steps and at each
    epoch end; a run started again with the same `fingerprint` resumes from it and ends with the
    same weights as an uninterrupted run (batches are a function of (seed, epoch); RNG is restored).
    A finished run deletes its state. Returns {"steps": [...], "epochs": [...], "best": {...}}.

    Under `accelerate launch` with N processes (torch.distributed initialised) every rank draws the
    same global batch, trains on its shard through DDP, and only rank 0 evaluates, saves, snapshots
    and shows progress; the others get rank 0's validation results. mixed_precision: none | bf16.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("model has no trainable parameters")
    params = list(named.values())
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    net, main = distributed.wrap(model), distributed.is_main_process()
    autocast = distributed.autocast(device, mixed_precision)
    per_epoch = len(loader)  # type: ignore[arg-type]
    scheduler = warmup_cosine(optimizer, int(warmup_ratio * num_epochs * per_epoch), num_epochs * per_epoch)
    history: dict[str, Any] = {"steps": [], "epochs": [], "best": {}}
    best, best_state, step, saved_here = (-math.inf if mode == "max" else math.inf), None, 0, False
    loaded = load_state(state_dir, fingerprint) if state_dir is not None else None
    if loaded is not None:
        tensors, meta = loaded
        best_state = restore(tensors, meta, named, optimizer, scheduler)
        history, step, best = meta["history"], meta["step"], meta["best_score"]
        log.info("%s: resuming from %s at step %d (epoch %d)", desc, state_dir, step, len(history["epochs"]) + 1)

    def snapshot() -> None:
        if state_dir is not None and main:
            save_state(state_dir, model_state={n: p.detach() for n, p in named.items()}, best_state=best_state,
                       optimizer=optimizer, scheduler=scheduler,
                       meta={"fingerprint": fingerprint, "step": step, "history": history, "best_score": best})

    for epoch in range(len(history["epochs"]), num_epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        model.train()
        done = step - epoch * per_epoch  # batches of this epoch finished before a resume
        bar = progress_bar(loader, desc=f"{desc} epoch {epoch + 1}/{num_epochs}", disable=not (progress and main),
                           leave=False)
        for i, batch in enumerate(bar):
            if i < done:
                continue
            local = distributed.shard(batch)
            if local is None:  # fewer rows than ranks (a last partial batch): every rank skips it, but
                # counts the step, so the schedule and the resume position stay those of one process
                log.warning("%s: skipped a batch of %d rows (fewer than the %d processes)", desc,
                            len(next(iter(batch.values()))), distributed.world_size())
                step += 1
                scheduler.step()
                continue
            with autocast:
                terms = loss_fn(net, _to(local, device))
            loss = terms["loss"]
            shown = distributed.mean_over_ranks({k: v.detach() for k, v in terms.items()})  # what every rank logs
            if not torch.isfinite(shown["loss"]):  # all ranks stop together
                last = history["best"].get("epoch")
                raise FloatingPointError(
                    f"{desc}: loss is {shown['loss'].item()} at step {step + 1} (epoch {epoch + 1}); training stopped. "
                    f"Last good checkpoint: {f'{checkpoint} (epoch {last})' if last else 'none written yet'}. "
                    "Lower the learning rate or check the input features.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            step += 1
            row = {f"train/{k}": float(v) for k, v in shown.items()}
            row.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)})
            history["steps"].append({"step": step, "epoch": epoch + 1, **row})
            if on_log is not None:
                on_log(row, step)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
            if step % state_every == 0:
                snapshot()
        val = distributed.broadcast((evaluate() if evaluate is not None and main else {}))
        history["epochs"].append({"epoch": epoch + 1, "step": step, **val})
        if on_log is not None and val:
            on_log(val, step)
        score = val.get(monitor) if monitor else None
        if score is None or (score > best if mode == "max" else score < best):
            best = score if score is not None else best
            history["best"] = {"epoch": epoch + 1, "step": step, **val}
            best_state = {n: p.detach().clone() for n, p in named.items()}
            if save_best is not None and main:
                save_best(epoch + 1)
                saved_here = True
        snapshot()
        watched = f", val {monitor.removeprefix('val/')} {val[monitor]:.4f} (best: epoch {history['best']['epoch']})" \
            if monitor in val else ""
        log.info("%s epoch %d/%d: train loss %.4f%s", desc, epoch + 1, num_epochs, history["steps"][-1]["train/loss"],
                 watched)
    if best_state is not None:  # end on the best weights; a resumed run may not have written them yet
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best_state[n])
        if save_best is not None and main and not saved_here:
            save_best(history["best"]["epoch"])
    if state_dir is not None and main:
        shutil.rmtree(state_dir, ignore_errors=True)
    distributed.barrier()  # the other ranks wait until rank 0 has written its outputs
    return history


def schedule(cfg: TrainingConfig) -> dict[str, Any]:
    """fit()'s optimisation kwargs from a phase's training config."""
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "num_epochs": cfg.num_epochs,
            "warmup_ratio": cfg.warmup_ratio, "grad_clip": cfg.grad_clip, "mixed_precision": cfg.mixed_precision}


def alignment_loss_fn(model: nn.Module, cfg: AlignTrainConfig) -> LossFn:
    """Loss on a batch of cached features (one modality: "vision_features"/"text_features"; several, PairBatches:
    "<modality>.features"/"<modality>.text"), or of raw images + texts (the seed's design).

    Every (modality, text) pair gets the CLIP + Matryoshka loss; the step's terms are their means weighted by
    `cfg.pair_weights` (one pair: its own terms exactly), plus `<modality>_loss` per pair when there are several.
    """
    dims = model.cfg.mrl_dims

    def loss_fn(net: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "vision_features" in batch:
            out = net(pairs={"image": (batch["vision_features"], batch["text_features"])})
        elif "images" not in batch:
            out = net(pairs={k[:-len(".features")]: (v, batch[k[:-len(".features")] + ".text"])
                             for k, v in batch.items() if k.endswith(".features")})
        elif distributed.world_size() == 1:  # the seed's design: encoders on every batch (benchmarks compare it)
            out = {"image": (model.encode_images(batch["images"]), model.encode_texts(batch["texts"]))}
        else:
            raise ValueError("multi-process training runs from the feature cache (batches of vision/text features)")
        weights = {m: cfg.pair_weight(m) for m in out}
        total = sum(weights.values())
        terms: dict[str, torch.Tensor] = {}
        for m, (z_m, z_t) in out.items():
            # Negatives from every rank (open_clip's gather_features); the loss itself in float32.
            z_m, z_t = distributed.gather_with_grad(z_m.float()), distributed.gather_with_grad(z_t.float())
            pair = alignment_loss(z_m, z_t, model.logit_scale.float(), dims, cfg.mrl_weights,
                                  cfg.clip_weight, cfg.mrl_weight)
            for k, v in pair.items():
                terms[k] = terms.get(k, 0) + weights[m] * v / total
            if len(out) > 1:
                terms[f"{m}_loss"] = pair["loss"]
        return terms
    return loss_fn


def train_alignment(model: nn.Module, train_loader: Iterable[dict[str, Any]], num_epochs: int | None = None,
                    cfg: AlignTrainConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """Phase 1: train the adapters (and temperature) of a VisionTextAligner. Seed Quick Start API.

    Training settings: `cfg`, else the model's own config when it is the seed's AlignmentConfig, else
    AlignTrainConfig's defaults. `kwargs` go to `fit` (evaluate, monitor, save_best, on_log...).
    """
    if cfg is None:
        cfg = model.cfg if isinstance(model.cfg, AlignTrainConfig) else AlignTrainConfig()
    options = {**schedule(cfg), "num_epochs": num_epochs or cfg.num_epochs}
    return fit(model, alignment_loss_fn(model, cfg), train_loader, **options, after_step=model.clamp_logit_scale_,
               desc="align", **kwargs)


def _caption_loss(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """A batch of cached features ("vision_features") or of aligned embeddings ("z") of one modality."""
    modality = batch.get("modality", "image")
    if "z" in batch:
        return net(None, batch["captions"], lean=True, modality=modality, z=batch["z"])[1]
    return net(batch["vision_features"], batch["captions"], lean=True, modality=modality)[1]


def caption_loss_fn(model: nn.Module) -> LossFn:
    def loss_fn(net: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": _caption_loss(net, batch).float()}  # through `net`: DDP syncs grads
    return loss_fn


@torch.no_grad()
def mean_caption_loss(model: nn.Module, loader: Iterable[dict[str, Any]]) -> float:
    """Token-weighted mean next-token loss over a loader (validation)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in loader:
            loss = _caption_loss(model, batch)
            n = sum(min(len(c), model.cfg.max_caption_tokens - 1) + 1 for c in batch["captions"])
            total, count = total + float(loss) * n, count + n
    return total / max(1, count)


def train_projector(model: nn.Module, train_loader: Iterable[dict[str, Any]], cfg: TrainingConfig,
                    **kwargs: Any) -> dict[str, Any]:
    """Phase 2: train the projector (and LoRA) of a MultimodalLLM. `cfg`: a ProjectTrainConfig (ProjectConfig)."""
    return fit(model, caption_loss_fn(model), train_loader, **schedule(cfg), desc="project", **kwargs)

"""evaluate: test-split retrieval (full dim + every Matryoshka dim, with chance) and captioning
(trained vs blind), figures to MLflow. DVC gets the headline numbers in `eval/metrics.json` and the
full set in `eval/metrics_all.json`; MLflow gets both under the same dotted keys."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import plots
from ..config import EvaluateConfig
from ..data.features import load_features
from ..metrics import caption_metrics_sets, chance_retrieval, distinct_share, retrieval_metrics
from ..models.aligner import VisionTextAligner
from ..models.llm import MultimodalLLM
from ..training.losses import matryoshka_prefix
from ..utils import atomic_path, get_device, progress, write_json
from .common import write_csv

log = logging.getLogger(__name__)


def retrieval(model: VisionTextAligner, features_dir: Path) -> tuple[dict[str, Any], Any]:
    test = load_features(features_dir, "test")
    z_v, z_t = model.embed_features(test.vision, test.text)  # (N, d), (M, d)
    full = retrieval_metrics(z_v, z_t, test.text_to_image)
    chance = chance_retrieval(test.text_to_image, test.num_images)
    by_dim = {str(d): retrieval_metrics(matryoshka_prefix(z_v, d), matryoshka_prefix(z_t, d), test.text_to_image)
              for d in model.cfg.mrl_dims}
    out = {"i2t": full["i2t"], "t2i": full["t2i"], "chance": chance, "by_dim": by_dim,
           "n_images": test.num_images, "n_captions": int(test.text.shape[0])}
    return out, (z_v, z_t, test)


def retrieval_figure(z_v: torch.Tensor, z_t: torch.Tensor, test: Any, split: Any, n_queries: int = 4, k: int = 5):
    """Top-k test images for the first caption of the first few test images; the right one framed."""
    first = [int((test.text_to_image == i).nonzero()[0]) for i in range(min(n_queries, test.num_images))]
    top = (z_t[first] @ z_v.T).topk(min(k, test.num_images), dim=-1).indices  # (Q, k)
    captions = [c for caps in split.select(range(len(first)))["captions"] for c in caps[:1]]
    images = [[split[int(j)]["image"] for j in row] for row in top]
    return plots.retrieval_examples(captions, images, [[int(j) == i for j in row] for i, row in enumerate(top)])


def by_dim_rows(ret: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"dim": int(d), "i2t_R1": m["i2t"]["R1"], "t2i_R1": m["t2i"]["R1"],
                          "chance_i2t_R1": ret["chance"]["i2t"]["R1"], "chance_t2i_R1": ret["chance"]["t2i"]["R1"]}
                         for d, m in ret["by_dim"].items()])


@torch.no_grad()
def generate_all(mm: MultimodalLLM, prefix: torch.Tensor, cfg: EvaluateConfig, desc: str) -> list[str]:
    out: list[str] = []
    for i in progress(range(0, prefix.shape[0], cfg.batch_size), desc=f"captions ({desc})", unit="batch"):
        out += mm.generate_from_prefix(prefix[i:i + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                                       num_beams=cfg.num_beams)
    return out


@torch.no_grad()
def captioning(cfg: EvaluateConfig, mm: MultimodalLLM, features_dir: Path, test_split: Any, out_dir: Path,
               tracker: Any) -> dict[str, Any]:
    """Trained captions vs a blind captioner (same LLM and prompt, a prefix carrying no image)."""
    mm.eval()
    test = load_features(features_dir, "test")

    def prefix_at(dim: int | None) -> torch.Tensor:  # (N, k, H) from z's first `dim` coordinates
        return torch.cat([mm.prefix_from_features(test.vision[i:i + 256], dim) for i in range(0, test.num_images, 256)])

    prefix = prefix_at(None)
    if cfg.blind_prefix == "mean":  # the projector applied to the mean training image embedding
        train_v = load_features(features_dir, "train", stream=True).vision  # summed in chunks, never all loaded
        total = sum(train_v[i:i + 4096].double().sum(0) for i in range(0, len(train_v), 4096))
        blind = mm.prefix_from_features((total / len(train_v)).float()[None])
    else:
        blind = torch.zeros_like(prefix[:1])
    generated = generate_all(mm, prefix, cfg, "trained")
    blind_caps = generate_all(mm, blind.expand(prefix.shape[0], -1, -1).contiguous(), cfg, "blind")
    # one projector, captions from each Matryoshka prefix of z; the full dim's are `trained`
    dims, full = mm.aligner.cfg.mrl_dims, mm.aligner.cfg.d_align
    smaller = {d: generate_all(mm, prefix_at(d), cfg, f"dim {d}") for d in dims if d < full}
    ids, refs = test_split["id"], test_split["captions"]
    sets = {"trained": generated, "blind": blind_caps, **{f"dim {d}": caps for d, caps in smaller.items()}}
    log.info("scoring %d caption sets against the references (pycocoevalcap)", len(sets))
    scores = caption_metrics_sets({name: dict(zip(ids, caps)) for name, caps in sets.items()}, dict(zip(ids, refs)))
    result = {name: {**scores[name], "distinct": distinct_share(caps)} for name, caps in sets.items()}
    result["by_dim"] = {str(d): result.pop(f"dim {d}") if d < full else result["trained"] for d in dims}
    rows = pd.DataFrame([{"dim": int(d), "CIDEr": m["CIDEr"], "blind_CIDEr": result["blind"]["CIDEr"]}
                         for d, m in result["by_dim"].items()])
    write_csv(rows, out_dir / "plots" / "cider_by_dim.csv")
    tracker.log_figure(plots.cider_by_dim(rows, mm.cfg.matryoshka), "figures/cider_by_dim.png")
    write_csv(pd.DataFrame({"id": ids, "generated": generated, "blind": blind_caps,
                            "references": [" | ".join(r) for r in refs]}), out_dir / "captions.csv")
    tracker.log_artifact(out_dir / "captions.csv")
    n = min(cfg.gallery_size, len(ids))
    if n:
        gallery = plots.caption_gallery(test_split.select(range(n))["image"], generated[:n], blind_caps[:n], refs[:n])
        with atomic_path(out_dir / "gallery.png") as tmp:
            gallery.savefig(tmp, dpi=110, format="png")
        tracker.log_figure(gallery, "figures/caption_gallery.png")
    return result


def run(cfg: EvaluateConfig, aligner_dir: Path, features_dir: Path, out_dir: Path, tracker: Any,
        projector_dir: Path | None = None, dataset_dir: Path | None = None) -> dict[str, Any]:
    if cfg.captioning and (projector_dir is None or dataset_dir is None):
        raise ValueError("evaluate.captioning is true but no projector checkpoint/dataset was given: "
                         "pass --projector and --dataset, or set evaluate.captioning: false")
    torch.manual_seed(0)
    model = VisionTextAligner.from_pretrained(aligner_dir).to(get_device()).eval()
    ret, embeddings = retrieval(model, features_dir)
    metrics: dict[str, Any] = {"retrieval": ret}
    log.info("test retrieval: i2t R@1 %.3f (chance %.4f), t2i R@1 %.3f (chance %.4f)", ret["i2t"]["R1"],
             ret["chance"]["i2t"]["R1"], ret["t2i"]["R1"], ret["chance"]["t2i"]["R1"])

    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    rows = by_dim_rows(ret)
    write_csv(rows, out_dir / "plots" / "r1_by_dim.csv")
    tracker.log_figure(plots.recall_by_dim(rows), "figures/r1_by_dim.png")

    if dataset_dir is not None:
        import datasets

        test_split = datasets.load_from_disk(str(dataset_dir))["test"]
        tracker.log_figure(retrieval_figure(*embeddings, test_split), "figures/retrieval_examples.png")
    if cfg.captioning and projector_dir is not None:
        mm = MultimodalLLM.from_pretrained(projector_dir, model).to(get_device())
        metrics["captioning"] = captioning(cfg, mm, features_dir, test_split, out_dir, tracker)
        log.info("test captioning: CIDEr %.3f (blind %.3f), distinct %.2f", metrics["captioning"]["trained"]["CIDEr"],
                 metrics["captioning"]["blind"]["CIDEr"], metrics["captioning"]["trained"]["distinct"])

    top, everything = headline(metrics), {"image": metrics}
    write_json(out_dir / "metrics_all.json", everything)
    write_json(out_dir / "metrics.json", top)
    tracker.log_metrics(top)
    tracker.log_metrics(everything)
    tracker.log_artifact(out_dir / "metrics.json")
    tracker.log_artifact(out_dir / "metrics_all.json")
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a person compares (eval/metrics.json, `dvc exp show`): R@1 both ways at the full dim
    beside chance, CIDEr trained beside blind, the distinct-caption share. Flat, short keys (a `dvc exp
    show` column each): the retrieval direction names the modality (i2t / t2i); an audio modality adds
    a2t_R1, ..., audio_CIDEr beside them."""
    ret = metrics["retrieval"]
    out = {f"{d}_R1": ret[d]["R1"] for d in ("i2t", "t2i")}
    out |= {f"chance_{d}_R1": ret["chance"][d]["R1"] for d in ("i2t", "t2i")}
    if "captioning" in metrics:
        cap = metrics["captioning"]
        out |= {"CIDEr": cap["trained"]["CIDEr"], "blind_CIDEr": cap["blind"]["CIDEr"],
                "distinct": cap["trained"]["distinct"]}
    return out

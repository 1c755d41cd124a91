"""evaluate: per enabled modality, test-split retrieval against text (full dim + every Matryoshka dim, R@k,
mean/median rank, mAP@10, each with its exact chance value) and captioning (trained vs blind), figures to
MLflow. DVC gets the headline numbers in `eval/metrics.json` and the full set, by modality, in
`eval/metrics_all.json`; MLflow gets both under the same dotted keys."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import plots
from ..config import EvaluateConfig
from ..data.features import Features, load_features
from ..metrics import (caption_metrics_groups, chance_retrieval, chance_retrieval_map, distinct_share,
                       retrieval_map_at_k, retrieval_metrics)
from ..modalities import Modality, modality as spec
from ..models.aligner import VisionTextAligner
from ..models.llm import MultimodalLLM
from ..training.losses import matryoshka_prefix
from ..utils import atomic_path, get_device, progress, write_json
from .common import IMAGE_ONLY, write_csv

log = logging.getLogger(__name__)
CHUNK = 256  # rows per adapter / projector call


def directions(m: Modality, both: dict[str, Any]) -> dict[str, Any]:
    """retrieval_metrics' {"i2t", "t2i"} named for the modality: {"a2t", "t2a"} for audio."""
    return {f"{m.letter}2t": both["i2t"], f"t2{m.letter}": both["t2i"]}


def scores(z: torch.Tensor, z_t: torch.Tensor, t2i: torch.Tensor, m: Modality) -> dict[str, Any]:
    """R@1/5/10, mean and median rank, mAP@10, both directions."""
    r, ap = retrieval_metrics(z, z_t, t2i), retrieval_map_at_k(z, z_t, t2i, 10)
    return directions(m, {d: {**r[d], "mAP10": ap[d]} for d in ("i2t", "t2i")})


def retrieval(model: VisionTextAligner, test: Features, m: Modality) -> tuple[dict[str, Any], Any]:
    z, z_t = model.embed_features(test.items, test.text, modality=m.name)  # (N, d), (M, d)
    t2i, n = test.text_to_item, test.num_items
    chance, chance_ap = chance_retrieval(t2i, n), chance_retrieval_map(t2i, n, 10)
    by_dim = {str(d): scores(matryoshka_prefix(z, d), matryoshka_prefix(z_t, d), t2i, m) for d in model.cfg.mrl_dims}
    out = {**scores(z, z_t, t2i, m), "chance": directions(m, {d: {**chance[d], "mAP10": chance_ap[d]}
                                                              for d in ("i2t", "t2i")}),
           "by_dim": by_dim, "n_items": n, "n_captions": int(test.text.shape[0])}
    return out, (z, z_t)


def _spectrogram(clip: Any) -> Any:
    from ..data.audio import decode_audio

    decoded = decode_audio(clip, 16000)
    return plots.spectrogram(decoded.samples, decoded.sampling_rate)


# What a figure shows of a stored item of a modality (a dataset column value); the default: the value itself
# (a PIL image). Kept here, not in modalities.py, so the prepare stages do not depend on the plotting code.
THUMBNAILS = {"audio": _spectrogram}


def thumbnails(m: Modality, values: list[Any]) -> list[Any]:
    """What a figure shows of each item: the image, or the clip's spectrogram."""
    show = THUMBNAILS.get(m.name, lambda v: v)
    return [show(v) for v in values]


def retrieval_figure(z: torch.Tensor, z_t: torch.Tensor, test: Features, split: Any, m: Modality, n_queries: int = 4,
                     k: int = 5):
    """Top-k test items for the first caption of the first few test items; the right one framed."""
    first = [int((test.text_to_item == i).nonzero()[0]) for i in range(min(n_queries, test.num_items))]
    top = (z_t[first] @ z.T).topk(min(k, test.num_items), dim=-1).indices  # (Q, k)
    captions = [c for caps in split.select(range(len(first)))["captions"] for c in caps[:1]]
    items = [thumbnails(m, [split[int(j)][m.column] for j in row]) for row in top]
    return plots.retrieval_examples(captions, items, [[int(j) == i for j in row] for i, row in enumerate(top)])


def by_dim_rows(ret: dict[str, Any], m: Modality) -> pd.DataFrame:
    dirs = (f"{m.letter}2t", f"t2{m.letter}")
    return pd.DataFrame([{"dim": int(d), **{f"{x}_R1": r[x]["R1"] for x in dirs},
                          **{f"chance_{x}_R1": ret["chance"][x]["R1"] for x in dirs}}
                         for d, r in ret["by_dim"].items()])


@torch.no_grad()
def generate_all(mm: MultimodalLLM, prefix: torch.Tensor, cfg: EvaluateConfig, desc: str, prompt: str) -> list[str]:
    out: list[str] = []
    for i in progress(range(0, prefix.shape[0], cfg.batch_size), desc=f"captions ({desc})", unit="batch"):
        out += mm.generate_from_prefix(prefix[i:i + cfg.batch_size], prompt, max_new_tokens=cfg.max_new_tokens,
                                       num_beams=cfg.num_beams)
    return out


@torch.no_grad()
def captions(cfg: EvaluateConfig, mm: MultimodalLLM, cache: Path, m: Modality) -> dict[str, list[str]]:
    """The caption sets of a modality's test split: trained (full dim), blind (same LLM and prompt, a prefix
    carrying no input), and from each smaller Matryoshka prefix of z ("dim 32", ...)."""
    mm.eval()
    test, prompt = load_features(cache, "test"), mm.cfg.prompt_for(m.name)
    z = mm.aligner.embed_features(test.items, modality=m.name, batch_size=CHUNK)  # (N, d)

    def prefix_at(dim: int | None) -> torch.Tensor:  # (N, k, H) from z's first `dim` coordinates
        return torch.cat([mm.prefix_from_z(z[i:i + CHUNK], dim) for i in range(0, test.num_items, CHUNK)])

    prefix = prefix_at(None)
    if cfg.blind_prefix == "mean":  # the projector applied to the mean training feature
        train = load_features(cache, "train", stream=True).items  # summed in chunks, never all loaded
        total = sum(train[i:i + 4096].double().sum(0) for i in range(0, len(train), 4096))
        blind = mm.prefix_from_features((total / len(train)).float()[None], modality=m.name)
    else:
        blind = torch.zeros_like(prefix[:1])
    generated = generate_all(mm, prefix, cfg, f"{m.name}, trained", prompt)
    blind_caps = generate_all(mm, blind.expand(prefix.shape[0], -1, -1).contiguous(), cfg, f"{m.name}, blind", prompt)
    # one projector, captions from each Matryoshka prefix of z; the full dim's are `trained`
    dims, full = mm.aligner.cfg.mrl_dims, mm.aligner.cfg.d_align
    smaller = {d: generate_all(mm, prefix_at(d), cfg, f"{m.name}, dim {d}", prompt) for d in dims if d < full}
    return {"trained": generated, "blind": blind_caps, **{f"dim {d}": caps for d, caps in smaller.items()}}


def score_captions(pending: dict[str, tuple[dict[str, list[str]], Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{modality: (caption sets, test split)} -> {modality: {set: pycocoevalcap scores}}, every set of every
    modality in one caption_metrics_sets call: one PTB tokenizer run, one METEOR JVM."""
    groups = {m: ({name: dict(zip(split["id"], caps)) for name, caps in found.items()},
                  dict(zip(split["id"], split["captions"]))) for m, (found, split) in pending.items()}
    log.info("scoring %d caption sets against the references (pycocoevalcap)", sum(len(g[0]) for g in groups.values()))
    return caption_metrics_groups(groups) if groups else {}


def captioning(mm: MultimodalLLM, sets: dict[str, list[str]], found: dict[str, dict[str, float]], cfg: EvaluateConfig,
               test_split: Any, out_dir: Path, tracker: Any, m: Modality) -> dict[str, Any]:
    """A modality's caption scores with the distinct share, its CIDEr-by-dim CSV and figure, caption table, gallery."""
    dims, full = mm.aligner.cfg.mrl_dims, mm.aligner.cfg.d_align
    generated, blind_caps = sets["trained"], sets["blind"]
    ids, refs = test_split["id"], test_split["captions"]
    result = {name: {**found[name], "distinct": distinct_share(caps)} for name, caps in sets.items()}
    result["by_dim"] = {str(d): result.pop(f"dim {d}") if d < full else result["trained"] for d in dims}
    rows = pd.DataFrame([{"dim": int(d), "CIDEr": r["CIDEr"], "blind_CIDEr": result["blind"]["CIDEr"]}
                         for d, r in result["by_dim"].items()])
    write_csv(rows, out_dir / "plots" / f"{m.prefix}cider_by_dim.csv")
    tracker.log_figure(plots.cider_by_dim(rows, mm.cfg.matryoshka, m.noun), f"figures/{m.prefix}cider_by_dim.png")
    examples = out_dir / "examples"
    write_csv(pd.DataFrame({"id": ids, "generated": generated, "blind": blind_caps,
                            "references": [" | ".join(r) for r in refs]}), examples / f"{m.prefix}captions.csv")
    tracker.log_artifact(examples / f"{m.prefix}captions.csv")
    n = min(cfg.gallery_size, len(ids))
    if n:
        gallery = plots.caption_gallery(thumbnails(m, test_split.select(range(n))[m.column]), generated[:n],
                                        blind_caps[:n], refs[:n], noun=m.noun)
        with atomic_path(examples / f"{m.prefix}gallery.png") as tmp:
            gallery.savefig(tmp, dpi=110, format="png")
        tracker.log_figure(gallery, f"figures/{m.prefix}caption_gallery.png")
    return result


def zero_shot(cfg: EvaluateConfig, model: VisionTextAligner, projector_dir: Path, caches: dict[str, Path],
              sets: dict[str, dict[str, list[str]]]) -> None:
    """With project.zero_shot_check, the projector trained on images alone captions every other modality's test
    items from their aligned z (set "zero_shot", beside the jointly trained "trained")."""
    if not (projector_dir / IMAGE_ONLY).exists():
        return
    solo = MultimodalLLM.from_pretrained(projector_dir / IMAGE_ONLY, model).to(get_device()).eval()
    for m in caches.keys() - {"image"}:
        z = model.embed_features(load_features(caches[m], "test").items, modality=m, batch_size=CHUNK)
        prefix = torch.cat([solo.prefix_from_z(z[i:i + CHUNK]) for i in range(0, len(z), CHUNK)])
        sets[m]["zero_shot"] = generate_all(solo, prefix, cfg, f"{m}, image-only projector",
                                            solo.cfg.prompt_for("image"))


def evaluate_retrieval(model: VisionTextAligner, m: Modality, cache: Path, test_split: Any | None, out_dir: Path,
                       tracker: Any) -> dict[str, Any]:
    test = load_features(cache, "test")
    ret, (z, z_t) = retrieval(model, test, m)
    x = m.letter
    log.info("test %s retrieval: %s2t R@1 %.3f (chance %.4f), t2%s R@1 %.3f (chance %.4f)", m.name, x,
             ret[f"{x}2t"]["R1"], ret["chance"][f"{x}2t"]["R1"], x, ret[f"t2{x}"]["R1"], ret["chance"][f"t2{x}"]["R1"])
    rows = by_dim_rows(ret, m)
    write_csv(rows, out_dir / "plots" / f"{m.prefix}r1_by_dim.csv")
    tracker.log_figure(plots.recall_by_dim(rows, x, m.noun), f"figures/{m.prefix}r1_by_dim.png")
    if test_split is not None:
        tracker.log_figure(retrieval_figure(z, z_t, test, test_split, m), f"figures/{m.prefix}retrieval_examples.png")
    return ret


def run(cfg: EvaluateConfig, aligner_dir: Path, caches: dict[str, Path], out_dir: Path, tracker: Any,
        projector_dir: Path | None = None, dataset_dirs: dict[str, Path] | None = None) -> dict[str, Any]:
    """caches / dataset_dirs: feature cache and dataset directory of each enabled modality."""
    import datasets

    if cfg.captioning and (projector_dir is None or not dataset_dirs):
        raise ValueError("evaluate.captioning is true but no projector checkpoint/dataset was given: "
                         "pass --projector and --dataset, or set evaluate.captioning: false")
    torch.manual_seed(0)
    model = VisionTextAligner.from_pretrained(aligner_dir).to(get_device()).eval()
    for sub in ("plots", "examples"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    splits = {m: datasets.load_from_disk(str(d))["test"] for m, d in (dataset_dirs or {}).items()}
    metrics = {m: {"retrieval": evaluate_retrieval(model, spec(m), c, splits.get(m), out_dir, tracker)}
               for m, c in caches.items()}
    if cfg.captioning and projector_dir is not None:
        mm = MultimodalLLM.from_pretrained(projector_dir, model).to(get_device())
        sets = {m: captions(cfg, mm, c, spec(m)) for m, c in caches.items()}
        zero_shot(cfg, model, projector_dir, caches, sets)
        scored = score_captions({m: (sets[m], splits[m]) for m in caches})
        for m in caches:
            metrics[m]["captioning"] = cap = captioning(mm, sets[m], scored[m], cfg, splits[m], out_dir, tracker,
                                                        spec(m))
            log.info("test %s captioning: CIDEr %.3f (blind %.3f), distinct %.2f", m, cap["trained"]["CIDEr"],
                     cap["blind"]["CIDEr"], cap["trained"]["distinct"])
    top = headline(metrics)
    write_json(out_dir / "metrics_all.json", metrics)
    write_json(out_dir / "metrics.json", top)
    tracker.log_metrics(top)
    tracker.log_metrics(metrics)
    tracker.log_artifact(out_dir / "metrics.json")
    tracker.log_artifact(out_dir / "metrics_all.json")
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a person compares (eval/metrics.json, `dvc exp show`), per modality: R@1 both ways at the
    full dim beside chance, CIDEr trained beside blind, the distinct-caption share, and the metric the
    modality's field reports when it is not R@1 (audio: DCASE's text-to-audio mAP@10). Flat, short keys
    (a `dvc exp show` column each): the retrieval direction names the modality (i2t, a2t); the image's
    captioning keys have no prefix (CIDEr), audio's do (audio_CIDEr). Two modalities: 15 keys (16 with
    project.zero_shot_check: audio_zeroshot_CIDEr)."""
    out: dict[str, Any] = {}
    for name, res in metrics.items():
        m = spec(name)
        ret, dirs = res["retrieval"], (f"{m.letter}2t", f"t2{m.letter}")
        out |= {f"{d}_R1": ret[d]["R1"] for d in dirs}
        out |= {f"chance_{d}_R1": ret["chance"][d]["R1"] for d in dirs}
        if m.task_metric:
            out[f"t2{m.letter}_{m.task_metric}"] = ret[f"t2{m.letter}"][m.task_metric]
        if "captioning" in res:
            cap = res["captioning"]
            out |= {f"{m.prefix}CIDEr": cap["trained"]["CIDEr"], f"{m.prefix}blind_CIDEr": cap["blind"]["CIDEr"],
                    f"{m.prefix}distinct": cap["trained"]["distinct"]}
            if "zero_shot" in cap:  # project.zero_shot_check: the image-only projector fed this modality
                out[f"{m.prefix}zeroshot_CIDEr"] = cap["zero_shot"]["CIDEr"]
    return out

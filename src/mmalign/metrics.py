"""Retrieval metrics (clip_benchmark protocol), their chance levels, and COCO caption metrics."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
from collections import Counter

import numpy as np
import torch

log = logging.getLogger(__name__)

EMPTY_CAPTION = "<empty>"  # survives the PTB tokenizer and matches no real reference word


def _captions_per_image(text_to_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """(M,) caption->image index -> (N,) caption counts; every image needs >= 1 caption."""
    if text_to_image.ndim != 1 or text_to_image.numel() == 0:
        raise ValueError(f"text_to_image must be a non-empty 1-D tensor, got shape {tuple(text_to_image.shape)}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n_images:
        raise ValueError(f"text_to_image values must lie in [0, {n_images}), got [{lo}, {hi}]")
    counts = torch.bincount(text_to_image.long().cpu(), minlength=n_images)
    if (counts == 0).any():
        raise ValueError(f"image {int(torch.nonzero(counts == 0)[0])} has no caption in text_to_image")
    return counts


@torch.inference_mode()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based retrieval ranks, as clip_benchmark counts them; similarity is the dot product.

    image_emb (N, D), text_emb (M, D), both L2-normalised; text_to_image (M,) long.
    Returns i2t (N,): per image, the best rank of any of its captions among all M texts;
    t2i (M,): per caption, the rank of its image among the N images.
    Ties count in the query's favour: rank = 1 + number of candidates scoring strictly higher.
    Queries go in chunks, so at most chunk * max(N, M) scores are held at once (default: about 4M,
    so memory stays flat as the eval set grows).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    chunk = chunk or max(16, (1 << 22) // max(n, m))
    _captions_per_image(text_to_image, n)
    text_emb = text_emb.to(image_emb)
    owner = text_to_image.to(image_emb.device).long()  # (M,)
    t2i = torch.empty(m, dtype=torch.long, device=image_emb.device)
    for s in range(0, m, chunk):
        scores = text_emb[s:s + chunk] @ image_emb.T  # (c, N)
        # the positive comes from the same matmul, so it ties with itself exactly
        pos = scores.gather(1, owner[s:s + chunk, None])  # (c, 1)
        t2i[s:s + chunk] = 1 + (scores > pos).sum(1)
    i2t = torch.empty(n, dtype=torch.long, device=image_emb.device)
    for s in range(0, n, chunk):
        scores = image_emb[s:s + chunk] @ text_emb.T  # (c, M)
        own = owner[None, :] == torch.arange(s, s + scores.shape[0], device=owner.device)[:, None]  # (c, M)
        best = scores.masked_fill(~own, -math.inf).amax(1, keepdim=True)  # (c, 1)
        i2t[s:s + chunk] = 1 + (scores > best).sum(1)
    return i2t, t2i


def recall_summary(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """ranks (Q,) 1-based -> {"R@k": fraction of ranks <= k, "mean_rank", "median_rank" (numpy median)}."""
    if ranks.numel() == 0:
        raise ValueError("recall_summary needs at least one rank")
    r = ranks.detach().cpu().double()
    out = {f"R@{k}": float((r <= k).double().mean()) for k in ks}
    out["mean_rank"] = float(r.mean())
    out["median_rank"] = float(np.median(r.numpy()))
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """{"i2t": recall_summary, "t2i": recall_summary}; shapes as in retrieval_ranks."""
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image)
    return {"i2t": recall_summary(i2t, ks), "t2i": recall_summary(t2i, ks)}


def _best_of_c(m: int, c: int, ks) -> tuple[dict[str, float], float, float]:
    """Rank of the best of c positives among m candidates in uniform random order.

    P(rank > r) = C(m-r, c) / C(m, c), all in exact integers. Returns ({"R@k"}, mean, median);
    the median is the smallest r with P(rank <= r) >= 1/2, or r + 0.5 when that probability is
    exactly 1/2 (the midpoint convention numpy uses for an even count, e.g. uniform 1..N -> (N+1)/2).
    """
    total = math.comb(m, c)
    recall = {f"R@{k}": 1 - math.comb(m - c, min(k, m)) / math.comb(m, min(k, m)) for k in ks}
    lo, hi = 1, m - c + 1  # rank m-c+1 is reached with probability 1
    while lo < hi:
        mid = (lo + hi) // 2
        if 2 * math.comb(m - mid, c) <= total:
            hi = mid
        else:
            lo = mid + 1
    median = lo + 0.5 if 2 * math.comb(m - lo, c) == total else float(lo)
    return recall, (m + 1) / (c + 1), median


def chance_retrieval(text_to_image: torch.Tensor, n_images: int, ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """Exact expected retrieval_metrics under a uniformly random ranking (no simulation).

    t2i: the rank of one image among N is uniform on 1..N. i2t: an image with c of the M texts
    has best rank distributed as in _best_of_c; R@k and mean_rank average that over images,
    median_rank is the numpy median over images of each image's distribution median.
    """
    counts = _captions_per_image(text_to_image, n_images)
    m = int(text_to_image.numel())
    weights = Counter(counts.tolist())  # {captions per image: number of images}
    per_c = {c: _best_of_c(m, c, ks) for c in weights}
    i2t = {f"R@{k}": sum(w * per_c[c][0][f"R@{k}"] for c, w in weights.items()) / n_images for k in ks}
    i2t["mean_rank"] = sum(w * per_c[c][1] for c, w in weights.items()) / n_images
    i2t["median_rank"] = float(np.median([per_c[c][2] for c in counts.tolist()]))
    t2i = {f"R@{k}": min(k, n_images) / n_images for k in ks}
    t2i["mean_rank"] = t2i["median_rank"] = (n_images + 1) / 2
    return {"i2t": i2t, "t2i": t2i}


def _clean(text: str) -> str:
    """One line, no pipes: METEOR's java process reads one '|||'-separated line per segment and
    hangs or misparses otherwise. str.split() also catches \\r, \\x85, \\u2028 (java line breaks)."""
    return " ".join(text.replace("|", " ").split())


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr as coco-caption computes them (PTB tokenizer first).

    predictions {id: caption}, references {id: [captions]}; both need the same ids. An empty
    prediction (or one that is all punctuation) is scored as the token "<empty>", i.e. ~0.
    Needs Java (PTB tokenizer, METEOR); starting the METEOR JVM alone takes ~6 s.
    """
    if predictions.keys() != references.keys():
        bad = sorted(predictions.keys() ^ references.keys(), key=str)
        raise ValueError(f"predictions and references must have the same ids; "
                         f"id {bad[0]!r} is only in one ({len(bad)} differ)")
    for i, refs in references.items():
        if not any(_clean(r) for r in refs):
            raise ValueError(f"references for id {i!r} are empty")
    n_blank = sum(not _clean(r) for refs in references.values() for r in refs)
    if n_blank:
        log.warning("caption_metrics: ignoring %d blank reference captions", n_blank)
    if shutil.which("java") is None:
        raise RuntimeError("caption_metrics needs Java 17 for the METEOR scorer and the PTB tokenizer: "
                           "apt-get install openjdk-17-jre-headless")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one tokenizer JVM for both sides: keys ("p", id) / ("r", id)
    raw = {("p", i): [{"caption": _clean(p) or EMPTY_CAPTION}] for i, p in predictions.items()}
    raw.update({("r", i): [{"caption": c} for c in map(_clean, refs) if c] for i, refs in references.items()})
    stdout = io.StringIO()  # pycocoevalcap prints progress to stdout
    with contextlib.redirect_stdout(stdout):
        tok = PTBTokenizer().tokenize(raw)
        if any(len(tok.get(k, ())) != len(v) for k, v in raw.items()):
            raise RuntimeError("PTB tokenizer returned a different number of lines than it was given")
        res = {i: [tok[("p", i)][0] or EMPTY_CAPTION] for i in predictions}
        gts = {i: [r or EMPTY_CAPTION for r in tok[("r", i)]] for i in predictions}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        meteor, _ = Meteor().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    if stdout.getvalue():
        log.debug("pycocoevalcap: %s", stdout.getvalue().strip())
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out.update({"METEOR": float(meteor), "ROUGE-L": float(rouge), "CIDEr": float(cider)})
    return out


def distinct_share(captions: list[str]) -> float:
    """Distinct captions (stripped, lowercased) / number of captions; 0.0 for an empty list."""
    if not captions:
        return 0.0
    return len({c.strip().lower() for c in captions}) / len(captions)

"""Retrieval metrics (clip_benchmark protocol, ties broken at random in expectation), their chance
levels, and COCO caption metrics (pycocoevalcap)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

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


class TiedRanks(NamedTuple):
    """Where each query's first positive lands, ties included; all (Q,) long.

    above: candidates scoring strictly higher than the query's best positive;
    pos (>= 1) / neg: positives / negatives scoring exactly that best score (the tied block).
    Under uniformly random tie-breaking the rank is above + the position of the first positive
    in the shuffled block of pos + neg candidates.
    """

    above: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor

    @classmethod
    def untied(cls, ranks: torch.Tensor) -> "TiedRanks":
        """Plain 1-based ranks (Q,), no ties."""
        ranks = ranks.long()
        return cls(ranks - 1, torch.ones_like(ranks), torch.zeros_like(ranks))


@torch.inference_mode()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk: int | None = None) -> tuple[TiedRanks, TiedRanks]:
    """Retrieval ranks as clip_benchmark counts them, except that ties are kept (see TiedRanks).

    image_emb (N, D), text_emb (M, D), both L2-normalised; text_to_image (M,) long; similarity is
    the dot product and a tie is exact float equality. Returns i2t (N queries: an image's captions
    among all M texts) and t2i (M queries: a caption's image among the N images). clip_benchmark
    counts ties in the query's favour, so a collapsed model (all embeddings equal) would score
    R@1 = 1; kept as ties, it scores exactly chance (chance_retrieval).
    Queries go in chunks, so at most chunk * max(N, M) scores are held at once (default: about 4M,
    so memory stays flat as the eval set grows).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    chunk = chunk or max(16, (1 << 22) // max(n, m))
    _captions_per_image(text_to_image, n)
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not torch.isfinite(emb).all():  # NaN compares false with everything: it would rank first
            raise ValueError(f"{name} holds NaN or inf: the model diverged or its checkpoint is damaged")
    text_emb = text_emb.to(image_emb)
    owner = text_to_image.to(image_emb.device).long()  # (M,)
    t2i = TiedRanks(*(torch.empty(m, dtype=torch.long, device=image_emb.device) for _ in range(3)))
    t2i.pos.fill_(1)  # one image per caption
    for s in range(0, m, chunk):
        scores = text_emb[s:s + chunk] @ image_emb.T  # (c, N)
        # the positive comes from the same matmul, so it ties with itself exactly
        pos = scores.gather(1, owner[s:s + chunk, None])  # (c, 1)
        t2i.above[s:s + chunk] = (scores > pos).sum(1)
        t2i.neg[s:s + chunk] = (scores == pos).sum(1) - 1
    i2t = TiedRanks(*(torch.empty(n, dtype=torch.long, device=image_emb.device) for _ in range(3)))
    for s in range(0, n, chunk):
        scores = image_emb[s:s + chunk] @ text_emb.T  # (c, M)
        own = owner[None, :] == torch.arange(s, s + scores.shape[0], device=owner.device)[:, None]  # (c, M)
        best = scores.masked_fill(~own, -math.inf).amax(1, keepdim=True)  # (c, 1)
        tied = scores == best  # (c, M)
        i2t.above[s:s + chunk] = (scores > best).sum(1)
        i2t.pos[s:s + chunk] = (tied & own).sum(1)
        i2t.neg[s:s + chunk] = (tied & ~own).sum(1)
    return i2t, t2i


def _recall_at(r: TiedRanks, k: int) -> torch.Tensor:
    """P(rank <= k) per query (Q,) float64, under uniformly random tie-breaking.

    The first positive sits past position j of the tied block with probability
    C(p+q-j, p) / C(p+q, p) = prod_{i<j} (q-i) / (p+q-i), p = pos, q = neg: at most k exact
    float64 factors, whatever the block size. rank <= k  <=>  position <= j = k - above.
    """
    above, p, q = (t.detach().cpu().double() for t in r)
    j = (k - above).clamp(min=0)  # (Q,)
    i = torch.arange(k, dtype=torch.float64)  # (k,)
    factor = (q[:, None] - i).clamp(min=0) / (p[:, None] + q[:, None] - i).clamp(min=1)  # (Q, k)
    miss = torch.where(i < j[:, None], factor, 1.0).prod(1)  # a factor hits 0 once j > q: certain hit
    return 1 - miss


def recall_summary(ranks: TiedRanks | torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall and rank under uniformly random tie-breaking, averaged over queries.

    ranks: TiedRanks, or plain 1-based ranks (Q,) without ties. Returns {"Rk" (R@k): mean P(rank <= k),
    "mean_rank": mean E[rank], "median_rank": median over queries of E[rank]}, E[rank] = above + (p+q+1)/(p+1).
    Without ties these are the usual fraction of ranks <= k, mean rank and median rank.
    """
    r = ranks if isinstance(ranks, TiedRanks) else TiedRanks.untied(ranks)
    if r.above.numel() == 0:
        raise ValueError("recall_summary needs at least one rank")
    out = {f"R{k}": float(_recall_at(r, k).mean()) for k in ks}
    above, p, q = (t.detach().cpu().double() for t in r)
    expected = above + (p + q + 1) / (p + 1)  # (Q,) E[rank] of each query
    out["mean_rank"] = float(expected.mean())
    out["median_rank"] = float(np.median(expected.numpy()))  # MedR as np.median (even Q: the middle two's mean)
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """{"i2t": recall_summary, "t2i": recall_summary}; shapes as in retrieval_ranks."""
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image)
    return {"i2t": recall_summary(i2t, ks), "t2i": recall_summary(t2i, ks)}


def chance_retrieval(text_to_image: torch.Tensor, n_images: int, ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """Exact expected retrieval_metrics under a uniformly random ranking (no simulation).

    A random ranking is a collapsed model: every candidate ties. t2i: one positive among N images;
    i2t: an image's c captions among all M texts. So this is recall_summary of those all-tied
    blocks, and a model whose embeddings are all equal scores exactly these numbers.
    """
    counts = _captions_per_image(text_to_image, n_images)  # (N,)
    m = int(text_to_image.numel())
    i2t = TiedRanks(torch.zeros_like(counts), counts, m - counts)
    ones = torch.ones(m, dtype=torch.long)
    t2i = TiedRanks(torch.zeros_like(ones), ones, (n_images - 1) * ones)
    return {"i2t": recall_summary(i2t, ks), "t2i": recall_summary(t2i, ks)}


# The PTB tokenizer jar (stanford-corenlp 3.4.1, run with -preserveLines) also ends a line at these;
# pycocoevalcap only replaces "\n", so one of these in a caption shifts every later caption onto the
# wrong id, silently. Found by tokenizing every code point up to U+2FFFF.
_PTB_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\x0b\x0c\u2028\u2029", " "))


@contextlib.contextmanager
def _quiet_java() -> Iterator[None]:
    """pycocoevalcap prints progress to stdout and its PTB tokenizer jar writes a line per call to the
    process's stderr (fd 2): both go to the debug log instead of the stage's console."""
    out = io.StringIO()
    with tempfile.TemporaryFile() as err, contextlib.redirect_stdout(out):
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            err.seek(0)
            chatter = (out.getvalue() + err.read().decode(errors="replace")).strip()
            if chatter:
                log.debug("pycocoevalcap: %s", chatter)


def _tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """{id: [caption]} -> {id: [PTB-tokenized caption]}, as pycocoevalcap's PTBTokenizer, one caption a line."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    raw = {i: [{"caption": c.translate(_PTB_LINE_BREAKS)} for c in caps] for i, caps in captions.items()}
    tok = PTBTokenizer().tokenize(raw)
    if any(len(tok.get(i, ())) != len(caps) for i, caps in captions.items()):
        raise RuntimeError("PTB tokenizer returned a different number of lines than it was given")
    # METEOR reads one line per segment, segments split by "|||": PTB makes every "|" its own token
    # and removes newlines, so neither can reach it; checked, as a stray one would hang the java pipe
    bad = next((i for i, caps in tok.items() for c in caps if "|||" in c or "\n" in c), None)
    if bad is not None:
        raise RuntimeError(f"caption {bad!r} still holds '|||' or a newline after PTB tokenization")
    return tok


def _check_ids(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    if predictions.keys() != references.keys():
        bad = sorted(predictions.keys() ^ references.keys(), key=str)
        raise ValueError(f"predictions and references must have the same ids; "
                         f"id {bad[0]!r} is only in one ({len(bad)} differ)")


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr exactly as pycocoevalcap's COCOEvalCap computes them.

    predictions {id: caption}, references {id: [captions]}; both need the same ids and every id a
    non-blank reference. References and predictions are PTB-tokenized (separately, as COCOEvalCap
    does) and scored as they are: "|" is a token, an empty prediction scores as empty (~0). The one
    change: \r, \v, \f, U+2028, U+2029 become spaces, as pycocoevalcap does for "\n" (see
    _PTB_LINE_BREAKS). Needs Java (PTB tokenizer, METEOR); starting the METEOR JVM alone takes ~6 s.
    """
    return caption_metrics_sets({"": predictions}, references)[""]


def caption_metrics_sets(sets: dict[str, dict[str, str]], references: dict[str, list[str]]
                         ) -> dict[str, dict[str, float]]:
    """caption_metrics for several prediction sets against the same references ({name: predictions}
    -> {name: metrics}), each equal to its own caption_metrics call, with one PTB tokenizer run and
    one METEOR JVM for all of them (each JVM start costs seconds)."""
    return caption_metrics_groups({"": (sets, references)})[""]


def caption_metrics_groups(groups: dict[str, tuple[dict[str, dict[str, str]], dict[str, list[str]]]]
                           ) -> dict[str, dict[str, dict[str, float]]]:
    """caption_metrics_sets for groups of sets that each have their own references (the test splits of several
    modalities: {group: (sets, references)} -> {group: {name: metrics}}), with one PTB tokenizer run and one
    METEOR JVM in all. Each group is scored against its own references only (CIDEr's document frequencies
    come from the references scored), so every number equals its own caption_metrics call."""
    for sets, references in groups.values():
        for predictions in sets.values():
            _check_ids(predictions, references)
        for i, refs in references.items():
            if not any(r.strip() for r in refs):
                raise ValueError(f"references for id {i!r} are empty")
        n_blank = sum(not r.strip() for refs in references.values() for r in refs)
        if n_blank:
            log.warning("caption_metrics: %d blank reference captions are scored as empty references "
                        "(as pycocoevalcap does)", n_blank)
    if shutil.which("java") is None:
        raise RuntimeError("caption_metrics needs Java 17 for the METEOR scorer and the PTB tokenizer: "
                           "apt-get install openjdk-17-jre-headless")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, dict[str, dict[str, float]]] = {g: {} for g in groups}
    total, done = sum(len(sets) for sets, _ in groups.values()), 0
    with _quiet_java():
        tokenized = _tokenize({**{("ref", g, i): refs for g, (_, references) in groups.items()
                                  for i, refs in references.items()},
                               **{("pred", g, name, i): [p] for g, (sets, _) in groups.items()
                                  for name, preds in sets.items() for i, p in preds.items()}})
        meteor_scorer = Meteor()
        for g, (sets, references) in groups.items():
            gts = {i: tokenized[("ref", g, i)] for i in references}
            for name, preds in sets.items():
                res = {i: tokenized[("pred", g, name, i)] for i in preds}
                bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
                meteor, _ = meteor_scorer.compute_score(gts, res)
                rouge, _ = Rouge().compute_score(gts, res)
                cider, _ = Cider().compute_score(gts, res)
                out[g][name] = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
                out[g][name].update({"METEOR": float(meteor), "ROUGE-L": float(rouge), "CIDEr": float(cider)})
                done += 1
                log.info("caption metrics %d/%d (%s): CIDEr %.3f", done, total, " ".join(x for x in (g, name) if x)
                         or "captions", cider)
    return out


def distinct_share(captions: list[str]) -> float:
    """Distinct captions (stripped, lowercased) / number of captions; 0.0 for an empty list."""
    if not captions:
        return 0.0
    return len({c.strip().lower() for c in captions}) / len(captions)


# mAP@k, the DCASE language-based audio retrieval metric (task 6b: each caption queries the audio clips,
# one relevant clip per query, so AP@10 = 1/rank if rank <= 10 else 0). With R relevant items per query
# (audio -> its captions) AP@k = sum_{r<=k} P@r * rel(r) / min(R, k): 1 for a perfect ranking; equal to
# the audio-text retrieval convention (divide by R, Mei et al. 2022) whenever R <= k, as Clotho's 5 <= 10.

def _expected_ap(above: torch.Tensor, n: torch.Tensor, a: torch.Tensor, a_above: torch.Tensor,
                 n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """E[AP@k] per query (Q,) float64 under uniformly random tie-breaking, from the tied block at each rank.

    above, n, a, a_above: (Q, K) for ranks r = 1..K (K <= k): candidates strictly above the block that
    holds rank r, the block's size, relevant items in it, relevant items above it. A relevant item at
    rank r adds P@r = (relevant at ranks <= r) / r. Rank r is position t = r - above of a uniformly
    shuffled block: P(relevant) = a / n and, given that, the t - 1 positions before it hold
    (t - 1)(a - 1)/(n - 1) relevant items on average, so E[rel(r) * hits(r)] = a/n (a_above + 1 + that).
    """
    above, n, a, a_above = (x.double() for x in (above, n, a, a_above))
    r = torch.arange(1, above.shape[1] + 1, dtype=torch.float64)  # (K,)
    t = r - above  # (Q, K) position inside the block
    hits = a / n * (a_above + 1 + (t - 1) * (a - 1) / (n - 1).clamp(min=1))  # (Q, K)
    return (hits / r).sum(1) / n_relevant.double().clamp(max=k)


def map_at_k(ranks: TiedRanks | torch.Tensor, k: int = 10) -> float:
    """mAP@k for one relevant item per query (text -> audio, the DCASE case): mean E[1/rank if rank <= k].

    ranks: TiedRanks (as retrieval_ranks returns for t2i) or plain 1-based ranks (Q,). Exact under
    uniformly random tie-breaking, so a collapsed model scores exactly chance_map_at_k. Queries with
    several relevant items need their whole ranking: average_precision_at_k.
    """
    r = ranks if isinstance(ranks, TiedRanks) else TiedRanks.untied(ranks)
    if r.above.numel() == 0:
        raise ValueError("map_at_k needs at least one rank")
    if (r.pos != 1).any():
        raise ValueError("map_at_k: a query has several relevant items tied; use average_precision_at_k")
    above, n = r.above.cpu().double()[:, None], (r.neg.cpu() + 1).double()[:, None]  # (Q, 1)
    kk = min(k, int((above + n).max()))  # the ranks that exist (the same K as chance_map_at_k's)
    rank = torch.arange(1, kk + 1, dtype=torch.float64)[None, :]  # (1, K)
    in_block = ((rank > above) & (rank <= above + n)).double()  # (Q, K): the relevant item can sit there
    ones = torch.ones(len(above), dtype=torch.float64)
    return float(_expected_ap(above.expand(-1, kk), n.expand(-1, kk), in_block, 0 * in_block, ones, k).mean())


@torch.inference_mode()
def average_precision_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int = 10,
                           chunk: int | None = None) -> torch.Tensor:
    """E[AP@k] per query (Q,) float64 under uniformly random tie-breaking (a tie is exact float equality).

    scores (Q, N) similarity of each query to each candidate; relevant (Q, N) bool, >= 1 per query.
    Only the tied blocks that reach the top k matter, so the cost is O(Q * N * k) comparisons.
    """
    if scores.shape != relevant.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must be the same (Q, N)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or inf: the model diverged or its checkpoint is damaged")
    relevant = relevant.to(scores.device).bool()
    n_relevant = relevant.sum(1)  # (Q,)
    if (n_relevant == 0).any():
        raise ValueError(f"query {int(torch.nonzero(n_relevant == 0)[0])} has no relevant item")
    q, n = scores.shape
    kk = min(k, n)
    chunk = chunk or max(1, (1 << 22) // (n * kk))
    out = []
    for s in range(0, q, chunk):
        sc, rel = scores[s:s + chunk], relevant[s:s + chunk]  # (c, N)
        level = sc.topk(kk, dim=1).values[..., None]  # (c, K, 1): the score at ranks 1..K
        higher, tied = sc[:, None, :] > level, sc[:, None, :] == level  # (c, K, N)
        out.append(_expected_ap(higher.sum(2), tied.sum(2), (tied & rel[:, None]).sum(2),
                                (higher & rel[:, None]).sum(2), n_relevant[s:s + chunk], k).cpu())
    return torch.cat(out)


def retrieval_map_at_k(item_emb: torch.Tensor, text_emb: torch.Tensor, text_to_item: torch.Tensor,
                       k: int = 10) -> dict[str, float]:
    """{"i2t": mAP@k of each item (audio clip, image) querying all texts (its captions relevant),
    "t2i": mAP@k of each text querying the items (one relevant)}; inputs as in retrieval_ranks."""
    n = item_emb.shape[0]
    _captions_per_image(text_to_item, n)
    text_emb, owner = text_emb.to(item_emb), text_to_item.to(item_emb.device).long()
    items = torch.arange(n, device=owner.device)
    chunk = max(16, (1 << 22) // max(n, len(owner)))  # queries per matmul, as in retrieval_ranks
    i2t = [average_precision_at_k(item_emb[s:s + chunk] @ text_emb.T, owner[None, :] == items[s:s + chunk, None], k)
           for s in range(0, n, chunk)]  # (c, M) scores, an item's captions relevant
    t2i = [average_precision_at_k(text_emb[s:s + chunk] @ item_emb.T, owner[s:s + chunk, None] == items[None, :], k)
           for s in range(0, len(owner), chunk)]  # (c, N) scores, one relevant item
    return {"i2t": float(torch.cat(i2t).mean()), "t2i": float(torch.cat(t2i).mean())}


def chance_map_at_k(n_relevant: torch.Tensor | int, n_candidates: int, k: int = 10) -> float:
    """Exact E[mAP@k] of a uniformly random ranking = of a collapsed model (every candidate tied).

    n_relevant: relevant items per query (Q,) or one int for all; n_candidates: N. With one relevant
    item this is H_min(k, N) / N (H: harmonic number).
    """
    rel = torch.as_tensor(n_relevant, dtype=torch.long).reshape(-1)
    if rel.numel() == 0 or (rel < 1).any() or (rel > n_candidates).any():
        raise ValueError(f"n_relevant must be >= 1 and <= n_candidates={n_candidates}")
    kk = min(k, n_candidates)
    zeros = torch.zeros(len(rel), kk, dtype=torch.long)
    return float(_expected_ap(zeros, zeros + n_candidates, rel[:, None].expand(-1, kk), zeros, rel, k).mean())


def chance_retrieval_map(text_to_item: torch.Tensor, n_items: int, k: int = 10) -> dict[str, float]:
    """chance_map_at_k for retrieval_map_at_k's two directions (exact, no simulation)."""
    counts = _captions_per_image(text_to_item, n_items)
    m = int(text_to_item.numel())
    # one value per query, averaged like retrieval_map_at_k's, so a collapsed model equals it to the last bit
    return {"i2t": chance_map_at_k(counts, m, k), "t2i": chance_map_at_k(torch.ones(m, dtype=torch.long), n_items, k)}

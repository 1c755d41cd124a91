import itertools
import math
import threading
import time
from fractions import Fraction

import pytest
import numpy as np
import torch

from mmalign import metrics
from mmalign.metrics import (caption_metrics, caption_metrics_sets, chance_retrieval, distinct_share, recall_summary,
                             retrieval_metrics, retrieval_ranks)


def _random_set(n_images=13, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(1, 6, (n_images,), generator=g)  # 1-5 captions per image
    owner = torch.repeat_interleave(torch.arange(n_images), caps)  # (M,)
    owner = owner[torch.randperm(len(owner), generator=g)]  # captions not grouped by image
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(len(owner), dim, generator=g, dtype=torch.float64), dim=1)
    return img, txt, owner


def _brute_force(img, txt, owner):
    s = (img @ txt.T).tolist()  # (N, M)
    n, m = len(s), len(s[0])
    t2i = [1 + sum(s[j][t] > s[owner[t]][t] for j in range(n)) for t in range(m)]
    i2t = [min(1 + sum(s[i][u] > s[i][t] for u in range(m)) for t in range(m) if owner[t] == i) for i in range(n)]
    return i2t, t2i


def _old_summary(ranks, ks=(1, 5, 10)):
    """What recall_summary computed before ties were kept: plain fractions and mean of integer ranks."""
    r = torch.tensor(ranks, dtype=torch.float64)
    return {**{f"R{k}": float((r <= k).double().mean()) for k in ks}, "mean_rank": float(r.mean()),
            "median_rank": float(np.median(r.numpy()))}  # MedR as the retrieval papers' np.median


@pytest.mark.parametrize("chunk", [1024, 3])
def test_ranks_without_ties_match_brute_force_and_old_values(chunk):
    img, txt, owner = _random_set()
    i2t, t2i = retrieval_ranks(img, txt, owner, chunk=chunk)
    want_i2t, want_t2i = _brute_force(img, txt, owner.tolist())
    for got, want in ((i2t, want_i2t), (t2i, want_t2i)):
        assert (got.above + 1).tolist() == want and got.pos.tolist() == [1] * len(want)
        assert got.neg.tolist() == [0] * len(want)
        assert recall_summary(got) == _old_summary(want)  # bit for bit: no tie, no change
        assert recall_summary(torch.tensor(want)) == _old_summary(want)


def _expected_by_enumeration(above, pos, neg, ks):
    """Exact expectation over every placement of the positives in the tied block (Fractions)."""
    placements = list(itertools.combinations(range(1, pos + neg + 1), pos))
    first = [above + min(c) for c in placements]  # rank of the first positive in each placement
    out = {f"R{k}": Fraction(sum(r <= k for r in first), len(first)) for k in ks}
    out["mean_rank"] = Fraction(sum(first), len(first))
    return out


def test_tied_ranks_match_enumeration_of_tie_breaks():
    # integer embeddings in {0, 1}: scores are small exact integers, so many ties of every kind
    g = torch.Generator().manual_seed(3)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])
    img = torch.randint(0, 2, (6, 3), generator=g).double()
    txt = torch.randint(0, 2, (len(owner), 3), generator=g).double()
    ks = (1, 2, 3, 5)
    i2t, t2i = retrieval_ranks(img, txt, owner, chunk=4)
    assert (i2t.pos > 1).any()  # several of an image's captions tie for its best score
    for ranks in (i2t, t2i):
        assert (ranks.neg > 0).any(), "the set should contain ties"
        want = [_expected_by_enumeration(*map(int, q), ks) for q in zip(*ranks)]
        got = recall_summary(ranks, ks)
        for key in got.keys() - {"median_rank"}:
            assert got[key] == pytest.approx(float(sum(w[key] for w in want) / len(want)), abs=1e-12)
        # MedR with ties: the median over queries of each query's expected rank
        assert got["median_rank"] == pytest.approx(float(np.median([float(w["mean_rank"]) for w in want])), abs=1e-12)


def test_perfect_embeddings_score_one():
    img, _, owner = _random_set()
    out = retrieval_metrics(img, img[owner], owner)
    assert out["i2t"] == out["t2i"] == {"R1": 1.0, "R5": 1.0, "R10": 1.0, "mean_rank": 1.0, "median_rank": 1.0}


def test_duplicate_images_split_the_credit():
    owner = torch.tensor([0, 1, 2, 2])
    img = torch.eye(3, dtype=torch.float64)
    img[1] = img[0]  # images 0 and 1 identical: each of their captions ties between them
    t2i = recall_summary(retrieval_ranks(img, img[owner], owner)[1], ks=(1,))
    assert t2i == {"R1": (0.5 + 0.5 + 1 + 1) / 4, "mean_rank": (1.5 + 1.5 + 1 + 1) / 4, "median_rank": 1.25}


@pytest.mark.parametrize("counts", [[1] * 7, [3] * 5, [1, 3, 5, 1, 5, 3, 3, 1]])
def test_collapsed_model_scores_exactly_chance(counts):
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    owner = owner[torch.randperm(len(owner), generator=torch.Generator().manual_seed(0))]
    same = torch.full((1, 4), 0.5)  # all embeddings equal (exact dyadic scores: ties are exact)
    out = retrieval_metrics(same.expand(len(counts), 4), same.expand(len(owner), 4), owner)
    assert out == chance_retrieval(owner, len(counts))
    assert out["t2i"]["R1"] == pytest.approx(1 / len(counts)) and out["i2t"]["R1"] < 1


def test_collapsed_model_on_a_large_set_is_fast_and_chance():
    owner = torch.arange(1000).repeat_interleave(5)  # M = 5000 texts, all tied
    same = torch.full((1, 8), 0.25)
    t0 = time.perf_counter()
    out = retrieval_metrics(same.expand(1000, 8), same.expand(5000, 8), owner)
    assert time.perf_counter() - t0 < 10
    assert out == chance_retrieval(owner, 1000)
    assert out["i2t"]["R1"] == pytest.approx(5 / 5000) and out["i2t"]["mean_rank"] == pytest.approx(5001 / 6)


@pytest.mark.parametrize("which", [0, 1])
def test_nan_embeddings_are_refused_not_ranked_first(which):
    img, txt, owner = _random_set()
    (img, txt)[which][2, 0] = float("nan")
    with pytest.raises(ValueError, match=("image_emb", "text_emb")[which] + " holds NaN"):
        retrieval_metrics(img, txt, owner)


def test_chance_one_caption_each_is_uniform():
    out = chance_retrieval(torch.arange(10), 10)
    for d in ("i2t", "t2i"):
        assert out[d] == pytest.approx({"R1": 0.1, "R5": 0.5, "R10": 1.0, "mean_rank": 5.5, "median_rank": 5.5},
                                       abs=1e-12)


def test_chance_matches_the_closed_form():
    # the best of c positives among m in random order: P(rank <= k) = 1 - C(m-c, k) / C(m, k), E = (m+1)/(c+1)
    _, _, owner = _random_set(n_images=20)
    m, counts = len(owner), torch.bincount(owner).tolist()
    out = chance_retrieval(owner, 20)["i2t"]
    for k in (1, 5, 10):
        want = sum(1 - Fraction(math.comb(m - c, k), math.comb(m, k)) for c in counts) / 20
        assert out[f"R{k}"] == pytest.approx(float(want), abs=1e-12)
    assert out["mean_rank"] == pytest.approx(float(sum(Fraction(m + 1, c + 1) for c in counts) / 20), abs=1e-12)


def test_chance_matches_monte_carlo():
    _, _, owner = _random_set(n_images=20)
    n, m, trials = 20, len(owner), 4000
    g = torch.Generator().manual_seed(1)
    exact = chance_retrieval(owner, n)
    # t2i: each caption's image scored against N random image scores
    s = torch.rand(trials, m, n, generator=g)
    t2i = 1 + (s > s.gather(2, owner.expand(trials, m)[..., None])).sum(2)  # (T, M)
    # i2t: a random permutation of the M texts; an image's rank is its best caption's position
    pos = torch.rand(trials, m, generator=g).argsort(1).argsort(1) + 1  # (T, M)
    i2t = torch.full((trials, n), m + 1).scatter_reduce(1, owner.expand(trials, m), pos, "amin")  # (T, N)
    for d, ranks in (("i2t", i2t), ("t2i", t2i)):
        mc = recall_summary(ranks.flatten())
        for k in (1, 5, 10):
            assert mc[f"R{k}"] == pytest.approx(exact[d][f"R{k}"], abs=0.01)
        assert mc["mean_rank"] == pytest.approx(exact[d]["mean_rank"], rel=0.02)


REFS = {
    "1": ["a dog runs across a grassy field", "a brown dog running on grass", "the dog is playing outside"],
    "2": ["two people ride bicycles down a street", "cyclists on a city road", "a pair of bikers in traffic"],
    "3": ["a plate of pasta with tomato sauce", "spaghetti served on a white plate", "a bowl of noodles"],
    "4": ["a red bus parked at the station", "a double decker bus at a stop", "the bus waits for people"],
}


def _call_with_timeout(fn, preds, refs, timeout=120):
    # a METEOR input with a stray newline would block forever on the java pipe; fail instead
    out = {}
    t = threading.Thread(target=lambda: out.update(fn(preds, refs)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn.__name__} hung"
    return out


def _direct_pycocoevalcap(preds, refs):
    """The standard path, as COCOEvalCap.evaluate runs it: tokenize gts and res, then the four scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in r] for i, r in refs.items()})
    res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in preds.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    for name, scorer in (("METEOR", Meteor()), ("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        out[name] = float(scorer.compute_score(gts, res)[0])
    return out


# Edge cases the standard path scores without trouble: "|" stays a token ("|||" becomes "| | |"),
# "" and all-punctuation captions score as empty, "\n" and \x85 are spaces, blank references count.
EDGE_PREDS = {"1": "a dog | runs ||| on grass", "2": "", "3": "!!! ...", "4": "|||", "5": "|",
              "6": "a red\nbus\x85at the station", "7": "a plate |||of pasta"}
EDGE_REFS = {**REFS, "5": ["a cat | on a mat", "", "a cat ||| sits"], "6": ["a bus\nat a stop", "..."],
             "7": ["pasta on a plate", "spaghetti"]}
# These end a line in the PTB jar: a direct call shifts every later caption onto the wrong id.
LINE_BREAKS = "\r\x0b\x0c\u2028\u2029"


@pytest.fixture(scope="module")
def caption_scores():
    """Three scorings on one METEOR JVM (each start takes ~7 s on a 2-core box); Meteor is stateless
    between compute_score calls."""
    from pycocoevalcap.meteor import meteor

    shared = meteor.Meteor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor, "Meteor", lambda: shared)
        good = _call_with_timeout(caption_metrics, {i: r[0] for i, r in REFS.items()}, REFS)
        edge = _call_with_timeout(caption_metrics, EDGE_PREDS, EDGE_REFS)
        direct = _call_with_timeout(_direct_pycocoevalcap, EDGE_PREDS, EDGE_REFS)
        other = {i: "a small red thing" for i in REFS}
        alone = _call_with_timeout(caption_metrics, other, REFS)
        together = _call_with_timeout(caption_metrics_sets, {"good": {i: r[0] for i, r in REFS.items()},
                                                             "other": other}, REFS)
    assert together == {"good": good, "other": alone}  # one JVM for several sets: the same numbers
    return good, edge, direct


def test_caption_metrics_identical_beats_nonsense(caption_scores):
    good, edge, _ = caption_scores
    assert set(good) == set(edge) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-3) and good["ROUGE-L"] == pytest.approx(1.0)
    assert good["CIDEr"] > 2.0
    assert all(good[k] > edge[k] + 0.2 for k in good)


def test_caption_metrics_equal_a_direct_pycocoevalcap_call_on_edge_cases(caption_scores):
    _, edge, direct = caption_scores
    assert edge == direct  # exactly: same tokens, same scorers


def test_line_breaks_the_ptb_jar_splits_on_are_spaces_like_newline(caplog):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {**{f"c{n}": [f"a{ch}b"] for n, ch in enumerate(LINE_BREAKS)}, "last": ["sentinel"]}
    direct = PTBTokenizer().tokenize({i: [{"caption": c} for c in v] for i, v in caps.items()})
    assert direct["last"] != ["sentinel"]  # the standard path misaligns: why metrics guards these
    to_newline = str.maketrans(dict.fromkeys(LINE_BREAKS, "\n"))
    newline = PTBTokenizer().tokenize({i: [{"caption": c.translate(to_newline)} for c in v] for i, v in caps.items()})
    assert metrics._tokenize(caps) == newline == {**{f"c{n}": ["a b"] for n in range(5)}, "last": ["sentinel"]}


@pytest.mark.parametrize("preds, refs, bad_id", [
    ({"1": "a dog"}, {"1": ["a dog"], "2": ["a cat"]}, "'2'"),
    ({"1": "a dog", "7": "a cat"}, {"1": ["a dog"]}, "'7'"),
    ({"1": "a dog", "2": "a cat"}, {"1": ["a dog"], "2": []}, "'2'"),
    ({"1": "a dog"}, {"1": [" ", "\n"]}, "'1'"),
])
def test_caption_metrics_validates_ids(preds, refs, bad_id):
    with pytest.raises(ValueError, match=bad_id):
        caption_metrics(preds, refs)


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="Java 17"):
        caption_metrics({"1": "a dog"}, {"1": ["a dog"]})


def test_distinct_share():
    assert distinct_share([]) == 0.0
    assert distinct_share(["a dog", "A dog ", "a cat", "a bird"]) == 0.75
    assert distinct_share(["same"] * 4) == 0.25

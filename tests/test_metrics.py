import threading

import pytest
import torch

from mmalign import metrics
from mmalign.metrics import (caption_metrics, chance_retrieval, distinct_share, recall_summary,
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


@pytest.mark.parametrize("chunk", [1024, 3])
def test_ranks_match_brute_force(chunk):
    img, txt, owner = _random_set()
    i2t, t2i = retrieval_ranks(img, txt, owner, chunk=chunk)
    want_i2t, want_t2i = _brute_force(img, txt, owner.tolist())
    assert i2t.tolist() == want_i2t and t2i.tolist() == want_t2i
    for got, want in ((i2t, want_i2t), (t2i, want_t2i)):
        summary = recall_summary(got)
        for k in (1, 5, 10):
            assert summary[f"R@{k}"] == pytest.approx(sum(r <= k for r in want) / len(want))
        assert summary["mean_rank"] == pytest.approx(sum(want) / len(want))


def test_perfect_embeddings_and_ties():
    img, _, owner = _random_set()
    img[1] = img[0]  # a duplicate image: ties count in the query's favour, so still rank 1
    out = retrieval_metrics(img, img[owner], owner)
    assert out["i2t"]["R@1"] == out["t2i"]["R@1"] == 1.0
    assert out["i2t"]["median_rank"] == out["t2i"]["mean_rank"] == 1.0


def test_recall_summary_median_is_numpy_median():
    assert recall_summary(torch.tensor([1, 2, 7, 9]))["median_rank"] == 4.5


def test_chance_one_caption_each_is_uniform():
    out = chance_retrieval(torch.arange(10), 10)
    for d in ("i2t", "t2i"):
        assert out[d] == pytest.approx({"R@1": 0.1, "R@5": 0.5, "R@10": 1.0, "mean_rank": 5.5, "median_rank": 5.5})


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
            assert mc[f"R@{k}"] == pytest.approx(exact[d][f"R@{k}"], abs=0.01)
        assert mc["mean_rank"] == pytest.approx(exact[d]["mean_rank"], rel=0.02)


REFS = {
    "1": ["a dog runs across a grassy field", "a brown dog running on grass", "the dog is playing outside"],
    "2": ["two people ride bicycles down a street", "cyclists on a city road", "a pair of bikers in traffic"],
    "3": ["a plate of pasta with tomato sauce", "spaghetti served on a white plate", "a bowl of noodles"],
    "4": ["a red bus parked at the station", "a double decker bus at a stop", "the bus waits for people"],
}


def _call_with_timeout(preds, refs, timeout=120):
    # a METEOR input with a stray newline would block forever on the java pipe; fail instead
    out = {}
    t = threading.Thread(target=lambda: out.update(caption_metrics(preds, refs)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "caption_metrics hung"
    return out


@pytest.fixture(scope="module")
def caption_scores():
    """Only two real calls: each starts the METEOR JVM, ~7 s on a 2-core box."""
    good = _call_with_timeout({i: r[0] for i, r in REFS.items()}, REFS)
    bad = {"1": "purple\nelephant | sings ||| loudly\r\u2028tonight", "2": "", "3": "!!!", "4": "zebra zebra zebra"}
    return good, _call_with_timeout(bad, REFS)


def test_caption_metrics_identical_beats_nonsense(caption_scores):
    good, bad = caption_scores
    assert set(good) == set(bad) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-3) and good["ROUGE-L"] == pytest.approx(1.0)
    assert good["CIDEr"] > 2.0
    assert bad["BLEU-4"] < 0.01 and bad["CIDEr"] < 0.1
    assert all(good[k] > bad[k] + 0.3 for k in good)


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

"""mAP@k (the DCASE audio retrieval metric) in metrics.py: exact under ties, exact chance."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from mmalign.metrics import (
    TiedRanks, average_precision_at_k, chance_map_at_k, chance_retrieval_map, map_at_k, retrieval_map_at_k,
    retrieval_ranks)


def ap_at_k(order: list[int], relevant: set[int], k: int) -> Fraction:
    """AP@k of one ranking by the definition: sum of P@r at relevant ranks r <= k, over min(R, k)."""
    hits, total = 0, Fraction(0)
    for r, c in enumerate(order[:k], 1):
        if c in relevant:
            hits += 1
            total += Fraction(hits, r)
    return total / min(len(relevant), k)


def brute_force(scores: list[float], relevant: set[int], k: int) -> Fraction:
    """Mean AP@k over every ordering that sorts by score (ties in every order: all equally likely)."""
    orders = [p for p in itertools.permutations(range(len(scores)))
              if all(scores[a] >= scores[b] for a, b in zip(p, p[1:]))]
    return sum((ap_at_k(list(p), relevant, k) for p in orders), Fraction(0)) / len(orders)


def test_expected_ap_equals_brute_force_enumeration_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 8, (1,), generator=g))
        scores = torch.randint(0, 3, (1, n), generator=g).double()  # few levels: many ties
        rel = torch.rand(1, n, generator=g) < 0.4
        rel[0, int(torch.randint(0, n, (1,), generator=g))] = True
        k = int(torch.randint(1, 6, (1,), generator=g))
        want = brute_force(scores[0].tolist(), set(torch.nonzero(rel[0]).flatten().tolist()), k)
        got = average_precision_at_k(scores, rel, k)
        assert got.shape == (1,) and abs(float(got[0]) - float(want)) < 1e-12, (trial, scores, rel, k)


def test_no_ties_is_the_textbook_value():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    rel = torch.tensor([[False, True, False, True, False]])
    assert float(average_precision_at_k(scores, rel, k=10)[0]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert float(average_precision_at_k(scores, rel, k=3)[0]) == pytest.approx((1 / 2) / 2)
    assert map_at_k(torch.tensor([1, 2, 11, 10]), k=10) == pytest.approx((1 + 1 / 2 + 0 + 1 / 10) / 4)


def test_perfect_ranking_scores_one_even_with_more_relevant_than_k():
    scores = torch.arange(20, 0, -1).double()[None]  # candidate 0 best
    rel = torch.zeros(1, 20, dtype=torch.bool)
    rel[0, :12] = True  # 12 relevant > k = 10
    assert float(average_precision_at_k(scores, rel, 10)[0]) == 1.0
    assert map_at_k(torch.ones(5, dtype=torch.long)) == 1.0


def _quantised_embeddings(n_items: int, per_item: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    items = torch.nn.functional.normalize(torch.randint(-1, 2, (n_items, 3), generator=g).double() + 1e-3 *
                                          (torch.arange(3) == 0), dim=1)
    owner = torch.arange(n_items).repeat_interleave(per_item)
    texts = torch.nn.functional.normalize(torch.randint(-1, 2, (len(owner), 3), generator=g).double() + 1e-3 *
                                          (torch.arange(3) == 0), dim=1)
    return items, texts, owner


def test_map_at_k_from_tied_ranks_equals_the_score_based_value():
    """The TiedRanks path (t2i, as recall_summary reads it) and the full-ranking path agree under ties."""
    for seed in range(5):
        items, texts, owner = _quantised_embeddings(7, 3, seed)
        _, t2i = retrieval_ranks(items, texts, owner)
        assert (t2i.neg > 0).any()  # the embeddings really tie
        full = retrieval_map_at_k(items, texts, owner, k=5)
        assert map_at_k(t2i, k=5) == pytest.approx(full["t2i"], abs=1e-12)


def test_retrieval_map_brute_force_both_directions():
    items, texts, owner = _quantised_embeddings(3, 2, seed=1)
    got = retrieval_map_at_k(items, texts, owner, k=4)
    scores = (texts @ items.T).tolist()  # (M, N)
    t2i = [brute_force(row, {int(owner[j])}, 4) for j, row in enumerate(scores)]
    i2t = [brute_force([scores[j][i] for j in range(len(owner))], set(torch.nonzero(owner == i).flatten().tolist()), 4)
           for i in range(3)]
    assert got["t2i"] == pytest.approx(float(sum(t2i) / len(t2i)), abs=1e-12)
    assert got["i2t"] == pytest.approx(float(sum(i2t) / len(i2t)), abs=1e-12)


def test_chance_is_the_harmonic_formula_and_brute_force():
    for n in (1, 3, 10, 57):
        harmonic = sum(1 / t for t in range(1, min(10, n) + 1))
        assert chance_map_at_k(1, n) == pytest.approx(harmonic / n, rel=1e-14)
    for n, r, k in ((5, 2, 3), (6, 3, 10), (4, 4, 2), (7, 1, 7)):
        want = brute_force([0.0] * n, set(range(r)), k)
        assert chance_map_at_k(r, n, k) == pytest.approx(float(want), abs=1e-14)


def test_chance_matches_a_simulation_at_realistic_size():
    g = torch.Generator().manual_seed(0)
    n, r, trials = 200, 5, 20000
    ranks = torch.argsort(torch.rand(trials, n, generator=g), dim=1)  # rank - 1 of candidate c
    scores = -ranks.double()  # a random strict order per trial
    rel = torch.zeros(trials, n, dtype=torch.bool)
    rel[:, :r] = True
    sim = average_precision_at_k(scores, rel, 10)
    exact = chance_map_at_k(r, n, 10)
    assert abs(float(sim.mean()) - exact) < 4 * float(sim.std()) / trials ** 0.5


def test_collapsed_model_scores_exactly_chance():
    items = torch.nn.functional.normalize(torch.ones(9, 4), dim=1)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8])
    texts = torch.nn.functional.normalize(torch.ones(len(owner), 4), dim=1)
    chance = chance_retrieval_map(owner, 9, k=10)
    assert retrieval_map_at_k(items, texts, owner, k=10) == chance  # exact, not approx
    _, t2i = retrieval_ranks(items, texts, owner)
    assert map_at_k(t2i, k=10) == chance["t2i"]
    assert chance["t2i"] == pytest.approx(sum(1 / t for t in range(1, 10)) / 9)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="average_precision_at_k"):
        map_at_k(TiedRanks(torch.tensor([0]), torch.tensor([2]), torch.tensor([3])))
    with pytest.raises(ValueError, match="no relevant"):
        average_precision_at_k(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision_at_k(torch.tensor([[float("nan"), 0.0]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="n_relevant"):
        chance_map_at_k(4, 3)

"""blip_ops.metrics on tiny examples whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blip_ops.metrics import (
    bootstrap_ci,
    grouped_auc_ci,
    hits_at_k,
    ndcg_at_k,
    paired_bootstrap_ci,
    paired_summary,
    roc_auc,
    success_at_1,
    summary,
)

# --------------------------------------------------------------------------- per-query values


def test_hits_at_k_from_ranks():
    ranks = np.array([0, 1, 4, 9, 10])
    assert hits_at_k(ranks, 1).tolist() == [1, 0, 0, 0, 0]
    assert hits_at_k(ranks, 5).tolist() == [1, 1, 1, 0, 0]
    assert hits_at_k(ranks, 10).tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        hits_at_k(ranks, 0)
    with pytest.raises(ValueError, match="1-D"):
        hits_at_k(ranks.reshape(5, 1), 1)


def test_success_at_1_is_the_first_position():
    rel = np.array([[True, False], [False, True], [False, False]])
    assert success_at_1(rel).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="K = 0"):
        success_at_1(np.zeros((2, 0), bool))


def test_ndcg_by_hand():
    rel = np.array(
        [
            [False, True, False],  # one relevant at rank 2 of 1 relevant: 1/log2(3)
            [True, True, False],  # both relevant on top: ideal, 1
            [False, False, True],  # 1/log2(4) over the ideal of 2: 1 + 1/log2(3)
            [False, False, False],  # nothing relevant anywhere: 0
        ]
    )
    n_relevant = np.array([1, 2, 2, 0])
    got = ndcg_at_k(rel, 10, n_relevant=n_relevant)
    want = [1 / math.log2(3), 1.0, (1 / math.log2(4)) / (1 + 1 / math.log2(3)), 0.0]
    assert got == pytest.approx(want)
    # k cuts both the ranking and the ideal: the relevant result at rank 3 is past k = 2.
    assert ndcg_at_k(rel, 2, n_relevant=n_relevant)[2] == 0.0
    # Ideal DCG from min(n_relevant, k): 5 relevant, k = 1, first one relevant -> 1.
    assert ndcg_at_k(np.array([[True]]), 1, n_relevant=np.array([5])).tolist() == [1.0]
    with pytest.raises(ValueError, match="n_relevant"):
        ndcg_at_k(rel, 10, n_relevant=np.array([1, 2]))
    with pytest.raises(ValueError, match="below"):
        ndcg_at_k(rel, 10, n_relevant=np.array([0, 2, 2, 0]))


# --------------------------------------------------------------------------- AUC


def test_roc_auc_by_hand_with_ties_half():
    # Pairs: 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4.
    assert roc_auc([3, 2], [1, 2]) == 0.875
    assert roc_auc([5, 6], [1, 2, 3]) == 1.0
    assert roc_auc([1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1]) == 0.5
    assert math.isnan(roc_auc([], [1.0]))
    assert math.isnan(roc_auc([1.0], []))


def test_roc_auc_weights_equal_repeated_scores():
    pos, neg = np.array([3.0, 2.0, 0.5]), np.array([1.0, 2.0])
    w_pos, w_neg = np.array([2, 0, 1]), np.array([1, 3])
    repeated = roc_auc(np.repeat(pos, w_pos), np.repeat(neg, w_neg))
    assert roc_auc(pos, neg, pos_weight=w_pos, neg_weight=w_neg) == pytest.approx(repeated)


def test_roc_auc_equals_the_pairwise_count():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = ((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean()
    assert roc_auc(pos, neg) == pytest.approx(pairwise)


def test_grouped_auc_ci_brackets_the_auc():
    rng = np.random.default_rng(1)
    groups = np.arange(60)
    pos, neg = rng.normal(1, 1, 60), rng.normal(0, 1, 60)
    lo, hi = grouped_auc_ci(pos, neg, groups, groups, n_boot=300)
    assert lo <= roc_auc(pos, neg) <= hi and hi - lo < 0.4
    assert grouped_auc_ci([2.0, 3.0], [0.0, 1.0], [0, 1], [0, 1], n_boot=50) == (1.0, 1.0)
    assert all(math.isnan(x) for x in grouped_auc_ci([], [1.0], [], [0]))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_of_constant_values_is_a_point():
    assert bootstrap_ci(np.ones(20)) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(7)) == (0.0, 0.0)
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(2)
    widths = []
    for n in (40, 400, 4000):
        hits = (rng.random(n) < 0.6).astype(float)
        lo, hi = bootstrap_ci(hits, n_boot=500)
        assert lo < hits.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # About 2 x 1.96 x sqrt(p(1-p)/n) for a proportion: 0.030 at n = 4000.
    assert widths[2] == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 4000), rel=0.25)


def test_bootstrap_is_deterministic_per_seed_and_level_widens():
    hits = (np.random.default_rng(3).random(100) < 0.5).astype(float)
    assert bootstrap_ci(hits, seed=5) == bootstrap_ci(hits, seed=5)
    lo90, hi90 = bootstrap_ci(hits, level=0.90)
    lo99, hi99 = bootstrap_ci(hits, level=0.99)
    assert lo99 <= lo90 and hi90 <= hi99
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(hits, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(hits, n_boot=0)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(np.ones((3, 2)))


def test_paired_difference():
    a = (np.random.default_rng(4).random(50) < 0.5).astype(float)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    # b wins on exactly 10 of 50 queries and never loses: the difference is 0.2, the interval
    # stays above 0 (the paired design sees it; two separate intervals would overlap).
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0
    lo, hi = paired_bootstrap_ci(a, b)
    assert 0 < lo < 0.2 < hi
    assert paired_summary(a, b)["value"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_ci(a, b[:-1])


def test_summary_shape():
    s = summary(np.array([1.0, 0.0, 1.0, 1.0]))
    assert set(s) == {"value", "ci", "n"} and s["n"] == 4 and s["value"] == 0.75
    assert s["ci"][0] <= 0.75 <= s["ci"][1]
    assert summary(np.array([])) == {"value": None, "ci": [None, None], "n": 0}

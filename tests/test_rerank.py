"""`rerank` against a brute-force implementation of BLIP's evaluation rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_ops.rerank import combine_scores, rerank
from tests.conftest import draw_product, encode_image_bytes

QUERIES = ["red leather handbag", "er tong hua xing che", "简约现代沙发 TE04"]


def brute_force_blip_rule(reference, model, text, images, n_candidates, rerank_k):
    """BLIP's rule with transformers' own forward, one pair at a time (no shortcuts)."""
    enc = model.tokenizer(
        [model.normalize_text(text)], truncation=True, max_length=model.text_settings.max_length, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    cos, itm = [], []
    with torch.no_grad():
        for im in images:
            pixels = model.preprocess([im])
            cos.append(float(reference(ids, pixels, use_itm_head=False, attention_mask=mask).itm_score[0, 0]))
            itm.append(float(reference(ids, pixels, use_itm_head=True, attention_mask=mask).itm_score[0, 1]))
    ann = sorted(range(len(images)), key=lambda i: -cos[i])[:n_candidates]  # exact "ANN"
    head = sorted(ann[:rerank_k], key=lambda i: -(itm[i] + cos[i]))
    order = head + ann[rerank_k:]
    scores = {i: itm[i] + cos[i] for i in ann[:rerank_k]} | {i: cos[i] for i in ann[rerank_k:]}
    return order, scores, ann, cos


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("rerank_k", [0, 5, 12])
def test_rerank_equals_brute_force(tiny_model, eager_reference, query, rerank_k):
    images = [draw_product(100 + i) for i in range(16)]
    n = 12
    order, scores, ann, cos = brute_force_blip_rule(eager_reference, tiny_model, query, images, n, rerank_k)
    # Our path: ITC from the split encoders, ANN = exact top n, candidates' images in ANN order.
    q = tiny_model.encode_texts([query])[0]
    emb = tiny_model.encode_images(images).embeddings
    itc_all = (emb @ q).numpy()
    ann_ours = np.argsort(-itc_all, kind="stable")[:n]
    assert list(ann_ours) == ann
    result = rerank(tiny_model, query, itc_all[ann_ours], images=[images[i] for i in ann_ours], rerank_k=rerank_k)
    got = [int(ann_ours[i]) for i in result.order]
    expected_scores = np.array([scores[i] for i in got], dtype=np.float32)
    np.testing.assert_allclose(result.score, expected_scores, atol=1e-5)
    # Same order; only candidates whose scores tie within 1e-5 may swap.
    for a, b in zip(got, order, strict=True):
        assert a == b or abs(scores[a] - scores[b]) < 1e-5
    assert np.isnan(result.itm[rerank_k:]).all() and not np.isnan(result.itm[:rerank_k]).any()
    np.testing.assert_allclose(result.itc, [cos[i] for i in got], atol=1e-5)


def test_rerank_with_cached_tokens_equals_recompute(tiny_model):
    images = [draw_product(200 + i) for i in range(6)]
    itc = np.linspace(0.9, 0.4, 6).astype(np.float32)
    tokens = tiny_model.encode_images(images, return_tokens=True).tokens
    a = rerank(tiny_model, QUERIES[0], itc, images=images, rerank_k=4)
    b = rerank(tiny_model, QUERIES[0], itc, image_tokens=tokens, rerank_k=4, k=3)
    assert list(b.order) == list(a.order[:3]) and len(b) == 3
    np.testing.assert_allclose(a.score[:3], b.score, atol=1e-6)


def test_combine_scores_rule():
    itc = np.array([0.9, 0.8, 0.7, 0.6, 0.5], dtype=np.float32)
    res = combine_scores(itc, [-1.0, 2.0, 0.0])  # re-rank the first three
    assert list(res.order) == [1, 2, 0, 3, 4]
    np.testing.assert_allclose(res.score, [2.8, 0.7, -0.1, 0.6, 0.5], atol=1e-6)
    assert np.isnan(res.itm[3:]).all()
    assert list(combine_scores(itc, []).order) == [0, 1, 2, 3, 4]  # no re-rank: ANN order
    tie = combine_scores([0.5, 0.5], [1.0, 1.0])
    assert list(tie.order) == [0, 1]  # ties keep ANN order
    with pytest.raises(ValueError, match="3 ITM scores for only 2"):
        combine_scores([0.1, 0.2], [1, 2, 3])


def test_rerank_needs_tokens_or_images(tiny_model):
    with pytest.raises(ValueError, match="image_tokens or their images"):
        rerank(tiny_model, "x", np.zeros(3, np.float32), rerank_k=2)


def test_rerank_with_itm_logits_scored_elsewhere(tiny_model):
    """The search service's path: logits its model replica scored, the same rule as tokens give."""
    images = [draw_product(300 + i) for i in range(5)]
    itc = np.linspace(0.8, 0.2, 8).astype(np.float32)
    tokens = tiny_model.encode_images(images, return_tokens=True).tokens
    logits = tiny_model.itm_scores(QUERIES[1], tokens).numpy()
    a = rerank(tiny_model, QUERIES[1], itc, image_tokens=tokens, rerank_k=5, itm_weight=0.3)
    b = rerank(None, QUERIES[1], itc, itm_logits=logits, rerank_k=5, itm_weight=0.3)
    assert list(a.order) == list(b.order)
    np.testing.assert_allclose(a.score, b.score, atol=1e-6)
    assert list(rerank(None, "x", itc, itm_logits=logits, rerank_k=0).order) == list(range(8))
    with pytest.raises(ValueError, match="ITM logits for 5 candidates, need the first 6"):
        rerank(None, "x", itc, itm_logits=logits, rerank_k=6)
    with pytest.raises(ValueError, match="needs a model"):
        rerank(None, "x", itc, image_tokens=tokens, rerank_k=2)


def test_warm_up_runs_a_query_s_model_calls_and_caches_nothing(tiny_model, monkeypatch):
    """A fresh replica's warm-up: text encode, one vision pass and ITM of rerank_k pairs on made-up
    inputs, so the first real query does not pay first-call costs; no made-up tokens are cached.
    Its text goes through the Chinese-to-pinyin path (pypinyin loads its dictionaries then)."""
    from blip_ops import text
    from pipelines.search.scorer import ItmJob, QueryScorer

    spelled: list[str] = []
    pinyin = text._pinyin
    monkeypatch.setattr(text, "_pinyin", lambda run: spelled.append(run) or pinyin(run))
    assert tiny_model.text_settings.to_pinyin
    scorer = QueryScorer(tiny_model, decode_threads=1)
    assert scorer.warm_up(4) > 0
    assert "预热" in spelled
    assert len(scorer.cache) == 0 and scorer.cache.misses == 0
    image = encode_image_bytes(draw_product(3))
    [logits] = scorer.itm([ItmJob("lamp", ("p1:h",), (image,))])
    assert logits.shape == (1,) and np.isfinite(logits).all()


def test_length_groups_bound_the_padding_of_one_pass():
    from pipelines.search.scorer import length_groups

    assert length_groups([]) == []
    assert length_groups([9]) == [[0]]
    # sorted by length; a group closes past 1.5x its shortest
    assert length_groups([5, 28, 6, 7, 30, 12, 8]) == [[0, 2, 3], [6, 5], [1, 4]]
    assert length_groups([5, 28, 6], ratio=10.0) == [[0, 2, 1]]


def test_itm_runs_one_pass_per_length_group_with_the_same_logits(tiny_model, monkeypatch):
    """Jobs of very different text lengths share no ITM pass (each pass pads to its longest),
    and every job's logits are those of scoring it alone."""
    from pipelines.search.scorer import ItmJob, QueryScorer

    images = [encode_image_bytes(draw_product(i)) for i in range(3)]
    keys = tuple(f"p{i}:h" for i in range(3))
    texts = ["lamp", "red cotton sofa with wooden legs and two matching cushions", "sofa", "chair"]
    jobs = [ItmJob(t, keys, tuple(images)) for t in texts]
    alone = [QueryScorer(tiny_model, decode_threads=1).itm([job])[0] for job in jobs]
    scorer = QueryScorer(tiny_model, decode_threads=1)
    passes: list[int] = []
    itm_scores = tiny_model.itm_scores
    monkeypatch.setattr(
        tiny_model, "itm_scores", lambda t, tok: passes.append(len(t)) or itm_scores(t, tok)
    )
    lengths = tiny_model.text_lengths(texts)
    assert max(lengths) > 2 * min(lengths)
    got = scorer.itm(jobs)
    assert sorted(passes) == [3, 9]  # the long text alone; the three short ones together
    for a, b in zip(alone, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

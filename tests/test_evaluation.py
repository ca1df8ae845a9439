"""evaluate_rank against a straightforward per-query reference (torchreid's eval_market1501 loop)."""
import numpy as np
import pytest
import torch

from hybrid_reid.evaluation import compute_distance, evaluate_features, evaluate_rank, rank_metrics
from hybrid_reid.evaluation.reference import reference_rank, reference_re_ranking


def random_case(seed, nq, ng, ids, cams):
    rng = np.random.default_rng(seed)
    dist = rng.random((nq, ng)).astype(np.float32)  # continuous: no ties
    pids = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    return dist, *pids, rng.integers(0, cams, nq), rng.integers(0, cams, ng)


@pytest.mark.parametrize("seed,nq,ng,ids,cams,max_rank", [
    (0, 40, 300, 20, 4, 50), (1, 7, 20, 5, 2, 50), (2, 120, 900, 60, 6, 20), (3, 64, 64, 8, 3, 10),
    (4, 25, 400, 200, 2, 50),  # many queries without any match in the gallery
])
def test_evaluate_rank_matches_reference(seed, nq, ng, ids, cams, max_rank):
    dist, qp, gp, qc, gc = random_case(seed, nq, ng, ids, cams)
    ap, inp, cmc, n_valid = reference_rank(dist, qp, gp, qc, gc, max_rank)
    r = evaluate_rank(dist, qp, gp, qc, gc, max_rank=max_rank, chunk_size=13)
    assert r["num_valid_queries"] == n_valid
    if seed == 4:
        assert n_valid < nq  # the skipped queries really occur in this case
    assert r["mAP"] == pytest.approx(ap, abs=1e-12)
    assert r["mINP"] == pytest.approx(inp, abs=1e-12)
    np.testing.assert_allclose(r["cmc"], cmc, atol=1e-12)
    assert r["cmc"].shape == (min(max_rank, ng),) and r["cmc"][-1] <= 1.0


def test_query_is_gallery_removes_itself_and_same_camera():
    # RGBNT201 evaluates test against itself: the query and its same-camera images must not count
    feats = torch.tensor([[1.0, 0], [0.99, 0.1], [0, 1.0], [0.1, 0.99]])
    pids, cams = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    d = compute_distance(feats, feats).numpy()
    r = evaluate_rank(d, pids, pids, cams, cams)
    # pid 0 has both images in camera 0: no valid match, skipped; pid 1's two queries match each other at rank 1
    assert r["num_valid_queries"] == 2 and r["mAP"] == 1.0 and r["cmc"][0] == 1.0


def test_ties_count_against_the_match():
    # a collapsed model (all features equal) must not score well
    d = np.zeros((4, 8), np.float32)
    qp, gp = np.array([0, 1, 2, 3]), np.repeat(np.arange(4), 2)
    r = evaluate_rank(d, qp, gp, np.zeros(4), np.ones(8))
    assert r["cmc"][0] == 0.0 and r["mAP"] < 0.3


def test_evaluate_rank_accepts_tensors_and_checks_shapes():
    dist, qp, gp, qc, gc = random_case(5, 10, 30, 5, 3)
    a = evaluate_rank(torch.from_numpy(dist), torch.from_numpy(qp), gp, torch.from_numpy(qc), gc)
    b = evaluate_rank(dist, qp, gp, qc, gc)
    assert a["mAP"] == b["mAP"]
    with pytest.raises(ValueError, match="num_query, num_gallery"):
        evaluate_rank(dist.T, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank(dist, qp, gp + 100, qc, gc)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.full_like(dist, np.nan), qp, gp, qc, gc)


def test_euclidean_and_cosine_rank_alike_and_metrics_are_percent():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(30, 16, generator=g), torch.randn(90, 16, generator=g)
    qp, gp = np.arange(30) % 10, np.arange(90) % 10
    qc, gc = np.zeros(30), np.ones(90)
    e = rank_metrics(qf, gf, qp, gp, qc, gc, metric="euclidean")
    c = rank_metrics(qf, gf, qp, gp, qc, gc, metric="cosine")
    assert e["mAP"] == pytest.approx(c["mAP"]) and e["rank1"] == c["rank1"]
    ref = evaluate_rank(compute_distance(qf, gf).numpy(), qp, gp, qc, gc)
    assert e["mAP"] == pytest.approx(100 * ref["mAP"]) and e["rank5"] == pytest.approx(100 * ref["cmc"][4])
    with pytest.raises(ValueError, match="eval.metric"):
        compute_distance(qf, gf, "manhattan")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_equals_evaluate_rank_on_the_full_matrix(metric):
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(40, 24, generator=g)
    qp, gp = torch.randint(0, 40, (150,), generator=g).numpy(), torch.randint(0, 40, (700,), generator=g).numpy()
    qf = centers[qp] + 0.8 * torch.randn(150, 24, generator=g)  # clustered: mAP far from chance
    gf = 3.0 * (centers[gp] + 0.8 * torch.randn(700, 24, generator=g))  # scale must not matter
    qc, gc = torch.randint(0, 4, (150,), generator=g).numpy(), torch.randint(0, 4, (700,), generator=g).numpy()
    full = evaluate_rank(compute_distance(qf, gf, metric).numpy(), qp, gp, qc, gc, max_rank=30)
    assert 0.2 < full["mAP"] < 0.99
    for chunk in (1, 7, 64, 149, 150, 1000, None):
        r = evaluate_features(qf, gf, qp, gp, qc, gc, chunk_size=chunk, metric=metric, max_rank=30)
        assert r["num_valid_queries"] == full["num_valid_queries"]
        assert r["mAP"] == pytest.approx(full["mAP"], abs=1e-12), chunk
        assert r["mINP"] == pytest.approx(full["mINP"], abs=1e-12), chunk
        np.testing.assert_array_equal(r["cmc"], full["cmc"])
    # the engine's entry point goes through it and reports percent
    m = rank_metrics(qf, gf, qp, gp, qc, gc, metric=metric, max_rank=30, chunk_size=16)
    assert m["mAP"] == pytest.approx(100 * full["mAP"], abs=1e-9)
    with pytest.raises(ValueError, match="same D"):
        evaluate_features(qf, gf[:, :10], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="pid arrays"):
        evaluate_features(qf, gf, qp[:-1], gp, qc, gc)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_features(qf, gf, qp, gp, qc, gc, chunk_size=0)


def test_evaluate_features_memory_grows_with_the_chunk_not_the_gallery_product():
    # 2,000 x 30,000 would be 240 MB as one float32 matrix; with 50-query chunks the working set
    # is a few tens of MB (tracemalloc sees numpy's buffers)
    import tracemalloc

    g = torch.Generator().manual_seed(2)
    qf, gf = torch.randn(2000, 16, generator=g), torch.randn(30000, 16, generator=g)
    qp, gp = np.arange(2000) % 500, np.arange(30000) % 500
    qc, gc = np.zeros(2000, int), np.ones(30000, int)
    tracemalloc.start()
    evaluate_features(qf, gf, qp, gp, qc, gc, chunk_size=50)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 60e6, peak


@pytest.mark.parametrize("q,g,k1,k2,lam", [(10, 40, 5, 3, 0.3), (20, 60, 20, 6, 0.3), (7, 30, 7, 1, 0.5)])
def test_re_ranking_matches_the_published_algorithm(q, g, k1, k2, lam):
    from hybrid_reid.evaluation import re_ranking

    rng = np.random.default_rng(q)
    x = rng.normal(size=(q + g, 8)).astype(np.float32)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    ours = re_ranking(d[:q, q:], d[:q, :q], d[q:, q:], k1=k1, k2=k2, lambda_value=lam)
    ref = reference_re_ranking(d[:q, q:], d[:q, :q], d[q:, q:], k1, k2, lam)
    assert ours.shape == (q, g) and np.abs(ours - ref).max() < 1e-5


def clustered(seed):
    """10 identities: one query and 6 gallery features each, noisy around a centre; cameras 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 16, generator=g)
    gf = centers.repeat_interleave(6, 0) + 0.9 * torch.randn(60, 16, generator=g)
    qf = centers + 0.9 * torch.randn(10, 16, generator=g)
    return qf, gf, np.arange(10), np.repeat(np.arange(10), 6), np.zeros(10), np.ones(60)


def test_rerank_changes_the_metrics():
    qf, gf, qp, gp, qc, gc = clustered(1)
    plain = rank_metrics(qf, gf, qp, gp, qc, gc)
    reranked = rank_metrics(qf, gf, qp, gp, qc, gc, rerank=(5, 3, 0.3))
    assert reranked["mAP"] != plain["mAP"]


def reference_aqe(qf, gf, k, alpha, times):
    """fast-reid's alpha-QE, row by row (with negative similarities weighted 0)."""
    nq = len(qf)
    feats = np.concatenate([qf, gf]).astype(np.float64)
    for _ in range(times):
        normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        sims = normed @ normed.T
        new = []
        for row in sims:
            top = np.argsort(-row, kind="stable")[:k]
            w = np.power(np.clip(row[top], 0, None), alpha)[:, None]
            new.append((feats[top] * w).mean(0))
        feats = np.stack(new)
    return feats[:nq], feats[nq:]


@pytest.mark.parametrize("k,alpha,times", [(5, 3.0, 1), (3, 1.0, 2), (1, 3.0, 1)])
def test_query_expansion_matches_the_row_by_row_algorithm(k, alpha, times):
    from hybrid_reid.evaluation import query_expansion

    rng = np.random.default_rng(k)
    qf, gf = rng.normal(size=(7, 12)), rng.normal(size=(25, 12))
    ours = query_expansion(torch.from_numpy(qf), torch.from_numpy(gf), k, alpha, times)
    ref = reference_aqe(qf, gf, k, alpha, times)
    for a, b in zip(ours, ref):
        assert np.abs(a.numpy() - b).max() < 1e-5
    if k == 1:  # the only neighbour is the feature itself, weight 1
        assert np.allclose(ours[0].numpy(), qf, atol=1e-6)


def test_aqe_changes_the_metrics_and_keeps_shared_query_gallery_consistent():
    qf, gf, qp, gp, qc, gc = clustered(2)
    plain = rank_metrics(qf, gf, qp, gp, qc, gc)
    expanded = rank_metrics(qf, gf, qp, gp, qc, gc, aqe=(5, 3.0))
    assert expanded["mAP"] != plain["mAP"]
    cams = np.arange(60) % 3
    shared = rank_metrics(gf, gf, gp, gp, cams, cams, aqe=(5, 3.0))  # one set: expanded once, within itself
    from hybrid_reid.evaluation import query_expansion

    e = query_expansion(gf, gf[:0], 5, 3.0)[0]
    assert shared["mAP"] == pytest.approx(rank_metrics(e, e, gp, gp, cams, cams)["mAP"])

"""The peers' per-query evaluation loop and per-image re-ranking: the references that
:func:`~hybrid_reid.evaluation.evaluate_rank` and :func:`~hybrid_reid.evaluation.re_ranking` are
checked (``tests/test_evaluation.py``) and benchmarked (``python run.py bench eval``) against.
Not used to evaluate."""
from __future__ import annotations

from typing import Tuple

import numpy as np


def reference_rank(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                   g_camids: np.ndarray, max_rank: int = 50) -> Tuple[float, float, np.ndarray, int]:
    """torchreid / fast-reid ``eval_market1501`` (the Python version), one query at a time.

    Arg-sorts every whole gallery row, then walks the queries in a Python loop. Returns
    ``(mAP, mINP, cmc [max_rank], num_valid_queries)`` as fractions.
    """
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1)  # as the peers do (numpy's default kind)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(num_q):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        raw_cmc = matches[q][~remove]
        if not raw_cmc.any():
            continue
        cmc = raw_cmc.cumsum()
        hardest = np.where(raw_cmc == 1)[0].max()
        all_inp.append(cmc[hardest] / (hardest + 1.0))
        cmc[cmc > 1] = 1
        padded = np.ones(max_rank)
        padded[:min(max_rank, len(cmc))] = cmc[:max_rank]
        all_cmc.append(padded)
        precision = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0)
        all_ap.append((precision * raw_cmc).sum() / raw_cmc.sum())
    return float(np.mean(all_ap)), float(np.mean(all_inp)), np.mean(all_cmc, 0), len(all_ap)


def reference_re_ranking(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int, k2: int,
                         lam: float) -> np.ndarray:
    """Zhong et al.'s k-reciprocal re-ranking written out image by image, as published (and as
    torchreid / fast-reid ship it): [Q, G] re-ranked distances."""
    dist = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0)
    dist = np.power(dist, 2).astype(np.float32)
    dist = np.transpose(dist / np.max(dist, axis=0))
    n, nq = dist.shape[0], q_g.shape[0]
    rank = np.argsort(dist).astype(np.int32)

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return forward[np.where(rank[forward, :k + 1] == i)[0]]

    v = np.zeros_like(dist)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = r
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(rc, r)) > 2.0 / 3 * len(rc):
                expanded = np.append(expanded, rc)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros((nq, n), np.float32)
    for i in range(nq):
        shared = np.zeros(n, np.float32)
        for k in np.where(v[i] != 0)[0]:
            rows = np.where(v[:, k] != 0)[0]
            shared[rows] += np.minimum(v[i, k], v[rows, k])
        jaccard[i] = 1 - shared / (2 - shared)
    return (jaccard * (1 - lam) + dist[:nq] * lam)[:, nq:]

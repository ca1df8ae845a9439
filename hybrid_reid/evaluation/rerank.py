"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), with the numbers torchreid / fast-reid give.

The published code loops over every image twice in Python; here the k-reciprocal sets, their
expansion and the local query expansion are boolean / dense matrix operations over all N = Q + G
images, and only the Jaccard distance keeps a loop over queries (vectorised over each query's
non-zero columns, as the original's inverted index is).
"""
from __future__ import annotations

import numpy as np


def _reciprocal(initial_rank: np.ndarray, k: int) -> np.ndarray:
    """[N, N] bool: j is among i's k+1 nearest and i among j's (the k-reciprocal neighbours of i)."""
    n = initial_rank.shape[0]
    near = np.zeros((n, n), dtype=bool)
    near[np.arange(n)[:, None], initial_rank[:, :k + 1]] = True
    return near & near.T


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query x gallery distance [Q, G] (numpy), as torchreid's ``re_ranking``.

    Args:
        q_g_dist, q_q_dist, g_g_dist: [Q, G], [Q, Q], [G, G] distances.
        k1: size of the k-reciprocal neighbourhood (the candidate's own uses round(k1 / 2)).
        k2: local query expansion over the k2 nearest neighbours (1 = off).
        lambda_value: weight of the original distance against the Jaccard distance.
    """
    q_g_dist, q_q_dist, g_g_dist = (np.asarray(d, dtype=np.float32) for d in (q_g_dist, q_q_dist, g_g_dist))
    query_num = q_g_dist.shape[0]
    dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                           np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    dist = np.power(dist, 2).astype(np.float32)
    dist = np.transpose(1.0 * dist / np.max(dist, axis=0))
    initial_rank = np.argsort(dist).astype(np.int32)

    recip = _reciprocal(initial_rank, k1)                          # R(i, k1)
    half = _reciprocal(initial_rank, int(np.around(k1 / 2.0)))     # R(c, k1/2) of every candidate c
    half_size = half.sum(1)
    overlap = half.astype(np.float32) @ recip.T.astype(np.float32)  # [c, i] = |R(c, k1/2) & R(i, k1)|
    accept = recip & (overlap.T > 2.0 / 3.0 * half_size[None, :])  # [i, c]: candidate c expands i
    expanded = recip | (accept.astype(np.float32) @ half.astype(np.float32) > 0)
    v = np.where(expanded, np.exp(-dist), 0.0).astype(np.float32)
    v /= v.sum(1, keepdims=True)

    dist = dist[:query_num]
    if k2 != 1:  # local query expansion: average V over each image's k2 nearest
        v = np.stack([v[initial_rank[i, :k2]].mean(0) for i in range(v.shape[0])]).astype(np.float32)
    jaccard = np.zeros_like(dist, dtype=np.float32)
    for i in range(query_num):
        nz = np.nonzero(v[i])[0]
        temp_min = np.minimum(v[i, nz][None, :], v[:, nz]).sum(1)
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:query_num, query_num:]

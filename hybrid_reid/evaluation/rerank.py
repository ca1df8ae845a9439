"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), with the numbers torchreid / fast-reid give.

The published code loops over every image twice in Python. Here the k-reciprocal sets and their
expansion are sparse boolean matrices over all N = Q + G images (each row holds at most k1 + 1
neighbours, so the set intersections are sparse products), only the nearest ``max(k1, k2) + 1``
of each row are sorted (``argpartition``), and only the Jaccard distance keeps a loop over
queries (vectorised over each query's non-zero columns, as the original's inverted index is).
"""
from __future__ import annotations

import numpy as np
from scipy import sparse


def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
    """[N, k] indices of each row's k smallest values, in ascending order (the first k columns of a
    row-wise argsort)."""
    k = min(k, dist.shape[1])
    part = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < dist.shape[1] else np.argsort(dist, axis=1)
    order = np.argsort(np.take_along_axis(dist, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _reciprocal(initial_rank: np.ndarray, k: int) -> sparse.csr_matrix:
    """[N, N] sparse bool: j is among i's k+1 nearest and i among j's (the k-reciprocal neighbours of i)."""
    n = initial_rank.shape[0]
    cols = initial_rank[:, :k + 1]
    near = sparse.csr_matrix((np.ones(cols.size, dtype=bool), (np.repeat(np.arange(n), cols.shape[1]),
                                                               cols.ravel())), shape=(n, n))
    return near.multiply(near.T).tocsr()


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
    initial_rank = _nearest(dist, max(k1, k2) + 1)

    recip = _reciprocal(initial_rank, k1)                          # R(i, k1)
    half = _reciprocal(initial_rank, int(np.around(k1 / 2.0)))     # R(c, k1/2) of every candidate c
    half_size = np.asarray(half.sum(1)).ravel()
    # candidate c of R(i, k1) expands i when |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)|
    overlap = (recip.astype(np.float32) @ half.astype(np.float32).T).tocsr()  # [i, c]
    i_idx, c_idx = recip.nonzero()
    shared = np.asarray(overlap[i_idx, c_idx]).ravel()
    keep = shared > 2.0 / 3.0 * half_size[c_idx]
    accept = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (i_idx[keep], c_idx[keep])),
                               shape=recip.shape)
    expanded = (recip.astype(np.float32) + accept @ half.astype(np.float32)).tocoo()
    v = np.zeros_like(dist)
    v[expanded.row, expanded.col] = np.exp(-dist[expanded.row, expanded.col])
    v /= v.sum(1, keepdims=True)

    dist = dist[:query_num]
    if k2 != 1:  # local query expansion: average V over each image's k2 nearest
        near, v_qe = initial_rank[:, :k2], np.empty_like(v)
        for s in range(0, len(v), 256):  # in row blocks: [256, k2, N] at a time
            v_qe[s:s + 256] = v[near[s:s + 256]].mean(1)
        v = v_qe
    jaccard = np.zeros_like(dist, dtype=np.float32)
    for i in range(query_num):
        nz = np.nonzero(v[i])[0]
        temp_min = np.minimum(v[i, nz][None, :], v[:, nz]).sum(1)
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:query_num, query_num:]

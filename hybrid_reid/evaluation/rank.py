"""Ranking metrics (CMC, mAP, mINP) under the Market-1501 protocol, vectorised.

The protocol is torchreid's / fast-reid's ``eval_market1501``: for every query, gallery items with
the same pid **and** the same camera are removed; queries left without a true match are skipped;
CMC is a 0/1 curve per query (clipped at 1) averaged over queries; AP is the mean of the precision
at each hit; INP (fast-reid) is ``#positives / (rank of the hardest positive)``.

Instead of arg-sorting every query's whole gallery row (what the reference loops do, ~1 s for
1,000 x 15,000 on two cores) we only need the rank of each *true match*: that is its index among
the sorted matches plus the number of non-matching gallery items closer than it. So we sort the
distance *values* row-wise (numpy's SIMD sort, ~5x faster than an argsort) and binary-search the
few matches into them. Ties between a match and a non-match count against the match (a model that
maps every image to the same feature scores zero, not 100).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np(x: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype, copy=False) if dtype is not None else x


def _rank_of_matches(dist: np.ndarray, same_pid: np.ndarray, junk: np.ndarray):
    """0-based ranks (among the kept gallery items) of each query's true matches.

    Args:
        dist: [q, G] float32 distances.
        same_pid: [q, G] bool, gallery item has the query's pid.
        junk: [q, G] bool, gallery item removed for this query (same pid and same camera/scene).

    Returns:
        ranks [q, P] float64 (inf where j >= n_matches), n_matches [q].
    """
    match = same_pid & ~junk
    n_match = match.sum(1)
    p = int(n_match.max()) if len(n_match) else 0
    if p == 0:
        return np.full((dist.shape[0], 0), np.inf), n_match
    # each query's match distances, sorted, padded with +inf: [q, P]
    rows, cols = np.nonzero(match)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(n_match) - n_match, n_match)
    match_d = np.full((dist.shape[0], p), np.inf, dtype=np.float32)
    match_d[rows, slot] = dist[rows, cols]
    match_d.sort(axis=1)
    # every non-match, sorted by value (matches and junk pushed to +inf): [q, G]
    others = np.where(same_pid, np.float32(np.inf), dist)
    others.sort(axis=1)
    closer = torch.searchsorted(torch.from_numpy(others), torch.from_numpy(match_d), right=True).numpy()
    ranks = np.arange(p)[None, :] + closer.astype(np.float64)
    ranks[np.arange(p)[None, :] >= n_match[:, None]] = np.inf
    return ranks, n_match


def check_labels(num_q: int, num_g: int, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                 g_camids: ArrayLike, what: str = "distmat"):
    """The four label arrays as flat numpy arrays, their lengths checked against ``[num_q, num_g]``."""
    q_pids, g_pids = _np(q_pids).reshape(-1), _np(g_pids).reshape(-1)
    q_camids, g_camids = _np(q_camids).reshape(-1), _np(g_camids).reshape(-1)
    if (num_q, num_g) != (len(q_pids), len(g_pids)):
        raise ValueError(f"{what} gives [num_query, num_gallery] = [{num_q}, {num_g}] but the pid arrays "
                         f"have lengths [{len(q_pids)}, {len(g_pids)}]")
    if len(q_camids) != len(q_pids) or len(g_camids) != len(g_pids):
        raise ValueError("camid arrays must have the same lengths as the pid arrays")
    return q_pids, g_pids, q_camids, g_camids


class RankAccumulator:
    """CMC / mAP / mINP accumulated over query chunks of a distance matrix.

    ``add`` takes the distances of some queries to the *whole* gallery; memory is that chunk's
    (a few times ``chunk x gallery`` bytes), never ``query x gallery``. ``result`` gives the
    numbers :func:`evaluate_rank` reports.
    """

    def __init__(self, g_pids: np.ndarray, g_camids: np.ndarray, max_rank: int = 50):
        self.g_pids, self.g_camids = g_pids, g_camids
        if len(g_pids) < max_rank:
            logger.info("gallery has %d items, fewer than max_rank=%d; clamping max_rank", len(g_pids), max_rank)
            max_rank = len(g_pids)
        self.max_rank = max_rank
        self.aps: list = []
        self.inps: list = []
        self.first: list = []

    def add(self, dist: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray) -> None:
        if np.isnan(dist).any():
            raise ValueError("distmat contains NaN; the features are not finite")
        same_pid = q_pids[:, None] == self.g_pids[None, :]
        junk = same_pid & (q_camids[:, None] == self.g_camids[None, :])
        ranks, n_match = _rank_of_matches(dist, same_pid, junk)
        del same_pid, junk
        valid = n_match > 0
        ranks, n_match = ranks[valid], n_match[valid]
        if not len(n_match):
            return
        hits = np.arange(1, ranks.shape[1] + 1)[None, :]
        self.aps.append(np.where(np.isfinite(ranks), hits / (ranks + 1), 0.0).sum(1) / n_match)
        last = np.where(np.isfinite(ranks), ranks, -1).max(1)
        self.inps.append(n_match / (last + 1))
        self.first.append(ranks[:, 0])

    def result(self) -> Dict[str, object]:
        if not self.aps:
            raise ValueError("no query has a true match in the gallery (after removing same-pid same-camera "
                             "items); check the query/gallery split and the pid/camid parsing")
        first_rank = np.concatenate(self.first)
        cmc = (first_rank[:, None] <= np.arange(self.max_rank)[None, :]).mean(0)
        return {"mAP": float(np.concatenate(self.aps).mean()), "mINP": float(np.concatenate(self.inps).mean()),
                "cmc": cmc.astype(np.float64), "num_valid_queries": int(len(first_rank))}


def default_chunk(num_g: int) -> int:
    """Queries per chunk: about 16M distance entries (a few hundred MB of working memory)."""
    return max(1, (1 << 24) // max(1, num_g))


def evaluate_rank(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                  g_camids: ArrayLike, max_rank: int = 50, chunk_size: Optional[int] = None) -> Dict[str, object]:
    """CMC, mAP and mINP of a query x gallery distance matrix (Market-1501 protocol).

    Args:
        distmat: [Q, G] distances (smaller = more similar).
        q_pids, g_pids: [Q], [G] identity labels.
        q_camids, g_camids: [Q], [G] camera ids (or scene ids for MSVR310): a gallery item with the
            query's pid and camera is removed for that query.
        max_rank: length of the CMC curve (clamped to G).
        chunk_size: queries processed at once (default: about 16M distance entries per chunk).

    Returns:
        ``{"mAP": float, "mINP": float, "cmc": np.ndarray [max_rank], "num_valid_queries": int}``, all
        fractions in [0, 1].

    Raises:
        ValueError: on shape mismatches, or when no query has a match in the gallery.

    For features rather than a distance matrix, :func:`~hybrid_reid.evaluation.evaluate_features`
    gives the same numbers without ever holding the [Q, G] matrix.
    """
    dist = _np(distmat, np.float32)
    if dist.ndim != 2:
        raise ValueError(f"distmat has shape {tuple(dist.shape)}; expected [num_query, num_gallery]")
    q_pids, g_pids, q_camids, g_camids = check_labels(*dist.shape, q_pids, g_pids, q_camids, g_camids)
    acc = RankAccumulator(g_pids, g_camids, max_rank)
    chunk = chunk_size or default_chunk(dist.shape[1])
    for s in range(0, dist.shape[0], chunk):
        acc.add(dist[s:s + chunk], q_pids[s:s + chunk], q_camids[s:s + chunk])
    return acc.result()

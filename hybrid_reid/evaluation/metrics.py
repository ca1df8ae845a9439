"""Features -> distances -> the numbers a run reports (``metrics.json``)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .rank import RankAccumulator, check_labels, default_chunk, evaluate_rank
from .rerank import re_ranking


def compute_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean",
                     gallery_normalized: bool = False) -> torch.Tensor:
    """[Q, D], [G, D] -> [Q, G] distances between L2-normalised features.

    ``euclidean``: ``||q - g||`` (in [0, 2]); ``cosine``: ``1 - q.g``. On normalised features both
    rank the gallery identically. ``gallery_normalized`` skips normalising ``gf`` (already done).
    """
    qf = F.normalize(qf.float(), dim=1)
    gf = gf.float() if gallery_normalized else F.normalize(gf.float(), dim=1)
    sim = qf @ gf.t()
    if metric == "cosine":
        return 1 - sim
    if metric == "euclidean":
        return (2 - 2 * sim).clamp_min_(0).sqrt_()
    raise ValueError(f"eval.metric must be 'euclidean' or 'cosine', got {metric!r}")


def evaluate_features(qf: torch.Tensor, gf: torch.Tensor, q_pids, g_pids, q_camids, g_camids,
                      chunk_size: Optional[int] = None, metric: str = "euclidean",
                      max_rank: int = 50) -> Dict[str, object]:
    """:func:`evaluate_rank` of :func:`compute_distance` ``(qf, gf)``, one query chunk at a time.

    Distances and ranks are computed for ``chunk_size`` queries at once, so peak memory grows with
    ``chunk_size x gallery`` (default: about 16M entries, a few hundred MB), never with
    ``query x gallery``: an MSMT17-sized evaluation (11,659 x 82,161) would need 3.8 GB for the
    float32 matrix alone. The numbers are those of :func:`evaluate_rank` on the full matrix.

    Args:
        qf, gf: [Q, D], [G, D] features (any scale: they are L2-normalised here).
        q_pids, g_pids, q_camids, g_camids: labels as for :func:`evaluate_rank`.
        chunk_size: queries per chunk.
        metric: ``euclidean`` or ``cosine`` (see :func:`compute_distance`).
        max_rank: length of the CMC curve.

    Returns:
        ``{"mAP", "mINP", "cmc", "num_valid_queries"}`` as :func:`evaluate_rank` (fractions).
    """
    qf, gf = torch.as_tensor(qf), torch.as_tensor(gf)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be [Q, D] and [G, D] with the same D; got {tuple(qf.shape)} and "
                         f"{tuple(gf.shape)}")
    q_pids, g_pids, q_camids, g_camids = check_labels(qf.shape[0], gf.shape[0], q_pids, g_pids, q_camids,
                                                      g_camids, what="the features")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    gf = F.normalize(gf.float(), dim=1)
    acc = RankAccumulator(g_pids, g_camids, max_rank)
    chunk = chunk_size or default_chunk(gf.shape[0])
    with torch.no_grad():
        for s in range(0, qf.shape[0], chunk):
            dist = compute_distance(qf[s:s + chunk], gf, metric, gallery_normalized=True)
            acc.add(dist.numpy(), q_pids[s:s + chunk], q_camids[s:s + chunk])
            del dist
    return acc.result()


def query_expansion(qf: torch.Tensor, gf: torch.Tensor, k: int = 5, alpha: float = 3.0,
                    times: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """alpha-weighted average query expansion (alpha-QE, Radenovic et al.), as fast-reid's ``aqe``.

    Every feature (query and gallery alike) is replaced by the mean of its ``k`` nearest features
    (itself included) in ``query + gallery``, each weighted by ``similarity ** alpha`` (cosine of
    L2-normalised features), ``times`` times. Returns the expanded (not normalised) ``qf``, ``gf``.
    Negative similarities get weight 0 (fast-reid's ``np.power`` gives negative or NaN weights there).
    """
    nq = qf.shape[0]
    feats = torch.cat([qf, gf]).float()
    k = min(k, feats.shape[0])
    chunk = max(1, (1 << 24) // max(1, feats.shape[0]))  # rows of the [N, N] similarity at once
    for _ in range(times):
        normed = F.normalize(feats, dim=1)
        expanded = torch.empty_like(feats)
        for s in range(0, feats.shape[0], chunk):
            top, idx = (normed[s:s + chunk] @ normed.t()).topk(k, dim=1)
            weights = top.clamp_min(0).pow(alpha).unsqueeze(-1)  # [n, k, 1]
            expanded[s:s + chunk] = (feats[idx] * weights).mean(1)
        feats = expanded
    return feats[:nq], feats[nq:]


def rank_metrics(qf: torch.Tensor, gf: torch.Tensor, q_pids, g_pids, q_camids, g_camids,
                 metric: str = "euclidean", max_rank: int = 50,
                 rerank: Optional[Tuple[int, int, float]] = None,
                 aqe: Optional[Tuple[int, float]] = None, chunk_size: Optional[int] = None) -> Dict[str, object]:
    """Percent metrics: ``{"mAP", "rank1", "rank5", "rank10", "mINP", "cmc": [max_rank]}``.

    ``aqe`` = ``(k, alpha)`` applies query expansion (:func:`query_expansion`) to the features and
    ``rerank`` = ``(k1, k2, lambda)`` k-reciprocal re-ranking (:func:`re_ranking`) to the distances,
    in that order (as fast-reid does). Without re-ranking, ranking goes through
    :func:`evaluate_features` in chunks of ``chunk_size`` queries (bounded memory); re-ranking needs
    the full matrices.
    """
    if aqe is not None:
        if qf is gf:
            qf = gf = query_expansion(qf, gf[:0], *aqe)[0]
        else:
            qf, gf = query_expansion(qf, gf, *aqe)
    if rerank is None:
        r = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, chunk_size=chunk_size, metric=metric,
                              max_rank=max_rank)
    else:  # re-ranking needs the whole query x gallery (and gallery x gallery) matrix
        k1, k2, lam = rerank
        dist = re_ranking(compute_distance(qf, gf, metric).numpy(), compute_distance(qf, qf, metric).numpy(),
                          compute_distance(gf, gf, metric).numpy(), k1=k1, k2=k2, lambda_value=lam)
        r = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, chunk_size=chunk_size)
    cmc = r["cmc"]
    at = lambda k: 100.0 * float(cmc[min(k, len(cmc)) - 1])  # noqa: E731
    return {"mAP": 100.0 * r["mAP"], "rank1": at(1), "rank5": at(5), "rank10": at(10), "mINP": 100.0 * r["mINP"],
            "num_valid_queries": r["num_valid_queries"], "cmc": [100.0 * float(c) for c in cmc]}

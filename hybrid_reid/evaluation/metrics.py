"""Features -> distances -> the numbers a run reports (``metrics.json``)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .rank import evaluate_rank
from .rerank import re_ranking


def compute_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """[Q, D], [G, D] -> [Q, G] distances between L2-normalised features.

    ``euclidean``: ``||q - g||`` (in [0, 2]); ``cosine``: ``1 - q.g``. On normalised features both
    rank the gallery identically.
    """
    qf, gf = F.normalize(qf.float(), dim=1), F.normalize(gf.float(), dim=1)
    sim = qf @ gf.t()
    if metric == "cosine":
        return 1 - sim
    if metric == "euclidean":
        return (2 - 2 * sim).clamp_min_(0).sqrt_()
    raise ValueError(f"eval.metric must be 'euclidean' or 'cosine', got {metric!r}")


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
    for _ in range(times):
        normed = F.normalize(feats, dim=1)
        sims = normed @ normed.t()
        top, idx = sims.topk(min(k, feats.shape[0]), dim=1)
        weights = top.clamp_min(0).pow(alpha).unsqueeze(-1)  # [N, k, 1]
        feats = (feats[idx] * weights).mean(1)
    return feats[:nq], feats[nq:]


def rank_metrics(qf: torch.Tensor, gf: torch.Tensor, q_pids, g_pids, q_camids, g_camids,
                 metric: str = "euclidean", max_rank: int = 50,
                 rerank: Optional[Tuple[int, int, float]] = None,
                 aqe: Optional[Tuple[int, float]] = None) -> Dict[str, object]:
    """Percent metrics: ``{"mAP", "rank1", "rank5", "rank10", "mINP", "cmc": [max_rank]}``.

    ``aqe`` = ``(k, alpha)`` applies query expansion (:func:`query_expansion`) to the features and
    ``rerank`` = ``(k1, k2, lambda)`` k-reciprocal re-ranking (:func:`re_ranking`) to the distances,
    in that order (as fast-reid does).
    """
    if aqe is not None:
        if qf is gf:
            qf = gf = query_expansion(qf, gf[:0], *aqe)[0]
        else:
            qf, gf = query_expansion(qf, gf, *aqe)
    dist = compute_distance(qf, gf, metric)
    if rerank is not None:
        k1, k2, lam = rerank
        dist = re_ranking(dist.numpy(), compute_distance(qf, qf, metric).numpy(),
                          compute_distance(gf, gf, metric).numpy(), k1=k1, k2=k2, lambda_value=lam)
    r = evaluate_rank(dist, np.asarray(q_pids), np.asarray(g_pids),
                      np.asarray(q_camids), np.asarray(g_camids), max_rank=max_rank)
    cmc = r["cmc"]
    at = lambda k: 100.0 * float(cmc[min(k, len(cmc)) - 1])  # noqa: E731
    return {"mAP": 100.0 * r["mAP"], "rank1": at(1), "rank5": at(5), "rank10": at(10), "mINP": 100.0 * r["mINP"],
            "num_valid_queries": r["num_valid_queries"], "cmc": [100.0 * float(c) for c in cmc]}

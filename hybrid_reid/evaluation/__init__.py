"""Evaluation: distances between L2-normalised features, k-reciprocal re-ranking, ranking metrics."""
from .metrics import compute_distance, rank_metrics
from .rank import evaluate_rank
from .rerank import re_ranking

__all__ = ["compute_distance", "evaluate_rank", "rank_metrics", "re_ranking"]

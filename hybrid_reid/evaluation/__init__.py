"""Evaluation: distances between L2-normalised features, k-reciprocal re-ranking, ranking metrics."""
from .metrics import compute_distance, evaluate_features, query_expansion, rank_metrics
from .rank import evaluate_rank
from .rerank import re_ranking

__all__ = ["compute_distance", "evaluate_features", "evaluate_rank", "query_expansion", "rank_metrics", "re_ranking"]

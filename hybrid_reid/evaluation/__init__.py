"""Evaluation: distances between L2-normalised features and ranking metrics (CMC, mAP, mINP)."""
from .metrics import compute_distance, rank_metrics
from .rank import evaluate_rank

__all__ = ["compute_distance", "evaluate_rank", "rank_metrics"]

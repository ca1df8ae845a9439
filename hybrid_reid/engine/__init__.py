"""Engine: the Accelerate training function and evaluation."""
from .train import build_optimizer, build_scheduler, evaluate, evaluate_model, extract_features, train

__all__ = ["build_optimizer", "build_scheduler", "evaluate", "evaluate_model", "extract_features", "train"]

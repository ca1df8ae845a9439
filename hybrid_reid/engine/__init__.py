"""Training and evaluation (HF Accelerate)."""
from .evaluator import Evaluator, extract_features, load_features, save_features
from .train import build_optimizer, build_scheduler, evaluate, train

__all__ = ["Evaluator", "build_optimizer", "build_scheduler", "evaluate", "extract_features", "load_features",
           "save_features", "train"]

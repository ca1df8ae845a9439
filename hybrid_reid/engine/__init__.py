"""Training and evaluation (HF Accelerate)."""
from .evaluator import Evaluator, extract_features, load_features, save_features
from .state import OutputDirNotEmptyError, RunLockedError, verify_checkpoint
from .train import TrainingDiverged, build_optimizer, build_scheduler, evaluate, train

__all__ = ["Evaluator", "OutputDirNotEmptyError", "RunLockedError", "TrainingDiverged", "build_optimizer",
           "build_scheduler", "evaluate", "extract_features", "load_features", "save_features", "train",
           "verify_checkpoint"]

"""hybrid_reid: multi-modal re-identification with CLIP and ViT towers behind one adapter."""
from .config import Config, ConfigError, load_config
from .extractor import FeatureExtractor
from .models import BackboneOutput, ReIDModel, build_model, create_backbone

__version__ = "0.1.0"

__all__ = ["BackboneOutput", "Config", "ConfigError", "FeatureExtractor", "ReIDModel", "build_model",
           "create_backbone", "load_config", "__version__"]

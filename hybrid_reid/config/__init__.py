"""Typed configuration (dataclasses from YAML, ``_base_`` inheritance, dotted overrides)."""
from .core import ConfigError, deep_merge, from_dict, load_yaml, parse_overrides, to_dict
from .schema import (
                     Config,
                     DataConfig,
                     EvalConfig,
                     ModelConfig,
                     MultiScaleConfig,
                     OptimConfig,
                     TowerConfig,
                     TrainConfig,
                     load_config,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "MultiScaleConfig", "OptimConfig",
    "TowerConfig", "TrainConfig",
    "deep_merge", "from_dict", "load_config", "load_yaml", "parse_overrides", "to_dict",
]

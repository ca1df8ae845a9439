"""The config schema: one dataclass per YAML section. Defaults are the design's numbers."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from .core import deep_merge, from_dict, load_yaml, parse_overrides


@dataclass
class TowerConfig:
    """One image tower (``model.clip`` or ``model.vit``).

    Attributes:
        arch: open_clip model name (``ViT-B-16-quickgelu``) or timm ViT name (``vit_base_patch16_224``).
        pretrained: local checkpoint path, or null for random init. Never downloaded.
        stride: patch stride; null = patch size (no overlap); 12 gives the 21x10 grid at 256x128.
        sie_coef: scale of the camera/view embedding.
        sie_mode: ``all`` adds it to every token (TransReID), ``cls`` to the CLS token only (CLIP-ReID).
        drop_path: stochastic depth rate of the tower.
        tower_kwargs: architecture overrides (``width``, ``layers``, ``heads``, ``mlp_ratio``,
            ``out_dim``), used for tiny test towers.
    """

    arch: str = "ViT-B-16-quickgelu"
    pretrained: Optional[str] = None
    stride: Optional[int] = None
    sie_coef: float = 1.0
    sie_mode: Literal["all", "cls"] = "all"
    drop_path: float = 0.0
    tower_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MultiScaleConfig:
    """Multi-scale sliding-window extractor added to each tower's CLS token."""

    enabled: bool = False
    window_sizes: List[int] = field(default_factory=lambda: [4, 8, 16])
    stride_ratio: float = 0.5
    hidden_ratio: float = 0.25


def _clip_default() -> TowerConfig:
    return TowerConfig(arch="ViT-B-16-quickgelu", sie_coef=1.0, sie_mode="cls")


def _vit_default() -> TowerConfig:
    return TowerConfig(arch="vit_base_patch16_224", stride=12, sie_coef=3.0, sie_mode="all")


@dataclass
class ModelConfig:
    """The image encoder: towers -> multi-scale -> projectors -> tower fusion -> BNNeck head.

    Attributes:
        backbone: ``clip``, ``vit`` or ``hybrid`` (both towers on the same image, fused).
        fusion: registered tower fusion used by ``hybrid`` (``concat``, ``sum``, ``gated``, ``cross_attn``).
        fusion_kwargs: extra constructor arguments of the fusion (e.g. ``heads`` for cross_attn).
        feat_dim: the shared feature space F every tower is projected into.
        reuse_clip_proj: use CLIP's own 512-d projection as its projector when ``feat_dim`` matches.
        img_size: network input (height, width).
        num_cams, num_views: rows of the camera/view embedding (0 = off).
        num_classes: identities of the ID classifier (0 = no classifier).
    """

    backbone: Literal["clip", "vit", "hybrid"] = "clip"
    fusion: str = "concat"
    fusion_kwargs: Dict[str, Any] = field(default_factory=dict)
    feat_dim: int = 512
    reuse_clip_proj: bool = True
    img_size: Tuple[int, int] = (256, 128)
    num_cams: int = 0
    num_views: int = 0
    num_classes: int = 0
    clip: TowerConfig = field(default_factory=_clip_default)
    vit: TowerConfig = field(default_factory=_vit_default)
    multi_scale: MultiScaleConfig = field(default_factory=MultiScaleConfig)

    def __post_init__(self) -> None:
        if self.feat_dim <= 0:
            raise ValueError(f"model.feat_dim must be positive, got {self.feat_dim}")
        if min(self.img_size) <= 0:
            raise ValueError(f"model.img_size must be positive, got {self.img_size}")
        if self.num_cams < 0 or self.num_views < 0:
            raise ValueError("model.num_cams / model.num_views must be >= 0")

    @property
    def towers(self) -> List[str]:
        """Names of the towers this backbone setting runs, in a fixed order."""
        return ["clip", "vit"] if self.backbone == "hybrid" else [self.backbone]


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    output_dir: str = "outputs/run"


def load_config(path: Optional[Union[str, os.PathLike]] = None,
                overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``_base_`` chain), apply dotted ``overrides`` and validate.

    Example:
        >>> cfg = load_config("configs/hybrid.yaml", ["model.fusion=gated"])
    """
    data = load_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides))
    return from_dict(Config, data)

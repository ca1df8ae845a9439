"""Models: the backbone adapter, multi-scale extractor, tower fusions and the ReID model."""
from .backbone import (
    TOWERS,
    Backbone,
    BackboneOutput,
    CameraViewEmbedding,
    ModalityTowers,
    StridedPatchEmbed,
    create_backbone,
    create_tower,
)
from .checkpoint import CheckpointError, load_model_weights, read_state_dict
from .decoupled import DecoupledFusion
from .demo import DeMoFusion
from .families import FAMILIES, TowerFamily
from .fusion import FUSIONS, MODALITY_FUSIONS, FusionOutput, ModalityFusion, TowerFusion, TowerInfo
from .idea import CooperativeDeformableAggregation, InvertedText
from .mamba import MambaFusion, selective_scan
from .model import EncoderOutput, ReIDEncoder, ReIDHead, ReIDModel, ReIDOutput, build_model, parameter_summary
from .multi_scale import MultiScaleExtractor
from .prompts import TowerPrompts
from .shared_token import SharedToken
from .topreid import TokenPermutationFusion

__all__ = [
    "TOWERS", "FAMILIES", "FUSIONS", "MODALITY_FUSIONS", "ModalityFusion", "TowerFamily", "load_model_weights",
    "CooperativeDeformableAggregation", "DecoupledFusion", "DeMoFusion", "InvertedText", "FusionOutput",
    "MambaFusion", "SharedToken", "TowerInfo", "TowerPrompts",
    "selective_scan", "Backbone", "BackboneOutput", "CameraViewEmbedding", "CheckpointError", "ModalityTowers",
    "TokenPermutationFusion",
    "EncoderOutput", "MultiScaleExtractor", "ReIDEncoder", "ReIDHead", "ReIDModel", "ReIDOutput",
    "StridedPatchEmbed", "TowerFusion", "build_model", "create_backbone", "create_tower", "parameter_summary",
    "read_state_dict",
]

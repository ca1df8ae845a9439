"""Published methods' checkpoint layouts: a model trained with the authors' code, in this project.

Each method file registers a :class:`Layout` in :data:`LAYOUTS`: how to recognise the authors'
``state_dict`` and how to rename it into this project's model (``run.py convert-weights --from
<method>``, and ``run.py eval --checkpoint THEIRS.pth``, which detects the layout by itself). The
method's math lives with the models (``hybrid_reid/models``); its recipe in
``configs/methods/<method>.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..models.checkpoint import _openai_to_timm
from ..registry import Registry

StateDict = Dict[str, torch.Tensor]


@dataclass
class Converted:
    """A peer's state dict in this project's keys.

    Attributes:
        state: the model's keys -> tensors.
        unused: the peer's keys that this model has no place for (listed in one log line).
        notes: what was done beyond renaming, for the log.
    """

    state: StateDict
    unused: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class Layout:
    """A peer's checkpoint layout: ``detect(sd)`` says whether a state dict is one; ``convert(sd)``
    renames it into this project's model keys."""

    name: str
    detect: Callable[[StateDict], bool]
    convert: Callable[[StateDict], Converted]
    description: str = ""


LAYOUTS: Registry[Layout] = Registry("checkpoint layout")


def without_module_prefix(sd: StateDict) -> StateDict:
    """The state dict of a model saved from inside ``DataParallel`` / DDP (``module.`` keys) as a plain one."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def backbone_base_tower(sd: StateDict, unused: List[str], drop: Sequence[str] = ("fc.",)
                        ) -> Tuple[str, str, StateDict, Dict[str, object]]:
    """The tower of the TransReID-family layout (MambaPro, DeMo): ``BACKBONE.base.*`` holds OpenAI CLIP's
    ``visual`` keys (renamed through timm's converter; CLIP's projection is ours ``proj``, its camera table
    ``BACKBONE.cv_embed``) or their TransReID ViT's (camera table ``BACKBONE.base.sie_embed``).

    Args:
        sd: their state dict (no ``module.`` prefix).
        unused: receives the ViT's keys starting with one of ``drop`` (``fc.``: its unused ImageNet head).

    Returns:
        ``(tower, prefix, tower_sd, out)``: ``clip`` or ``vit``; ``encoder.backbones.<tower>.``; the tower's
        remaining keys in timm's names (still to be placed, e.g. under ``tower.``); and the keys already
        placed (projection, camera table ``[C*V, D]``).
    """
    base = {k[len("BACKBONE.base."):]: v for k, v in sd.items() if k.startswith("BACKBONE.base.")}
    out: Dict[str, object] = {}
    if "class_embedding" in base:  # CLIP ("ViT-B-16"): OpenAI keys, through timm's public converter
        tower = "clip"
        tower_sd = _openai_to_timm({f"visual.{k}": v for k, v in base.items()}, None)
        prefix = f"encoder.backbones.{tower}."
        out[f"{prefix}proj.weight"] = tower_sd.pop("head.weight")
        if "BACKBONE.cv_embed" in sd:  # MambaPro's [C*V, D]; DeMo's [C, 1, D]
            out[f"{prefix}sie.table"] = sd["BACKBONE.cv_embed"].flatten(1)
    else:  # their TransReID ViT ("vit_base_patch16_224")
        tower = "vit"
        tower_sd = dict(base)
        prefix = f"encoder.backbones.{tower}."
        if "sie_embed" in tower_sd:
            out[f"{prefix}sie.table"] = tower_sd.pop("sie_embed").flatten(1)
        for k in [k for k in tower_sd if k.startswith(tuple(drop))]:
            tower_sd.pop(k)
            unused.append(f"BACKBONE.base.{k}")
    return tower, prefix, tower_sd, out


def detect_layout(sd: StateDict):
    """The registered :class:`Layout` a state dict is in, or None (this project's own)."""
    for name in LAYOUTS.names():
        layout = LAYOUTS.get(name)
        if layout.detect(sd):
            return layout
    return None


from . import demo, idea, mambapro, mdreid, topreid  # noqa: E402,F401  (each registers its layout)

__all__ = ["LAYOUTS", "Converted", "Layout", "detect_layout"]

"""Published methods' checkpoint layouts: a model trained with the authors' code, in this project.

Each method file registers a :class:`Layout` in :data:`LAYOUTS`: how to recognise the authors'
``state_dict`` and how to rename it into this project's model (``run.py convert-weights --from
<method>``, and ``run.py eval --checkpoint THEIRS.pth``, which detects the layout by itself). The
method's math lives with the models (``hybrid_reid/models``); its recipe in
``configs/methods/<method>.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

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


def detect_layout(sd: StateDict):
    """The registered :class:`Layout` a state dict is in, or None (this project's own)."""
    for name in LAYOUTS.names():
        layout = LAYOUTS.get(name)
        if layout.detect(sd):
            return layout
    return None


from . import demo, idea, mambapro, mdreid, topreid  # noqa: E402,F401  (each registers its layout)

__all__ = ["LAYOUTS", "Converted", "Layout", "detect_layout"]

"""MDReID's modality-shared token: a second leading token in a tower, beside its class token.

Re-implemented from the MDReID paper (NeurIPS 2025) and its public code (github stone96123/MDReID,
the ``add_image_token`` of their CLIP ``VisionTransformer`` and TransReID ``Trans``); the tests hold
a tower with this part equal to theirs (``tests/fixtures/mdreid``). The tower's tokens become

    [cls, shared, patch_0 .. patch_{N-1}] + pos_embed        pos_embed [1, 2 + N, D]

* ``cls`` (token 0) stays the tower's global token: in MDReID the modality-**specific** token;
  ``shared`` (token 1) is the modality-**shared** token. What makes them differ is only what the
  method trains on each (:mod:`hybrid_reid.models.decoupled`, :mod:`hybrid_reid.losses.decoupling`).
* The positional table gains one row for the shared token, a copy of the class token's row (their
  ``[cls_row, cls_row, grid]``); it moves from the tower into this part (``pos_embed``), so it trains
  at the part's learning rate, as theirs trains at the base rate while the tower trains slower.
* ``tie=True`` (theirs): the shared token *is* the class token (one parameter; their code assigns
  the class embedding to the shared token after loading). ``tie=False``: its own parameter, starting
  as a copy of the class token.
* The camera embedding (the backbone's hook on ``pos_drop``) reaches it like any token:
  ``sie_mode: all`` adds it to both leading tokens (their ImageNet ViT), ``cls`` to token 0 only
  (their CLIP).

It needs a timm ``VisionTransformer`` with a class token, no register or distillation tokens and a
positional table that covers the class token (ViT, DeiT, CLIP towers); EVA's rotary blocks,
DINOv2 with registers and towers without a class token (SigLIP) are refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def check_tower(tower: nn.Module, arch: str = "") -> None:
    """Raise a ValueError naming what keeps ``tower`` from taking a shared token."""
    name = arch or type(tower).__name__
    if getattr(tower, "cls_token", None) is None:
        raise ValueError(f"MDReID's shared token sits beside the class token, and {name} has none; use a tower "
                         "with a class token (ViT, DeiT, CLIP)")
    if getattr(tower, "num_prefix_tokens", 1) != 1 or getattr(tower, "reg_token", None) is not None:
        raise ValueError(f"{name} has register or distillation tokens besides its class token; MDReID's shared token "
                         "needs a tower whose only leading token is the class token (ViT, CLIP, plain DeiT)")
    if getattr(tower, "pos_embed", None) is None or getattr(tower, "no_embed_class", False) \
            or getattr(tower, "dynamic_img_size", False):
        raise ValueError(f"{name}'s positional table does not cover its class token at a fixed grid; MDReID's "
                         "shared token needs one (ViT, DeiT, CLIP)")


class SharedToken(nn.Module):
    """The shared token and the extended positional table of one tower (see the module docstring).

    Args:
        tower: the timm tower, its pretrained weights already loaded; its ``pos_embed`` [1, 1 + N, D]
            is taken over (the tower's attribute is set to None).
        tie: the shared token is the class token (MDReID's code) instead of a parameter of its own.
        arch: the tower's name, for error messages.
    """

    def __init__(self, tower: nn.Module, tie: bool = True, arch: str = "") -> None:
        super().__init__()
        check_tower(tower, arch)
        pos = tower.pos_embed.detach()
        self.pos_embed = nn.Parameter(torch.cat([pos[:, :1], pos], dim=1).clone())  # [1, 2 + N, D]
        self.token: Optional[nn.Parameter] = None if tie else nn.Parameter(tower.cls_token.detach().clone())
        tower.pos_embed = None  # the table lives here now; the tower's own forward_features is not used

    @property
    def tied(self) -> bool:
        return self.token is None

    def forward(self, tower: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """patches [B, N, D] (the tower's patch embedding) -> [B, 2 + N, D] through the tower's ``pos_drop``
        (where the camera embedding is added)."""
        b = patches.shape[0]
        cls = tower.cls_token.expand(b, -1, -1)
        shared = (tower.cls_token if self.token is None else self.token).expand(b, -1, -1)
        x = torch.cat([cls, shared, patches], dim=1) + self.pos_embed
        return tower.pos_drop(x)

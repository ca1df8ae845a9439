"""SDM (semantic disentanglement module, seed 003): modality features -> a shared semantic space.

The features of the modalities present for a sample attend to each other (multi-head attention,
residual, LayerNorm) and each is projected into the semantic space (Linear -> LayerNorm -> ReLU ->
Linear). The RGB-anchored alignment loss (``loss.sdm``) pulls every other modality there towards the
RGB one of the same identity.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class SemanticDisentanglement(nn.Module):
    """``{modality: [B, F]} -> {modality: [B, S]}``.

    Args:
        dim: F, the shared feature width.
        semantic_dim: S (seed: 512).
        heads: attention heads (seed: 8); must divide ``dim``.
    """

    def __init__(self, dim: int, semantic_dim: int = 512, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.sdm.heads={heads} must divide model.feat_dim={dim}")
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(dim, semantic_dim), nn.LayerNorm(semantic_dim), nn.ReLU(inplace=True),
                                  nn.Linear(semantic_dim, semantic_dim))

    def forward(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        names = list(feats)
        x = torch.stack([feats[m] for m in names], dim=1)  # [B, M, F]
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        s = self.proj(h)  # [B, M, S]
        return {m: s[:, i] for i, m in enumerate(names)}

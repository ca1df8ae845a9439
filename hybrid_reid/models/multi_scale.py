"""Multi-scale sliding-window extractor (seed 000), made to work on any tower, width and grid.

The seed used one ``Conv2d(768, 768, k, stride=k)`` per window size: ~151 M parameters for k=16
(more than the ViT itself), hard-wired to 768 and unable to fit a 16-patch window on an 8- or
10-wide grid. Here windows are parameter-free average pools, clamped to the grid, and all scales
share one light projection:

    grid tokens [B,D,h,w] --avg-pool k x k (stride k*stride_ratio), k clamped to (h,w)--> windows
    windows + scale embedding -> LayerNorm -> attention pooling over windows -> one [B,D] per scale
    -> shared bottleneck MLP (D -> D*hidden_ratio -> D) -> mean over scales -> [B,D] (added to CLS)

For ViT-B/16 (D=768) that is ~0.3 M parameters, 0.35 % of the tower. The MLP's output layer starts
at zero (like LoRA's B), so an untrained extractor leaves the pretrained CLS unchanged.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def window_shapes(grid: Tuple[int, int], window_sizes: Sequence[int],
                  stride_ratio: float) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Per window size: ((kh, kw), (sh, sw)), the window clamped to the grid and its stride."""
    h, w = grid
    out = []
    for k in window_sizes:
        kh, kw = min(k, h), min(k, w)
        out.append(((kh, kw), (max(1, round(kh * stride_ratio)), max(1, round(kw * stride_ratio)))))
    return out


class MultiScaleExtractor(nn.Module):
    """Pools the patch grid at several window sizes into one [B, D] vector.

    Args:
        dim: token width D (any).
        window_sizes: window side lengths in patches (clamped to the grid at run time).
        stride_ratio: window stride as a fraction of the window (0.5 = half-overlapping, 1.0 = tiled).
        hidden_ratio: bottleneck width of the shared projection, as a fraction of ``dim``.
    """

    def __init__(self, dim: int, window_sizes: Sequence[int] = (4, 8, 16), stride_ratio: float = 0.5,
                 hidden_ratio: float = 0.25) -> None:
        super().__init__()
        if not window_sizes or min(window_sizes) < 1:
            raise ValueError(f"window_sizes must be positive integers, got {list(window_sizes)}")
        if not 0.0 < stride_ratio <= 1.0:
            raise ValueError(f"stride_ratio must be in (0, 1], got {stride_ratio}")
        self.window_sizes = [int(k) for k in window_sizes]
        self.stride_ratio = float(stride_ratio)
        hidden = max(1, int(round(dim * hidden_ratio)))
        self.scale_embed = nn.Parameter(torch.zeros(len(self.window_sizes), dim))
        nn.init.trunc_normal_(self.scale_embed, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, patches: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """patches [B, N, D] row-major over ``grid`` (h, w), N = h*w -> [B, D]."""
        b, n, d = patches.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"multi-scale: {n} patch tokens do not form the grid {h}x{w}")
        x = patches.transpose(1, 2).reshape(b, d, h, w)
        per_scale = []
        for i, (kernel, stride) in enumerate(window_shapes(grid, self.window_sizes, self.stride_ratio)):
            win = F.avg_pool2d(x, kernel, stride).flatten(2).transpose(1, 2)  # [B, M, D]
            win = self.norm(win + self.scale_embed[i])
            attn = self.score(win).softmax(dim=1)  # [B, M, 1]
            per_scale.append((attn * win).sum(dim=1))
        return self.mlp(torch.stack(per_scale, dim=1)).mean(dim=1)

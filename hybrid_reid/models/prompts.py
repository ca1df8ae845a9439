"""MambaPro's modality-routed parts inside a tower: prompts with residual transfer, parallel adapters.

Re-implemented from the MambaPro paper and its public code (github 924973292/MambaPro, the CLIP
``ResidualAttentionBlock.forward_with_prompt_adapter``); the tests hold a tower with these parts
equal to the authors' (``tests/fixtures/mambapro``). In block i, for an input of modality m, with
the modalities in their fixed order:

* **Synergistic residual prompts** (``model.prompts``): every modality o has ``k`` prompt tokens
  ``P_i,o`` [k, D]. The block's input is the image tokens followed by one slot of k tokens per
  modality: the input's own slot is ``P_i,m`` in block 0 and ``prev + T_i(prev) + P_i,m`` after
  (``prev``: the mean of the previous block's slot outputs; ``T_i`` the block's transfer adapter);
  every other slot is ``P_i,o + A_i,o(P_i,o)`` (the cross-modal adapter of the source modality o).
  Attention runs over image and prompt tokens together; the prompt tokens are removed after the
  block and the mean of the slots' outputs is passed on as ``prev``.
* **Parallel feed-forward adapters** (``model.adapters``): ``z = z + MLP(norm2(z)) + FFN_i(z)``, the
  adapter reading the residual stream after attention (not normalised).

Adapters: ``Linear(D, D/2) -> QuickGELU -> Dropout(0) -> Linear(D/2, D)`` (prompt adapters) and
``Linear(D, 2D) -> QuickGELU -> Linear(2D, D)`` (parallel), weights trunc-normal(0.02), biases 0;
prompts start at 0. The modality is an argument of the forward (no state is kept on a module), so
every modality's parts train in every step of a mixed batch.

They need a tower whose blocks are timm ``Block``s (``norm1, attn, ls1, drop_path1, norm2, mlp,
ls2, drop_path2``): the ViT family and DeiT (CLIP towers included); EVA's rotary attention cannot
take extra tokens and is refused.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (CLIP's, and MambaPro's adapters')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _bottleneck(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), QuickGELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))


def _parallel(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim))


class TowerPrompts(nn.Module):
    """Prompts and/or parallel adapters on every block of a timm tower (see the module docstring).

    Args:
        num_blocks: blocks of the tower. dim: its width D.
        modalities: the image modalities with prompts, in slot order.
        length: prompt tokens per modality and block (MambaPro: 4); 0 = no prompts.
        adapter_ratio: hidden width of the parallel adapters / D (MambaPro: 2); 0 = no adapters.
    """

    def __init__(self, num_blocks: int, dim: int, modalities: Sequence[str], length: int = 4,
                 adapter_ratio: float = 2.0) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.length = length
        self.prompts: Optional[nn.ModuleList] = None
        if length > 0:
            self.prompts = nn.ModuleList(nn.ParameterDict({m: nn.Parameter(torch.zeros(length, dim))
                                                           for m in self.modalities}) for _ in range(num_blocks))
            self.cross = nn.ModuleList(nn.ModuleDict({m: _bottleneck(dim, dim // 2) for m in self.modalities})
                                       for _ in range(num_blocks))
            self.transfer = nn.ModuleList(_bottleneck(dim, dim // 2) for _ in range(num_blocks))
        self.adapters = nn.ModuleList(_parallel(dim, int(dim * adapter_ratio)) for _ in range(num_blocks)) \
            if adapter_ratio > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _slots(self, i: int, modality: str, prev: Optional[torch.Tensor], batch: int) -> List[torch.Tensor]:
        slots = []
        for o in self.modalities:
            p = self.prompts[i][o].unsqueeze(0).expand(batch, -1, -1)
            if o == modality:
                slots.append(p if prev is None else prev + self.transfer[i](prev) + p)
            else:
                slots.append(p + self.cross[i][o](p))
        return slots

    def forward(self, blocks: Sequence[nn.Module], x: torch.Tensor, modality: Optional[str]) -> torch.Tensor:
        """Run ``blocks`` on tokens x [B, T, D] with this modality's parts -> [B, T, D]."""
        if self.prompts is not None and modality not in self.modalities:
            raise ValueError(f"no prompts for modality {modality!r}; the tower has them for {self.modalities}")
        b, t, _ = x.shape
        prev = None
        for i, blk in enumerate(blocks):
            z = x
            if self.prompts is not None:
                z = torch.cat([x, *self._slots(i, modality, prev, b)], dim=1)
            z = z + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(z))))
            mlp = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(z))))
            z = z + mlp + self.adapters[i](z) if self.adapters is not None else z + mlp
            if self.prompts is not None:
                k = self.length
                prev = torch.stack([z[:, t + j * k:t + (j + 1) * k] for j in range(len(self.modalities))]).mean(0)
            x = z[:, :t]
        return x

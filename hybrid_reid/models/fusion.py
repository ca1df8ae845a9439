"""Tower fusions for the hybrid backbone: combine per-tower features that live in the shared space F.

A new fusion is one class in this file (or any imported file) registered with ``@FUSIONS.register``;
``model.fusion: <name>`` selects it and ``model.fusion_kwargs`` passes extra constructor arguments.
Every fusion takes any number of towers and starts as (a function of) their mean, so switching the
fusion does not wreck pretrained features at step 0.

Interface::

    fusion = FUSIONS.get(name)(towers=["clip", "vit"], dim=F, **kwargs)
    fused = fusion(feats, tokens)  # feats {tower: [B,F]}, tokens {tower: [B,N_t,F]} or None -> [B,F]

A fusion that reads the patch tokens sets ``needs_tokens = True``; the encoder then projects them
into F (otherwise that work is skipped).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..registry import Registry

FUSIONS: Registry[type] = Registry("fusion")

Feats = Dict[str, torch.Tensor]


class TowerFusion(nn.Module):
    """Base class: remembers the tower order; subclasses implement ``forward(feats, tokens)``."""

    needs_tokens: bool = False

    def __init__(self, towers: Sequence[str], dim: int) -> None:
        super().__init__()
        if len(towers) < 2:
            raise ValueError(f"a tower fusion needs at least two towers, got {list(towers)}")
        self.towers = list(towers)
        self.dim = dim

    def stack(self, feats: Feats) -> torch.Tensor:
        """[B, T, F] in tower order."""
        return torch.stack([feats[t] for t in self.towers], dim=1)


@FUSIONS.register("sum")
class SumFusion(TowerFusion):
    """Element-wise sum (no parameters)."""

    def forward(self, feats: Feats, tokens: Optional[Feats] = None) -> torch.Tensor:
        return self.stack(feats).sum(dim=1)


@FUSIONS.register("mean")
class MeanFusion(TowerFusion):
    """Element-wise mean (no parameters)."""

    def forward(self, feats: Feats, tokens: Optional[Feats] = None) -> torch.Tensor:
        return self.stack(feats).mean(dim=1)


@FUSIONS.register("concat")
class ConcatFusion(TowerFusion):
    """Concatenate, then a linear layer back to F; starts as the mean of the towers."""

    def __init__(self, towers: Sequence[str], dim: int) -> None:
        super().__init__(towers, dim)
        n = len(self.towers)
        self.proj = nn.Linear(n * dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim).repeat(1, n) / n)
            self.proj.bias.zero_()

    def forward(self, feats: Feats, tokens: Optional[Feats] = None) -> torch.Tensor:
        return self.proj(torch.cat([feats[t] for t in self.towers], dim=-1))


@FUSIONS.register("gated")
class GatedFusion(TowerFusion):
    """A learned per-dimension gate from all inputs: ``sum_t softmax_t(W [f_1..f_T])_t * f_t``.

    With two towers that is ``g * a + (1 - g) * b`` with ``g = sigmoid(.)``. Gates start equal.
    """

    def __init__(self, towers: Sequence[str], dim: int) -> None:
        super().__init__(towers, dim)
        n = len(self.towers)
        self.gate = nn.Linear(n * dim, n * dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, feats: Feats, tokens: Optional[Feats] = None) -> torch.Tensor:
        x = self.stack(feats)  # [B, T, F]
        g = self.gate(x.flatten(1)).view_as(x).softmax(dim=1)
        return (g * x).sum(dim=1)


@FUSIONS.register("cross_attn")
class CrossAttentionFusion(TowerFusion):
    """Each tower's feature attends to the other towers' patch tokens; the results are averaged.

    ``f_t' = f_t + MHA(LN(f_t), LN(tokens of the other towers))``; the attention output projection
    starts at zero, so the fusion starts as the mean.

    Args:
        heads: attention heads (``dim`` must divide by it).
    """

    needs_tokens = True

    def __init__(self, towers: Sequence[str], dim: int, heads: int = 8) -> None:
        super().__init__(towers, dim)
        if dim % heads:
            raise ValueError(f"cross_attn: feat_dim {dim} is not divisible by heads={heads}")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.ModuleDict({t: nn.MultiheadAttention(dim, heads, batch_first=True) for t in self.towers})
        for a in self.attn.values():
            nn.init.zeros_(a.out_proj.weight)
            nn.init.zeros_(a.out_proj.bias)

    def forward(self, feats: Feats, tokens: Optional[Feats] = None) -> torch.Tensor:
        if tokens is None:
            raise ValueError("cross_attn fusion needs the towers' patch tokens")
        out = []
        for t in self.towers:
            kv = self.norm_kv(torch.cat([tokens[o] for o in self.towers if o != t], dim=1))
            q = self.norm_q(feats[t]).unsqueeze(1)
            out.append(feats[t] + self.attn[t](q, kv, kv, need_weights=False)[0].squeeze(1))
        return torch.stack(out, dim=1).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# Modality fusions: combine the per-modality features of one sample (after the towers are fused).
# ``model.modality_fusion: <name>``; ``fusion(feats) -> [B, out_dim]`` with feats {modality: [B,F]}
# holding the modalities present in the batch (a subset of ``modalities``).

MODALITY_FUSIONS: Registry[type] = Registry("modality fusion")


class ModalityFusion(nn.Module):
    """Base class: the fixed modality order and the output width."""

    def __init__(self, modalities: Sequence[str], dim: int) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("a modality fusion needs at least one modality")
        self.modalities = list(modalities)
        self.dim = dim

    @property
    def out_dim(self) -> int:
        return self.dim

    def check(self, feats: Feats) -> None:
        unknown = [m for m in feats if m not in self.modalities]
        if unknown or not feats:
            raise ValueError(f"modalities {list(feats)} given; the model was built for {self.modalities} "
                             "(data.modalities)")


@MODALITY_FUSIONS.register("concat")
class ModalityConcat(ModalityFusion):
    """Concatenate in the fixed modality order (TOP-ReID / MambaPro): ``[B, M*F]``; a modality
    absent from the batch contributes zeros, so the width never changes."""

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.modalities)

    def forward(self, feats: Feats) -> torch.Tensor:
        self.check(feats)
        ref = next(iter(feats.values()))
        return torch.cat([feats[m] if m in feats else ref.new_zeros(ref.shape) for m in self.modalities], dim=1)


@MODALITY_FUSIONS.register("mean")
class ModalityMean(ModalityFusion):
    """Mean over the modalities present: ``[B, F]``."""

    def forward(self, feats: Feats) -> torch.Tensor:
        self.check(feats)
        return torch.stack([feats[m] for m in self.modalities if m in feats], dim=1).mean(dim=1)

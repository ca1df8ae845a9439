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

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

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
# Modality fusions: combine the modalities of one sample, at the level of their tokens.
#
#     fusion = MODALITY_FUSIONS.get(name)(modalities, dim, towers=..., **model.modality_fusion_kwargs)
#     out = fusion(inputs)   # inputs {modality: EncoderOutput} for the modalities present
#                            # -> FusionOutput(feat [B, out_dim], extra {name: [B, w]}, losses {name: scalar})
#
# ``EncoderOutput`` gives each modality's shared-space feature (``feat``), each tower's tokens in the
# tower's width (``towers[t].cls`` [B, D_t], ``.patches`` [B, N_t, D_t], ``.grid``) and, for a fusion
# that sets ``needs_tokens``, the same tokens projected into the shared space (``projected[t]``).
# ``feat`` goes through the model's BNNeck / classifier and is the retrieval feature; each ``extra``
# feature named in ``heads`` gets its own BNNeck / classifier and the ID / triplet losses (MambaPro's
# ``ori`` branch); ``losses`` join the named loss dict as they are.

MODALITY_FUSIONS: Registry[type] = Registry("modality fusion")


@dataclass
class TowerInfo:
    """What a token-level fusion needs to know about a tower at build time."""

    width: int  # D: token width before the projection
    grid: Tuple[int, int]  # patch grid


@dataclass
class FusionOutput:
    """Named output of a modality fusion.

    Attributes:
        feat: [B, out_dim] the retrieval feature (through the model's head).
        extra: {name: [B, w]} further features; those whose name (or its part before ``:``) is one of
            the fusion's ``heads`` are trained with that head (BNNeck, classifier) and the ID / triplet
            losses; ``a:x`` and ``a:y`` share head ``a``.
        losses: {name: scalar} auxiliary losses, already weighted, added to the loss dict.
        test_feat: in evaluation, the retrieval feature when it is not ``feat`` (IDEA ranks with other
            features than the one its main head trains); the model's output ``feat`` is then this one.
    """

    feat: torch.Tensor
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    test_feat: Optional[torch.Tensor] = None


class ModalityFusion(nn.Module):
    """Base class: the fixed modality order, the output width and what the fusion needs.

    Class attributes a fusion sets:
        needs_tokens: the encoder also projects every tower's class and patch tokens into the shared
            space (``EncoderOutput.projected``).
        handles_missing: the fusion works on any non-empty subset of its modalities (queries of one
            modality, the missing-modality protocol); a fusion that cannot says so at config time.

    Args:
        modalities: the model's modalities, in order.
        dim: F, the shared space.
        towers: ``{tower: TowerInfo}`` (widths and grids), for fusions that read tokens.
    """

    needs_tokens: bool = False
    handles_missing: bool = True

    def __init__(self, modalities: Sequence[str], dim: int, towers: Optional[Dict[str, TowerInfo]] = None) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("a modality fusion needs at least one modality")
        self.modalities = list(modalities)
        self.dim = dim
        self.towers = dict(towers or {})

    @property
    def out_dim(self) -> int:
        return self.dim

    @property
    def heads(self) -> Dict[str, int]:
        """``{extra feature: width}`` that get their own BNNeck, classifier and ID / triplet losses."""
        return {}

    def check(self, inputs: Dict[str, object]) -> None:
        unknown = [m for m in inputs if m not in self.modalities]
        if unknown or not inputs:
            raise ValueError(f"modalities {list(inputs)} given; the model was built for {self.modalities} "
                             "(data.modalities)")
        if not self.handles_missing and list(inputs) != self.modalities:
            raise ValueError(f"this modality fusion ({type(self).__name__}) needs every modality {self.modalities} in "
                             f"that order; got {list(inputs)}")


@MODALITY_FUSIONS.register("concat")
class ModalityConcat(ModalityFusion):
    """Concatenate in the fixed modality order (TOP-ReID / MambaPro): ``[B, M*F]``; a modality
    absent from the batch contributes zeros, so the width never changes."""

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.modalities)

    def forward(self, inputs) -> FusionOutput:
        self.check(inputs)
        ref = next(iter(inputs.values())).feat
        return FusionOutput(torch.cat([inputs[m].feat if m in inputs else ref.new_zeros(ref.shape)
                                       for m in self.modalities], dim=1))


@MODALITY_FUSIONS.register("mean")
class ModalityMean(ModalityFusion):
    """Mean over the modalities present: ``[B, F]``."""

    def forward(self, inputs) -> FusionOutput:
        self.check(inputs)
        return FusionOutput(torch.stack([inputs[m].feat for m in self.modalities if m in inputs], dim=1).mean(dim=1))

"""DeMo's decoupled mixture of experts over the modalities' tokens (``model.modality_fusion: demo``).

Re-implemented from the DeMo paper (AAAI 2025) and its public code (github 924973292/DeMo); the
tests hold it equal to the authors' model run on tiny random weights (``tests/fixtures/demo``).
With the tokens of every modality m in the shared space F — its global feature ``c_m`` [B, F] and
patch tokens ``P_m`` [B, N, F] (with several towers, every tower's patches):

    PIFE   g_m = QuickGELU(Linear(LayerNorm([c_m ; mean_n P_m])))                [B, F] per modality
    HDM    for every non-empty subset S of the modalities (r, n, t, rn, rt, nt, rnt for three),
           D_S = attention of a learned query over the tokens [g_m ; P_m] of every m in S   [B, F]
    ATMoE  gates = softmax over the K subsets of (q(D) . k(D_S)) per head, q from all D_S
           moe = [gate_{S,h} * Expert_{S,h}(chunk h of D_S)] for every S and head h     [B, K*F]
    ori    = [g_1 ; ... ; g_M]                                                         [B, M*F]

The retrieval feature is their ``return_pattern``: 1 = ``ori``, 2 = ``moe``, 3 = ``[ori ; moe]``
(their default). Training: ``moe`` through the model's head (their ``bottleneck_moe`` /
``classifier_moe``) and ``ori`` (``direct: true``, their RGBNT201 recipe) or each ``g_m`` (``direct:
false``, their vehicle recipes) through heads of their own, each with the ID and triplet losses.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import is_text, short_name
from .fusion import MODALITY_FUSIONS, FusionOutput, ModalityFusion, TowerInfo

#: ``return_pattern`` -> what the test feature is (their ``DeMo.forward(return_pattern=...)``)
RETURN_PATTERNS = {1: "ori", 2: "moe", 3: "ori+moe"}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP that DeMo uses in its own layers."""
    return x * torch.sigmoid(1.702 * x)


def modality_subsets(modalities: Sequence[str]) -> List[Tuple[str, ...]]:
    """Every non-empty subset, by size then in modality order: r, n, t, rn, rt, nt, rnt for three."""
    return [c for k in range(1, len(modalities) + 1) for c in combinations(modalities, k)]


class PatchIntegration(nn.Module):
    """PIFE for one modality: ``QuickGELU(Linear(LayerNorm([cls ; mean of the patches])))`` [B, F]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, cls: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """cls, local [B, F] (the global token and the mean patch token) -> [B, F]."""
        return quick_gelu(self.proj(self.norm(torch.cat([cls, local], dim=-1))))


class DecouplingQuery(nn.Module):
    """One HDM branch: a learned query token attends over a set of tokens (multi-head attention with
    the packed ``in_proj`` of ``nn.MultiheadAttention``, no residual, no norm, no positions).

    With one query the key and value projections of the tokens are never formed: per head h, the
    scores are ``tokens . (W_k,h^T q_h) / sqrt(d)`` (the key bias adds the same to every score and
    cancels in the softmax) and the output is ``(attn . tokens) W_v,h^T + (sum of attn) b_v,h``, so
    the cost is O(L F H) instead of O(L F^2) per sample. Dropout acts on the attention weights.

    Args:
        dim: F. heads: attention heads (``dim`` divisible by it). dropout: on the attention weights.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"feat_dim {dim} is not divisible by hdm_heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.token = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, token_sets: Sequence[torch.Tensor], need_weights: bool = False):
        """token_sets: [B, L_i, F] each, attended to as one sequence of sum(L_i) tokens.

        Returns [B, F], and with ``need_weights`` also the attention [B, heads, sum(L_i)]."""
        dim = self.token.shape[0]
        h, d = self.heads, dim // self.heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, _, b_v = self.in_proj_bias.chunk(3)
        q = (self.token @ w_q.t() + b_q).view(h, d)  # the query is the same for every sample
        q_keys = torch.einsum("hd,hdf->hf", q, w_k.view(h, d, dim)) / math.sqrt(d)  # [H, F]
        scores = torch.cat([t @ q_keys.t() for t in token_sets], dim=1)  # [B, L, H]
        attn = scores.softmax(dim=1)
        dropped = F.dropout(attn, self.dropout, self.training)
        pooled, start = 0, 0
        for t in token_sets:
            pooled = pooled + torch.einsum("blh,blf->bhf", dropped[:, start:start + t.shape[1]], t)
            start += t.shape[1]
        heads = torch.einsum("bhf,hdf->bhd", pooled, w_v.view(h, d, dim)) + dropped.sum(1)[..., None] * b_v.view(h, d)
        out = self.out_proj(heads.flatten(1))
        return (out, attn.transpose(1, 2)) if need_weights else out


class HierarchicalDecoupling(nn.Module):
    """HDM: one :class:`DecouplingQuery` per non-empty subset of the modalities, over the tokens of
    the modalities in it; its outputs are the decoupled features, in :func:`modality_subsets` order.

    Args:
        modalities: their order. dim: F. heads, dropout: of every branch.
    """

    def __init__(self, modalities: Sequence[str], dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.subsets = modality_subsets(modalities)
        self.branches = nn.ModuleDict({short_name(s): DecouplingQuery(dim, heads, dropout) for s in self.subsets})

    @property
    def names(self) -> List[str]:
        return list(self.branches)

    def forward(self, tokens: Dict[str, Sequence[torch.Tensor]]) -> torch.Tensor:
        """tokens {modality: [tensors [B, L, F]]} -> the decoupled features [B, K, F] (K subsets)."""
        return torch.stack([branch([t for m in subset for t in tokens[m]])
                            for subset, branch in zip(self.subsets, self.branches.values())], dim=1)


class AttentionTriggeredExperts(nn.Module):
    """ATMoE over K decoupled features [B, K, F], with ``heads`` heads of width d = F / heads.

    Gates (per head, a softmax over the K features): the query is
    ``BN(QuickGELU(Linear([D_1 ; ... ; D_K])))`` projected by ``q``, the keys the features projected by
    ``k`` (both without bias), scaled by ``d^-0.5``. Experts: one ``BN(QuickGELU(Linear_{d->d}))`` per
    feature and head, on that head's chunk of the feature (kept as one batched weight
    [K, heads, d, d] and one BatchNorm over the K*F channels, which normalises each channel on its
    own exactly as K*heads separate BatchNorms of d channels). Output: every expert output times its
    gate, concatenated feature-major, heads inside: [B, K*F]. Every expert runs (dense, no top-k).

    Args:
        dim: F. num_features: K. heads: the ATMoE heads (their ``MODEL.HEAD``).
    """

    def __init__(self, dim: int, num_features: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"feat_dim {dim} is not divisible by moe_heads={heads}")
        k, d = num_features, dim // heads
        self.num_features, self.heads = k, heads
        self.gate_reduce = nn.Linear(k * dim, dim)
        self.gate_norm = nn.BatchNorm1d(dim)
        self.gate_q = nn.Linear(dim, dim, bias=False)
        self.gate_k = nn.Linear(dim, dim, bias=False)
        bound = 1 / math.sqrt(d)  # nn.Linear(d, d)'s default initialisation, per expert
        self.expert_weight = nn.Parameter(torch.empty(k, heads, d, d).uniform_(-bound, bound))
        self.expert_bias = nn.Parameter(torch.empty(k, heads, d).uniform_(-bound, bound))
        self.expert_norm = nn.BatchNorm1d(k * dim)

    def gates(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, K, F] -> gates [B, heads, K] (each row sums to 1)."""
        b, k, dim = feats.shape
        h, d = self.heads, dim // self.heads
        q = self.gate_q(self.gate_norm(quick_gelu(self.gate_reduce(feats.flatten(1))))).view(b, h, d)
        keys = self.gate_k(feats).view(b, k, h, d)
        return (torch.einsum("bhd,bkhd->bhk", q, keys) * d ** -0.5).softmax(dim=-1)

    def experts(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, K, F] -> every expert's output [B, K, heads, d] (before gating)."""
        b, k, dim = feats.shape
        x = feats.view(b, k, self.heads, dim // self.heads)
        y = quick_gelu(torch.einsum("bkhi,khoi->bkho", x, self.expert_weight) + self.expert_bias)
        return self.expert_norm(y.reshape(b, -1)).view_as(y)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, K, F] -> [B, K*F]."""
        gates = self.gates(feats)  # [B, H, K]
        return (self.experts(feats) * gates.transpose(1, 2)[..., None]).flatten(1)


@MODALITY_FUSIONS.register("demo")
class DeMoFusion(ModalityFusion):
    """DeMo (PIFE -> HDM -> ATMoE) as a modality fusion.

    Output: ``feat`` = the ATMoE feature ``moe`` [B, K*F] (K = 2^M - 1 decoupled features; 7F for
    three modalities), trained through the model's head; ``extra`` = ``ori`` [B, M*F] (``direct:
    true``) or each modality's PIFE feature ``<m>`` [B, F] (``direct: false``), each through a head of
    its own; ``test_feat`` = the ``return_pattern`` feature; ``losses`` = ``moe_aux``, the ATMoE's
    auxiliary loss as their code computes it: always 0 (see the README). Needs every modality (the
    missing-modality protocol feeds zero images for absent ones: ``eval.missing_fill: zeros``).

    With several towers, ``c_m`` is the tower-fused feature of modality m (``model.fusion``), the
    local feature the mean of the towers' mean patch tokens, and every tower's patches join the
    HDM's key set (attention has no positions, so grids of any size mix); one tower is their model.

    Args (``model.modality_fusion_kwargs``):
        return_pattern: the test feature: 1 ``ori``, 2 ``moe``, 3 ``[ori ; moe]`` (their default).
        moe_heads: ATMoE heads (their ``MODEL.HEAD``: 4 on RGBNT201, 8 on the vehicle sets).
        hdm_heads: heads of each HDM attention; null = F // 64 as theirs (at least 1).
        attn_dropout: dropout on the HDM attention weights in training (theirs: 0.1, fixed).
        direct: the training branches above (their ``MODEL.DIRECT``).
        pife: PIFE on (their ``GLOBAL_LOCAL``); off, ``g_m = c_m``.
        atmoe: ATMoE on (their ``MODEL.ATM``); off, ``moe`` is the decoupled features concatenated.
    """

    needs_tokens = True
    handles_missing = False

    def __init__(self, modalities: Sequence[str], dim: int, towers: Optional[Dict[str, TowerInfo]] = None,
                 return_pattern: int = 3, moe_heads: int = 4, hdm_heads: Optional[int] = None,
                 attn_dropout: float = 0.1, direct: bool = True, pife: bool = True, atmoe: bool = True) -> None:
        super().__init__(modalities, dim, towers)
        if not self.towers:
            raise ValueError("the demo fusion reads the towers' tokens; build it with towers={name: TowerInfo}")
        text = [m for m in self.modalities if is_text(m)]
        if text:
            raise ValueError(f"the demo fusion attends over image tokens; {text} has none (leave it out of "
                             "data.modalities or use model.modality_fusion=concat)")
        if return_pattern not in RETURN_PATTERNS:
            raise ValueError(f"return_pattern must be one of {RETURN_PATTERNS} (their test feature), "
                             f"got {return_pattern!r}")
        self.return_pattern, self.direct = return_pattern, direct
        self.pife = nn.ModuleDict({m: PatchIntegration(dim) for m in self.modalities}) if pife else None
        self.hdm = HierarchicalDecoupling(self.modalities, dim, hdm_heads or max(1, dim // 64), attn_dropout)
        self.num_features = len(self.hdm.subsets)
        self.moe = AttentionTriggeredExperts(dim, self.num_features, moe_heads) if atmoe else None

    @property
    def out_dim(self) -> int:
        return self.dim * self.num_features

    @property
    def heads(self) -> Dict[str, int]:
        return {"ori": self.dim * len(self.modalities)} if self.direct else {m: self.dim for m in self.modalities}

    def components(self) -> Dict[str, nn.Module]:
        return {"pife": self.pife, "hdm": self.hdm, "atmoe": self.moe}

    def modality_features(self, inputs) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[torch.Tensor]]]:
        """PIFE: ``({m: g_m [B, F]}, {m: the patch tokens of every tower [B, N_t, F]})``."""
        glob, patches = {}, {}
        for m in self.modalities:
            patches[m] = [inputs[m].projected[t].patches for t in self.towers]
            cls = inputs[m].feat
            if self.pife is None:
                glob[m] = cls
                continue
            local = torch.stack([p.mean(dim=1) for p in patches[m]]).mean(dim=0)
            glob[m] = self.pife[m](cls, local)
        return glob, patches

    def forward(self, inputs) -> FusionOutput:
        self.check(inputs)
        glob, patches = self.modality_features(inputs)
        decoupled = self.hdm({m: [glob[m][:, None], *patches[m]] for m in self.modalities})  # [B, K, F]
        moe = self.moe(decoupled) if self.moe is not None else decoupled.flatten(1)
        ori = torch.cat([glob[m] for m in self.modalities], dim=1)
        test = {1: ori, 2: moe, 3: torch.cat([ori, moe], dim=1)}[self.return_pattern]
        extra = {"ori": ori} if self.direct else dict(glob)
        # their ATMoE returns an auxiliary loss that is always 0 (and weighs it by 0); kept by name
        return FusionOutput(moe, extra=extra, losses={"moe_aux": moe.new_zeros(())}, test_feat=test)

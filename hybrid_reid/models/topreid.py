"""TOP-ReID's token permutation (TPM) and complementary reconstruction (CRM) as a modality fusion
(``model.modality_fusion: tpm``).

Re-implemented from the TOP-ReID paper (Wang et al., AAAI 2024) and its public code (github
924973292/TOP-ReID); the tests hold it equal to the authors' modules run on tiny random weights
(``tests/fixtures/topreid``). Per tower, with every modality's tokens ``X_m = [c_m, P_m]`` [B, 1+N, F]
in the shared space, modalities in their fixed order ``m_0 .. m_{M-1}`` (rgb, nir, tir):

    TPM: M stages, one block each (shared by the modalities within the stage, own weights per stage);
         in stage s the class token of m_i reads the patch tokens of m_{(i+o_s) mod M}, o = 1, .., M-1, 0:
           rgb <- nir, nir <- tir, tir <- rgb;  rgb <- tir, nir <- rgb, tir <- nir;  each <- itself
         block(c, P) = c + W_o MHA(q = W_q LN(c), k = W_k LN'(P), v = W_v P);  then c + MLP(LN(c))
         feat = [c_0, .., c_{M-1}]                         [B, M*F]  (the retrieval feature; patches never change)
    CRM: a stack of ViT blocks R_ab per ordered pair of modalities, turning X_a into an estimate of X_b
         training: loss = sum over pairs of MSE(R_ab(X_a), X_b)   (targets not detached, as theirs)
         a modality b absent from the input: X_b = mean over the present a of R_ab(X_a), then TPM as usual
         (TOP-ReID's missing-modality test)

With several towers each gets its own TPM and CRM; their features are averaged, their losses too.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from ..modalities import is_text
from .fusion import MODALITY_FUSIONS, FusionOutput, ModalityFusion, TowerInfo


class ClassTokenAttention(nn.Module):
    """Multi-head attention of one token over a set of tokens: queries from ``c``, keys from the
    normalised ``tokens``, values from the raw ``tokens`` (no biases but the output projection's).

    Args:
        dim: F. heads: attention heads (``dim`` divisible by it).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, c: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """c [B, F] (already normalised), tokens [B, N, F] -> [B, F]."""
        b, n, f = tokens.shape
        h = self.heads
        q = self.q(c).view(b, h, 1, f // h)
        k = self.k(self.norm_kv(tokens)).view(b, n, h, f // h).transpose(1, 2)
        v = self.v(tokens).view(b, n, h, f // h).transpose(1, 2)
        return self.proj(F.scaled_dot_product_attention(q, k, v).reshape(b, f))


class PermutationBlock(nn.Module):
    """One TPM stage: ``c + attn(LN(c), tokens)``, then ``c + MLP(LN(c))`` (pre-norm, GELU, 4x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassTokenAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, c: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """c [B, F], tokens [B, N, F] -> c [B, F]."""
        c = c + self.attn(self.norm1(c), tokens)
        return c + self.mlp(self.norm2(c))


class TokenPermutation(nn.Module):
    """TPM for one tower: every modality's class token reads the other modalities' patch tokens in a
    fixed cyclic order, then its own (see the module docstring).

    Args:
        modalities: the modalities, in order. dim: F. heads: attention heads (TOP-ReID: 12).
    """

    def __init__(self, modalities: Sequence[str], dim: int, heads: int = 12) -> None:
        super().__init__()
        self.modalities = list(modalities)
        m = len(self.modalities)
        self.offsets = [*range(1, m), 0]  # stage s: modality i reads modality (i + offsets[s]) mod M
        self.stages = nn.ModuleList(PermutationBlock(dim, heads) for _ in self.offsets)

    def stage(self, s: int, cls: Dict[str, torch.Tensor], patches: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Stage ``s`` on every modality at once (one batch: the stage's weights are shared)."""
        mods, off = self.modalities, self.offsets[s]
        read = [patches[mods[(i + off) % len(mods)]] for i in range(len(mods))]
        out = self.stages[s](torch.cat([cls[m] for m in mods]), torch.cat(read))
        return dict(zip(mods, out.chunk(len(mods))))

    def forward(self, cls: Dict[str, torch.Tensor], patches: Dict[str, torch.Tensor]) -> torch.Tensor:
        """cls {m: [B, F]}, patches {m: [B, N, F]} -> [B, M*F]."""
        for s in range(len(self.stages)):
            cls = self.stage(s, cls, patches)
        return torch.cat([cls[m] for m in self.modalities], dim=-1)


class ComplementaryReconstruction(nn.Module):
    """CRM for one tower: ``rebuild[a][b]`` (``layers`` ViT blocks, no qkv bias, LayerNorm eps 1e-5)
    maps modality a's tokens [B, T, F] to an estimate of modality b's.

    Args:
        modalities: the modalities. dim: F. heads: attention heads (TOP-ReID: 12). layers: blocks per
            pair (TOP-ReID's ``RE_LAYER``: 1).
    """

    def __init__(self, modalities: Sequence[str], dim: int, heads: int = 12, layers: int = 1) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"crm_layers must be >= 1, got {layers}")
        self.modalities = list(modalities)
        self.rebuild = nn.ModuleDict({
            a: nn.ModuleDict({b: nn.Sequential(*(Block(dim, heads, qkv_bias=False, norm_layer=nn.LayerNorm)
                                                 for _ in range(layers)))
                              for b in self.modalities if b != a})
            for a in self.modalities})

    def reconstruct(self, tokens: Dict[str, torch.Tensor], targets: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``{b: mean over the modalities a in tokens of rebuild[a][b](tokens[a])}`` for each b in ``targets``."""
        present = [a for a in self.modalities if a in tokens]
        return {b: torch.stack([self.rebuild[a][b](tokens[a]) for a in present]).mean(dim=0) for b in targets}

    def loss(self, tokens: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over ordered pairs (a, b) of the mean squared error between ``rebuild[a][b](X_a)`` and ``X_b``."""
        return sum(F.mse_loss(self.rebuild[a][b](tokens[a]), tokens[b])
                   for a in self.modalities for b in self.rebuild[a])


@MODALITY_FUSIONS.register("tpm")
class TokenPermutationFusion(ModalityFusion):
    """TOP-ReID's TPM (the retrieval feature) with CRM (a training loss, and the reconstruction of
    absent modalities) as a modality fusion.

    Retrieval feature: TPM's class tokens concatenated, [B, M*F] (their test feature; ``eval.feat:
    pre``). Training branches, each with a BNNeck, a classifier, the ID and triplet losses:
    ``direct: true`` (TOP-ReID's RGBNT201 recipe, ``DIRECT: 1``): ``ori``, the modality features
    concatenated [B, M*F]; ``direct: false`` (its RGBNT100 / MSVR310 recipe): each modality's feature
    [B, F] with a head of its own (``<modality>``). The CRM loss joins the loss dict as ``crm``.
    With ``crm`` on, any non-empty subset of the modalities can be fused: the absent ones are
    reconstructed from the present ones (TOP-ReID's missing-modality test); without it every
    modality is needed.

    Args (``model.modality_fusion_kwargs``):
        heads: attention heads of TPM and CRM (TOP-ReID: 12 at any width; F must be divisible by it).
        direct: the branches above.
        crm: build CRM (TOP-ReID's ``RE: 1``). crm_layers: ViT blocks per modality pair (``RE_LAYER``).
        crm_weight: the CRM loss's weight (TOP-ReID: 1).
    """

    needs_tokens = True

    def __init__(self, modalities: Sequence[str], dim: int, towers: Optional[Dict[str, TowerInfo]] = None,
                 heads: int = 12, direct: bool = True, crm: bool = True, crm_layers: int = 1,
                 crm_weight: float = 1.0) -> None:
        super().__init__(modalities, dim, towers)
        if not self.towers:
            raise ValueError("the tpm fusion reads the towers' tokens; build it with towers={name: TowerInfo}")
        text = [m for m in self.modalities if is_text(m)]
        if text:
            raise ValueError(f"the tpm fusion permutes image tokens; {text} has none (leave it out of data.modalities "
                             "or use model.modality_fusion=concat)")
        if heads < 1 or dim % heads:
            raise ValueError(f"heads={heads} must divide the shared space model.feat_dim={dim} (TOP-ReID: 12 at 768; "
                             "e.g. 8 at 512)")
        self.direct, self.crm_weight = direct, crm_weight
        self.handles_missing = crm  # absent modalities are reconstructed by CRM
        self.tpm = nn.ModuleDict({t: TokenPermutation(self.modalities, dim, heads) for t in self.towers})
        self.crm = nn.ModuleDict({t: ComplementaryReconstruction(self.modalities, dim, heads, crm_layers)
                                  for t in self.towers}) if crm else None

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.modalities)

    @property
    def heads(self) -> Dict[str, int]:
        return {"ori": self.out_dim} if self.direct else {m: self.dim for m in self.modalities}

    def components(self) -> Dict[str, nn.Module]:
        return {"tpm": self.tpm, **({"crm": self.crm} if self.crm is not None else {})}

    def forward(self, inputs) -> FusionOutput:
        self.check(inputs)
        absent = [m for m in self.modalities if m not in inputs]
        feats, losses = [], []
        for t, tpm in self.tpm.items():
            tokens = {m: torch.cat([inputs[m].projected[t].cls.unsqueeze(1), inputs[m].projected[t].patches], dim=1)
                      for m in inputs}
            if absent:
                tokens.update(self.crm[t].reconstruct(tokens, absent))
            elif self.crm is not None and self.training:
                losses.append(self.crm[t].loss(tokens))
            feats.append(tpm({m: x[:, 0] for m, x in tokens.items()}, {m: x[:, 1:] for m, x in tokens.items()}))
        feat = feats[0] if len(feats) == 1 else torch.stack(feats).mean(dim=0)
        out = FusionOutput(feat)
        if losses:
            out.losses["crm"] = self.crm_weight * (losses[0] if len(losses) == 1 else torch.stack(losses).mean())
        if self.direct and not absent:
            out.extra["ori"] = torch.cat([inputs[m].feat for m in self.modalities], dim=1)
        elif not self.direct:
            out.extra.update({m: inputs[m].feat for m in self.modalities if m in inputs})
        return out

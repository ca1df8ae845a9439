"""MDReID's two decoupling losses on the modality-specific and modality-shared tokens.

Re-implemented from the MDReID paper (NeurIPS 2025) and its public code (github stone96123/MDReID,
``orthonomal_loss`` / ``CoRefine`` in their training loop and ``EnhancedTripletLoss``); the tests
hold both equal to theirs on the fixture's outputs (``tests/fixtures/mdreid``). With M modalities,
``sp_m`` the specific token (the model's ``modality_feats[m]``) and ``sh_m`` the shared token
(``encoder[m].shared``) of modality m, both [B, F]:

* ``orthogonality`` (their lambda1 = 1.5): per sample, the cosine Gram ``G`` [2M, 2M] of
  ``[sp_1..sp_M, sh_1..sh_M]``; its rows normalised again (``G_i / sqrt(|G_i|^2 + eps)``) and their
  Gram ``P`` compared with the target ``[[I_M, 0], [0, 1]]`` (specific tokens orthogonal to each other
  and to the shared ones, shared tokens alike): ``sum (P - A)^2 / (2M)^2``, averaged over the batch.
  As theirs, the loss compares the Gram of the normalised Gram, not the cosines themselves.
* ``discrepancy`` (their E-loss, the "knowledge discrepancy"; lambda2 = 5.25): hardest-positive and
  hardest-negative euclidean distances on three features: ``ss`` = every modality's [sp, sh]
  concatenated (with gradient), ``sp`` and ``sh`` = the specific / shared tokens concatenated
  (detached). With ``s_p = max ap_ss / (max ap_ss + max ap_sp + max ap_sh)`` and ``s_n = min an_ss /
  (min an_ss + min an_sp + min an_sh)`` the loss is ``|s_p| + |1 - s_n|``: the joint feature's
  hardest positive is pushed inside, its hardest negative outside, the sum of the two parts'.

Both need every modality's two tokens; for a model without shared tokens they return None (left out
of the loss dict, like ``sdm`` without SDM).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import LOSSES, batch_hard, gather_across_processes


def decoupled_tokens(output) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """``([sp_m], [sh_m])`` of a :class:`~hybrid_reid.models.ReIDOutput`, in the output's modality
    order, or None when a modality has no shared token."""
    encoder = getattr(output, "encoder", None) or {}
    feats = getattr(output, "modality_feats", None) or {}
    if not feats or any(m not in encoder or getattr(encoder[m], "shared", None) is None for m in feats):
        return None
    return [f for f in feats.values()], [encoder[m].shared for m in feats]


def token_gram(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, K, F] -> their cosine Gram [B, K, K] (rows normalised without an epsilon, as theirs)."""
    t = tokens / tokens.norm(dim=-1, keepdim=True)
    return t @ t.transpose(1, 2)


def orthogonality_loss(specific: Sequence[torch.Tensor], shared: Sequence[torch.Tensor],
                       eps: float = 1e-6) -> torch.Tensor:
    """The orthogonality loss of the module docstring; ``specific`` / ``shared``: M tensors [B, F] each."""
    m = len(specific)
    gram = token_gram(torch.stack([*specific, *shared], dim=1).float())  # [B, 2M, 2M]
    rows = gram / torch.sqrt(gram.pow(2).sum(-1, keepdim=True) + eps)
    p = rows @ rows.transpose(1, 2)
    target = torch.zeros(2 * m, 2 * m, device=p.device, dtype=p.dtype)
    target[:m, :m] = torch.eye(m, device=p.device, dtype=p.dtype)
    target[m:, m:] = 1.0
    return (p - target).pow(2).sum(dim=(1, 2)).mean() / (2 * m) ** 2


def euclidean(x: torch.Tensor) -> torch.Tensor:
    """[B, F] -> pairwise distances [B, B]: ``sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12))``."""
    sq = x.pow(2).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(1e-12).sqrt()


def discrepancy_ratios(joint: torch.Tensor, specific: torch.Tensor, shared: torch.Tensor,
                       pids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s_p, s_n)`` of the module docstring; ``specific`` and ``shared`` are used as constants."""
    ap_j, an_j = batch_hard(euclidean(joint), pids)
    ap_p, an_p = batch_hard(euclidean(specific.detach()), pids)
    ap_s, an_s = batch_hard(euclidean(shared.detach()), pids)
    s_p = ap_j.max() / (ap_j.max() + ap_p.max() + ap_s.max())
    s_n = an_j.min() / (an_j.min() + an_p.min() + an_s.min())
    return s_p, s_n


@LOSSES.register("orthogonality")
class OrthogonalityLoss(nn.Module):
    """MDReID's orthogonality (decoupling) loss on the specific and shared tokens (module docstring).

    Args:
        eps: added under the square root of the second row normalisation (theirs: 1e-6).
    """

    default_weight = 1.5  # MDReID's lambda1

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, output, pids: torch.Tensor) -> Optional[torch.Tensor]:
        tokens = decoupled_tokens(output)
        if tokens is None:
            return None
        return orthogonality_loss(*tokens, eps=self.eps)


@LOSSES.register("discrepancy")
class DiscrepancyLoss(nn.Module):
    """MDReID's E-loss / knowledge-discrepancy loss (module docstring).

    Args:
        gather: with several processes, mine over the global batch (as the triplet loss does); the
            authors trained on one GPU.
    """

    default_weight = 5.25  # MDReID's lambda2

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(self, output, pids: torch.Tensor) -> Optional[torch.Tensor]:
        tokens = decoupled_tokens(output)
        if tokens is None:
            return None
        sp, sh = tokens
        joint = torch.cat([t for pair in zip(sp, sh) for t in pair], dim=1).float()
        specific, shared = torch.cat(sp, dim=1).float(), torch.cat(sh, dim=1).float()
        if self.gather:
            w = joint.shape[1] // 2
            feats, pids = gather_across_processes(torch.cat([joint, specific.detach(), shared.detach()], 1), pids)
            joint, specific, shared = feats.split([2 * w, w, w], dim=1)
        s_p, s_n = discrepancy_ratios(joint, specific, shared, pids)
        return s_p.abs() + (1 - s_n).abs()

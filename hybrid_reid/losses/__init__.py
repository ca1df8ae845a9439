"""Losses: a registry of named losses and a criterion that returns them as a dict.

    criterion = build_criterion(cfg.loss)          # {"id": {"weight": 1, "label_smoothing": .1}, ...}
    losses = criterion(output, pids)               # {"id": tensor, "triplet": tensor, "total": tensor}

Each registered loss takes ``(output: ReIDOutput, pids: [B])`` and returns a scalar; the criterion
multiplies it by its weight. A new loss is one class registered with ``@LOSSES.register``.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

LOSSES: Registry[type] = Registry("loss")


@LOSSES.register("id")
class IDLoss(nn.Module):
    """Label-smoothed cross-entropy on the ID logits (Bag of Tricks; smoothing 0.1 as the peers).

    ``(1 - eps) * onehot + eps / num_classes`` targets, which is what torch's ``label_smoothing`` does.
    """

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, output, pids: torch.Tensor) -> torch.Tensor:
        if output.logits is None:
            raise ValueError("the id loss needs a classifier (model.num_classes > 0)")
        return F.cross_entropy(output.logits.float(), pids, label_smoothing=self.label_smoothing)


def batch_hard(dist: torch.Tensor, pids: torch.Tensor):
    """Hardest positive and hardest negative distance per anchor: ``dist [B,B]`` -> ``([B], [B])``."""
    same = pids[:, None] == pids[None, :]
    ap = dist.masked_fill(~same, float("-inf")).amax(1)
    an = dist.masked_fill(same, float("inf")).amin(1)
    return ap, an


class _AllGather(torch.autograd.Function):
    """``all_gather`` that passes gradients back to every rank's own slice (fast-reid's GatherLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        g = torch.stack(grads)
        dist.all_reduce(g)  # every rank computed the same global loss: sum their gradients
        return g[dist.get_rank()]


def gather_across_processes(feat: torch.Tensor, pids: torch.Tensor):
    """The global batch on every rank: ``feat [B,D] -> [R*B,D]`` (differentiable), ``pids -> [R*B]``.

    With one process (or no process group) the inputs come back unchanged. Every rank must hold the
    same B, which :class:`~hybrid_reid.data.PKSampler` guarantees.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return feat, pids
    all_pids = [torch.zeros_like(pids) for _ in range(dist.get_world_size())]
    dist.all_gather(all_pids, pids.contiguous())
    return torch.cat(_AllGather.apply(feat), dim=0), torch.cat(all_pids)


@LOSSES.register("triplet")
class TripletLoss(nn.Module):
    """Batch-hard triplet loss on the feature before the BNNeck.

    Args:
        margin: ``None`` or 0 = soft margin ``softplus(d_ap - d_an)``; otherwise
            ``relu(d_ap - d_an + margin)``.
        normalize: L2-normalise the features first.
        gather: with several processes, mine over the global batch (all ranks' features, gradients
            flowing back to each rank), so the loss is the one a single process computes on the
            whole P x K batch; without it each rank mines only its own P/R identities.
    """

    def __init__(self, margin: Optional[float] = None, normalize: bool = False, gather: bool = True) -> None:
        super().__init__()
        self.margin = margin or 0.0
        self.normalize = normalize
        self.gather = gather

    def forward(self, output, pids: torch.Tensor) -> torch.Tensor:
        feat = output.feat.float()
        if self.gather:
            feat, pids = gather_across_processes(feat, pids)
        if self.normalize:
            feat = F.normalize(feat, dim=1)
        dist = torch.cdist(feat, feat).clamp_min(1e-12)
        ap, an = batch_hard(dist, pids)
        valid = torch.isfinite(an)  # an anchor whose batch has no other identity has no negative
        if not valid.any():
            return feat.sum() * 0.0
        ap, an = ap[valid], an[valid]
        if self.margin > 0:
            return F.relu(ap - an + self.margin).mean()
        return F.softplus(ap - an).mean()


class Criterion(nn.Module):
    """Weighted named losses: ``forward(output, pids) -> {name: weighted loss, ..., "total": sum}``."""

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = dict(weights)

    def forward(self, output, pids: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {name: self.weights[name] * fn(output, pids) for name, fn in self.losses.items()}
        out["total"] = sum(out.values())
        return out


def build_criterion(cfg: Mapping[str, Mapping[str, Any]]) -> Criterion:
    """Build from the ``loss`` config section: ``{name: {"weight": w, **kwargs}}``; weight 0 skips a loss."""
    losses, weights = {}, {}
    for name, spec in cfg.items():
        try:
            cls = LOSSES.get(name)
        except KeyError as e:
            raise ValueError(f"loss.{name}: {e.args[0]}") from None
        kwargs = dict(spec or {})
        weight = float(kwargs.pop("weight", 1.0))
        params = inspect.signature(cls.__init__).parameters
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            valid = ["weight"] + [k for k in params if k != "self"]
            raise ValueError(f"loss.{name}: unknown argument {unknown[0]!r}; valid: {valid}")
        if weight == 0:
            continue
        losses[name], weights[name] = cls(**kwargs), weight
    if not losses:
        raise ValueError("every loss has weight 0; set at least one loss weight (e.g. loss.id.weight=1)")
    return Criterion(losses, weights)


__all__ = ["LOSSES", "Criterion", "IDLoss", "TripletLoss", "batch_hard", "build_criterion",
           "gather_across_processes"]

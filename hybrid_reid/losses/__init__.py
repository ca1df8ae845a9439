"""Losses: a registry of named losses and a criterion that returns them as a dict.

    criterion = build_criterion(cfg.loss)          # {"id": {"weight": 1, "label_smoothing": .1}, ...}
    losses = criterion(output, pids)               # {"id": tensor, "triplet": tensor, "total": tensor}

Each registered loss takes ``(output: ReIDOutput, pids: [B])`` and returns a scalar; the criterion
multiplies it by its weight. A new loss is one class registered with ``@LOSSES.register``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

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

    per_branch = True  # also on every extra feature the model trains with its own head

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

    per_branch = True

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


def _info_nce(query: torch.Tensor, anchor: torch.Tensor, pids: torch.Tensor, temperature: float,
              margin: float) -> torch.Tensor:
    """Supervised contrastive loss of ``query`` [B,D] against ``anchor`` [B,D] (positives: same pid),
    with an additive cosine margin on the positives; log-sum-exp throughout (no ``log(x + eps)``)."""
    q, a = F.normalize(query.float(), dim=1), F.normalize(anchor.float(), dim=1)
    pos = pids[:, None] == pids[None, :]
    logits = (q @ a.t() - margin * pos) / temperature
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)).mean()


@LOSSES.register("sdm")
class RGBAnchoredAlignment(nn.Module):
    """SDM alignment (seed 003): every non-RGB modality's semantic feature, and their mean (the fused
    combination), is pulled towards the RGB semantic feature of the same identity.

    Not applicable (skipped) when the model has no SDM or the batch no RGB or no other modality.

    Args:
        temperature: softmax temperature (seed: 0.1).
        margin: additive cosine margin on the positives (seed: 0.3).
        anchor: the anchor modality.
        detach_anchor: stop gradients into the anchor, so RGB is pulled towards nothing.
    """

    def __init__(self, temperature: float = 0.1, margin: float = 0.3, anchor: str = "rgb",
                 detach_anchor: bool = True) -> None:
        super().__init__()
        self.temperature, self.margin, self.anchor, self.detach_anchor = temperature, margin, anchor, detach_anchor

    def forward(self, output, pids: torch.Tensor) -> Optional[torch.Tensor]:
        sem = getattr(output, "semantic", None)
        if not sem or self.anchor not in sem or len(sem) < 2:
            return None
        anchor = sem[self.anchor].detach() if self.detach_anchor else sem[self.anchor]
        queries = [s for m, s in sem.items() if m != self.anchor]
        if len(queries) > 1:
            queries.append(torch.stack(queries).mean(0))
        return torch.stack([_info_nce(q, anchor, pids, self.temperature, self.margin) for q in queries]).mean()


@LOSSES.register("clip_consistency")
class ClipConsistencyLoss(nn.Module):
    """CLIP consistency (seed 004, stabilised): ``-logsigmoid(cos(fused, clip) / max(T, T_min))``.

    ``fused`` is the mean modality feature mapped into the CLIP space (``output.consistency_feat``),
    ``clip`` a frozen CLIP tower's feature of the RGB image (``output.clip_global``). Features are
    clamped to ``[-clamp, clamp]``; only ``gradient_flow_ratio`` of the gradient reaches the CLIP
    feature. Skipped without a CLIP target (evaluation, or no RGB in the batch).
    """

    def __init__(self, temperature: float = 0.1, min_temperature: float = 0.1, clamp: float = 10.0,
                 gradient_flow_ratio: float = 0.0) -> None:
        super().__init__()
        self.temperature = max(temperature, min_temperature)
        self.clamp, self.ratio = clamp, gradient_flow_ratio

    def forward(self, output, pids: torch.Tensor) -> Optional[torch.Tensor]:
        clip = getattr(output, "clip_global", None)
        if clip is None:
            return None
        fused = output.consistency_feat.float().clamp(-self.clamp, self.clamp)
        clip = clip.float().clamp(-self.clamp, self.clamp)
        clip = clip * self.ratio + clip.detach() * (1 - self.ratio)
        cos = F.cosine_similarity(fused, clip, dim=-1, eps=1e-6)
        return -F.logsigmoid(cos / self.temperature).mean()


def scheduled_weight(weight: float, schedule: Sequence[Sequence[float]]) -> Callable[[int], float]:
    """``epoch -> weight * factor`` of the last ``[start_epoch, factor]`` with ``start_epoch <= epoch``."""
    steps = sorted((int(e), float(f)) for e, f in schedule) or [(0, 1.0)]

    def at(epoch: int) -> float:
        factor = 0.0 if epoch < steps[0][0] else next(f for e, f in reversed(steps) if e <= epoch)
        return weight * factor

    return at


class Criterion(nn.Module):
    """Weighted named losses: ``forward(output, pids, epoch) -> {name: weighted loss, ..., "total": sum}``.

    A weight is a number or a function of the epoch. A loss that returns None (nothing to compute
    for this model or batch) is left out of the dict. A loss marked ``per_branch`` (``id``,
    ``triplet``) is also computed, with the same weight, on every extra feature the model trains
    with its own head (``output.extra``, e.g. MambaPro's ``ori``), as ``<loss>.<branch>``, times the
    branch's ``weight``; it skips ``output.feat`` when ``output.trains_feat`` is False (MDReID trains
    only its branches). The modality fusion's own auxiliary losses (``output.aux_losses``) join the
    dict as they are.
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, Union[float, Callable[[int], float]]]):
        super().__init__()
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = dict(weights)

    def weight(self, name: str, epoch: int) -> float:
        w = self.weights[name]
        return w(epoch) if callable(w) else w

    def forward(self, output, pids: torch.Tensor, epoch: int = 0) -> Dict[str, torch.Tensor]:
        out = {}
        for name, fn in self.losses.items():
            w = self.weight(name, epoch)
            if w == 0:
                continue
            per_branch = getattr(fn, "per_branch", False)
            value = fn(output, pids) if not per_branch or getattr(output, "trains_feat", True) else None
            if value is not None:
                out[name] = w * value
            if per_branch:
                for branch, b in getattr(output, "extra", {}).items():
                    if b.bn_feat is not None:  # trained with its own head
                        value = fn(b, pids)
                        if value is not None:
                            out[f"{name}.{branch}"] = w * b.weight * value
        for name, value in (getattr(output, "aux_losses", None) or {}).items():
            out[name] = value
        out["total"] = sum(out.values()) if out else output.feat.sum() * 0.0
        return out


def build_criterion(cfg: Mapping[str, Mapping[str, Any]], clip_consistency=None,
                    anchor: Optional[str] = None, gather: bool = True) -> Criterion:
    """Build from the ``loss`` config section: ``{name: {"weight": w, **kwargs}}``; weight 0 skips a loss.

    ``clip_consistency`` (the ``model.clip_consistency`` section) adds that loss with its epoch
    schedule when its weight is positive. ``anchor`` (``data.anchor_modality``) is given to every
    loss that takes an ``anchor`` argument and does not set its own. ``gather=False`` (``train.shards``:
    every shard mines on its own) turns off every loss's mining over the processes' global batch.
    """
    losses, weights = {}, {}
    for name, spec in cfg.items():
        try:
            cls = LOSSES.get(name)
        except KeyError as e:
            raise ValueError(f"loss.{name}: {e.args[0]}") from None
        kwargs = dict(spec or {})
        weight = float(kwargs.pop("weight", getattr(cls, "default_weight", 1.0)))
        params = inspect.signature(cls.__init__).parameters
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            valid = ["weight"] + [k for k in params if k != "self"]
            raise ValueError(f"loss.{name}: unknown argument {unknown[0]!r}; valid: {valid}")
        if weight == 0:
            continue
        if anchor is not None and "anchor" in params and "anchor" not in kwargs:
            kwargs["anchor"] = anchor
        if not gather and "gather" in params:
            kwargs["gather"] = False
        losses[name], weights[name] = cls(**kwargs), weight
    cc = clip_consistency
    if cc is not None and cc.weight > 0:
        losses["clip_consistency"] = ClipConsistencyLoss(cc.temperature, cc.min_temperature, cc.clamp,
                                                         cc.gradient_flow_ratio)
        weights["clip_consistency"] = scheduled_weight(cc.weight, cc.schedule)
    if not losses:
        raise ValueError("every loss has weight 0; set at least one loss weight (e.g. loss.id.weight=1)")
    return Criterion(losses, weights)


from .decoupling import DiscrepancyLoss, OrthogonalityLoss  # noqa: E402  (registers MDReID's two losses)

__all__ = ["LOSSES", "ClipConsistencyLoss", "Criterion", "DiscrepancyLoss", "IDLoss", "OrthogonalityLoss",
           "RGBAnchoredAlignment", "TripletLoss", "batch_hard", "build_criterion", "gather_across_processes",
           "scheduled_weight"]

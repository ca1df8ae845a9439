"""Batch normalisation over the global batch when several processes train (``model.sync_bn``).

With data parallelism every process sees ``1/R`` of each batch, so a plain BatchNorm (the BNNeck,
MambaPro's convolution stages ...) normalises with per-process statistics and ``R`` processes train
a different model than one. :func:`convert_sync_batchnorm` replaces every BatchNorm by one that
uses the statistics of the whole global batch:

* on GPUs, torch's ``nn.SyncBatchNorm`` (NCCL kernels);
* elsewhere (``torchrun`` on CPUs with gloo, which ``nn.SyncBatchNorm`` refuses),
  :class:`GlobalBatchNorm`: the batch mean and variance all-reduced in two passes (exact, not the
  ``E[x^2] - E[x]^2`` shortcut), differentiable through the all-reduce.

Parameter and buffer names are unchanged, so checkpoints load into either.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward is the all-reduced gradient (every rank's output depends
    on every rank's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.BatchNorm1d):
    """A BatchNorm of any input rank ([B, C], [B, C, L], [B, C, H, W] ...) whose training statistics
    are those of the batch over all processes; identical to ``nn.BatchNorm*d`` in one process and in
    eval mode. Running variance uses the unbiased global estimate, as BatchNorm does."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [B, C, ...], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)  # nn.BatchNorm's own path (any rank, see _check_input_dim)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_local = x.numel() // x.shape[1]
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([float(n_local)])]))
        count = stats[-1]
        mean = stats[:-1] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            momentum = self._momentum_now()
            with torch.no_grad():
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        return y

    def _momentum_now(self) -> float:
        """BatchNorm's exponential average factor (``momentum``, or a cumulative average when None),
        counting this batch in ``num_batches_tracked`` as BatchNorm does."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm under ``module`` (in place) by a global-batch one; returns how many.

    GPU models get ``nn.SyncBatchNorm``; others :class:`GlobalBatchNorm`. Weights, buffers and
    their names are kept.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _BATCH_NORMS) and not isinstance(child, (GlobalBatchNorm, nn.SyncBatchNorm)):
            if child.weight is not None and child.weight.is_cuda:
                new: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            else:
                new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
                new.load_state_dict(child.state_dict())
                new.to(next(iter(child.state_dict().values())).device)
                for p_new, p_old in zip(new.parameters(), child.parameters()):
                    p_new.requires_grad_(p_old.requires_grad)
                new.train(child.training)
            setattr(module, name, new)
            count += 1
        else:
            count += convert_sync_batchnorm(child)
    return count

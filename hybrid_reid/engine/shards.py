"""``train.shards``: training whose bits do not depend on the number of processes.

Data parallelism changes the order of float additions (one matrix product over 64 rows against two
over 32, then an all-reduce), and over a thousand optimizer steps those 1e-8 differences grow to the
size of the seed-to-seed spread. With ``train.shards: S`` every global batch is trained as S
independent shards instead, and a process count only decides *where* each shard runs:

* the sampler deals each global batch into S shards (identities round-robin); process r of R runs
  shards ``r*S/R ... (r+1)*S/R - 1`` one after another, each a forward and backward on its own
  (its own BatchNorm statistics and triplet mining, as a process of the authors' multi-GPU runs
  without SyncBN);
* each shard's stochastic layers (drop path, dropout) draw from a generator seeded by
  (seed, optimizer step, shard), not from the process's stream;
* only shard 0 updates BatchNorm's running statistics (the other shards' updates are undone), and
  after each step every process takes process 0's buffers;
* the gradient is the shard gradients summed in shard order, then divided by S. One process gets
  that sum from autograd's accumulation (``g0 + g1``, then ``+ g2`` ...); several processes gather
  every shard's gradient and add them in the same order.

So 1, 2 ... S processes (any count dividing S, with the same CPU threads per process) compute the
same bits (tested with S = 4 on 1, 2 and 4 processes). The price of several processes: each keeps
its shards' gradients and gathers all S (S x the parameters in memory and traffic) instead of an
all-reduce, and one host sync per step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The seed of one shard's stochastic layers at one optimizer step."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1, np.uint64)[0] % (2**63))


class ShardedStep:
    """The micro-steps of one optimizer step under ``train.shards`` (see the module docstring)."""

    def __init__(self, accelerator: Accelerator, shards: int, seed: int) -> None:
        # (that the process count divides ``shards`` is checked once, by the sampler built before this)
        self.accelerator, self.shards, self.seed = accelerator, shards, seed
        self.processes = accelerator.num_processes
        self.per_process = shards // self.processes
        self.first = accelerator.process_index * self.per_process
        self._stash: List[torch.Tensor] = []

    def shard_of(self, micro: int) -> int:
        return self.first + micro % self.per_process

    def is_last(self, micro: int) -> bool:
        return micro % self.per_process == self.per_process - 1

    @contextlib.contextmanager
    def shard(self, model: nn.Module, micro: int, step: int) -> Iterator[int]:
        """Around one shard's forward and backward: no gradient all-reduce, the shard's own random
        stream, its running-statistics update undone unless it is shard 0, and (several processes)
        its gradient set aside for :meth:`reduce`."""
        shard = self.shard_of(micro)
        kept = [b.detach().clone() for b in model.buffers()] if shard else None
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                self.accelerator.no_sync(model):
            torch.manual_seed(shard_seed(self.seed, step, shard))
            yield shard
        if kept is not None:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), kept):
                    b.copy_(saved)
        if self.processes > 1:
            params = _trained(model)
            flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                    for p in params]
            has = torch.tensor([float(p.grad is not None) for p in params], device=device)
            self._stash.append(torch.cat([*flat, has]))
            for p in params:
                p.grad = None

    def reduce(self, model: nn.Module) -> None:
        """The step's gradient: the shard gradients summed in shard order, divided by S; several
        processes also take process 0's buffers (BatchNorm's running statistics)."""
        params = _trained(model)
        if self.processes == 1:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.shards)
            return
        local = torch.stack(self._stash)
        self._stash.clear()
        parts = [torch.empty_like(local) for _ in range(self.processes)]
        dist.all_gather(parts, local)
        every = torch.cat(parts)  # [S, N + params], in shard order
        total = every[0].clone()
        for g in every[1:]:
            total.add_(g)
        offset, sizes = 0, [p.numel() for p in params]
        grads = total[:sum(sizes)].div_(self.shards)
        had = total[sum(sizes):]
        for p, n, h in zip(params, sizes, had.tolist()):
            p.grad = grads[offset:offset + n].view_as(p).clone() if h > 0 else None
            offset += n
        for b in model.buffers():
            dist.broadcast(b, src=0)


def _trained(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

"""MambaPro's Mamba aggregation over the modalities' tokens (``model.modality_fusion: mamba``).

Re-implemented from the MambaPro paper and its public code (github 924973292/MambaPro, ``AAM``,
``MM_SS2D``, ``SS2D_intra`` / ``SS2D_inter``, ``SSM``); the tests hold it equal to the authors'
module run on tiny random weights (``tests/fixtures/mambapro``). Per modality m, with the tokens
``X_m = [cls_m, patches_m]`` [B, 1+N, F] of a tower in the shared space:

    for each of ``layers`` blocks:
        intra: each modality's patches -> in-proj (u, z) -> depthwise 3x3 conv on the patch grid
               + BatchNorm + SiLU -> its own selective scan over its N tokens
        inter: the same front end (own weights) -> ONE selective scan over all M*N tokens
               (modality after modality)
        each: out-proj(y * SiLU(z)) added to the patches (residual)
    f_m = Linear(LayerNorm([cls_m, mean(patches_m)]))    [B, F]     (the class token bypasses the scans)
    fuse = [f_1, ..., f_M]                               [B, M*F]   (the retrieval feature)

The selective scan (:func:`selective_scan`) is plain PyTorch (mamba-ssm's reference recurrence);
mamba-ssm's CUDA kernel is used instead when it is importable and the tensors are on a GPU
(``run.py bench mamba`` compares the two). With several towers each gets its own aggregation and
their outputs are averaged. The training branch ``ori`` (the modality features concatenated, with
its own BNNeck and classifier) is MambaPro's ``DIRECT: 1`` recipe.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import is_text
from .fusion import MODALITY_FUSIONS, FusionOutput, ModalityFusion, TowerInfo


def _cuda_scan():
    """mamba-ssm's fused selective-scan kernel, or None when it is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension
        return None
    return selective_scan_fn


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor, delta_bias: Optional[torch.Tensor] = None,
                             delta_softplus: bool = True) -> torch.Tensor:
    """The selective-scan recurrence in plain PyTorch (fp32), one step per token.

    Args:
        u, delta: [B, Di, L] input and raw step sizes.
        A: [Di, N] state matrix (negative); B, C: [B, N, L] input-dependent projections.
        D: [Di] skip; delta_bias: [Di] added to ``delta`` before ``softplus``.

    ``h_l = exp(delta_l A) h_{l-1} + delta_l u_l B_l``, ``y_l = C_l . h_l + D u_l``; returns y [B, Di, L].
    """
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.float()
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        d = delta[:, :, i, None]  # [B, Di, 1]
        h = torch.exp(d * A) * h + d * u[:, :, i, None] * B[:, None, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    return (y + u * D.float()[:, None]).to(dtype)


def selective_scan(u, delta, A, B, C, D, delta_bias=None, delta_softplus: bool = True,
                   kernel: str = "auto") -> torch.Tensor:
    """:func:`selective_scan_reference`, or mamba-ssm's CUDA kernel (``kernel``: ``auto`` = the
    kernel when importable and on a GPU, ``torch`` = always the plain path, ``cuda`` = the kernel)."""
    fn = _cuda_scan() if kernel in ("auto", "cuda") and u.is_cuda else None
    if kernel == "cuda" and fn is None:
        raise RuntimeError("selective scan kernel 'cuda' asked for, but mamba-ssm's CUDA kernel is not available "
                           "(pip install mamba-ssm on a CUDA machine) or the tensors are not on a GPU")
    if fn is not None:
        return fn(u, delta, A, B, C, D.float(), delta_bias=delta_bias.float(), delta_softplus=delta_softplus)
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, delta_softplus)


def _trunc_normal_linears(module: nn.Module) -> None:
    """MambaPro's aggregation init: every Linear trunc-normal(0.02) with zero bias, LayerNorms 1/0
    (which also sets the step-size bias to 0, over Mamba's own dt initialisation, as the authors' code does)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SelectiveSSM(nn.Module):
    """One selective state-space scan (S6) with input-dependent step, B and C, and an output LayerNorm.

    Args:
        d_inner: Di, the channels scanned.
        d_state: N, the state size per channel (16).
        dt_rank: R, the rank of the step-size projection (``ceil(F / 16)``).
        kernel: ``auto`` / ``torch`` / ``cuda`` (see :func:`selective_scan`).
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1, kernel: str = "auto") -> None:
        super().__init__()
        self.d_state, self.dt_rank, self.kernel = d_state, dt_rank, kernel
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_norm = nn.LayerNorm(d_inner)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, L, Di] -> [B, L, Di]."""
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ self.dt_proj.weight.t()  # [B, L, Di]; the bias goes in as the scan's delta_bias
        y = selective_scan(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(),
                           -torch.exp(self.A_log.float()), Bm.transpose(1, 2).contiguous(),
                           Cm.transpose(1, 2).contiguous(), self.D, delta_bias=self.dt_proj.bias,
                           delta_softplus=True, kernel=self.kernel)
        return self.out_norm(y.transpose(1, 2))


class ModalityScan(nn.Module):
    """MambaPro's ``SS2D_intra`` (``joint=False``: one scan per modality) or ``SS2D_inter``
    (``joint=True``: one scan over every modality's patches, in modality order).

    Per modality: in-proj ``F -> 2 Di`` (no bias) split into the scanned part u and the gate z; u as
    an image on the patch ``grid`` through a depthwise 3x3 convolution, BatchNorm and SiLU; after the
    scan(s), ``out_proj(y * SiLU(z))`` (no bias) is added to the patches.

    Args:
        modalities: their order (and, for ``joint``, the order of the one sequence).
        dim: F. grid: (h, w) of the N patch tokens. d_state, dt_rank, expand (Di = expand * F).
        bidirectional: also scan backwards (MambaPro's ``MAMBA_BI``, off in every shipped config).
    """

    def __init__(self, modalities: Sequence[str], dim: int, grid: Tuple[int, int], joint: bool, d_state: int = 16,
                 dt_rank: int = 1, expand: int = 2, bidirectional: bool = False, kernel: str = "auto") -> None:
        super().__init__()
        self.modalities, self.grid, self.joint, self.bidirectional = list(modalities), tuple(grid), joint, bidirectional
        di = expand * dim
        self.in_proj = nn.ModuleDict({m: nn.Linear(dim, 2 * di, bias=False) for m in self.modalities})
        self.conv = nn.ModuleDict({m: nn.Sequential(nn.Conv2d(di, di, 3, padding=1, groups=di, bias=True),
                                                    nn.BatchNorm2d(di), nn.SiLU()) for m in self.modalities})
        names = ["joint"] if joint else self.modalities
        self.scan = nn.ModuleDict({n: SelectiveSSM(di, d_state, dt_rank, kernel) for n in names})
        self.scan_back = nn.ModuleDict({n: SelectiveSSM(di, d_state, dt_rank, kernel) for n in names}) \
            if bidirectional else None
        self.out_proj = nn.Linear(di, dim, bias=False)

    def _scan(self, name: str, u: torch.Tensor) -> torch.Tensor:
        y = self.scan[name](u)
        if self.scan_back is not None:
            y = y + self.scan_back[name](u.flip(1)).flip(1)
        return y

    def forward(self, tokens: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{modality: patches [B, N, F]} -> the same, each plus its scanned update."""
        h, w = self.grid
        us, zs = [], []
        for m in self.modalities:
            x = tokens[m]
            b, n, _ = x.shape
            u, z = self.in_proj[m](x).chunk(2, dim=-1)
            u = self.conv[m](u.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
            us.append(u.permute(0, 2, 3, 1).reshape(b, n, -1))
            zs.append(z)
        if self.joint:
            y = self._scan("joint", torch.cat(us, dim=1))
        else:
            y = torch.cat([self._scan(m, u) for m, u in zip(self.modalities, us)], dim=1)
        out = self.out_proj(y * F.silu(torch.cat(zs, dim=1)))
        n = tokens[self.modalities[0]].shape[1]
        return {m: tokens[m] + out[:, i * n:(i + 1) * n] for i, m in enumerate(self.modalities)}


class MambaAggregator(nn.Module):
    """MambaPro's ``AAM`` for one tower: ``layers`` x (intra, inter) scans, then per modality
    ``Linear(LayerNorm([cls, mean(patches)]))``, concatenated in modality order: [B, M*F]."""

    def __init__(self, modalities: Sequence[str], dim: int, grid: Tuple[int, int], layers: int = 2,
                 d_state: int = 16, dt_rank: Optional[int] = None, expand: int = 2, bidirectional: bool = False,
                 kernel: str = "auto") -> None:
        super().__init__()
        self.modalities = list(modalities)
        rank = dt_rank or math.ceil(dim / 16)
        kw = dict(d_state=d_state, dt_rank=rank, expand=expand, bidirectional=bidirectional, kernel=kernel)
        self.blocks = nn.ModuleList(nn.ModuleDict({"intra": ModalityScan(self.modalities, dim, grid, False, **kw),
                                                   "inter": ModalityScan(self.modalities, dim, grid, True, **kw)})
                                    for _ in range(layers))
        self.reduce = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim))
                                     for m in self.modalities})
        _trunc_normal_linears(self)

    def forward(self, cls: Dict[str, torch.Tensor], patches: Dict[str, torch.Tensor]) -> torch.Tensor:
        """cls {m: [B, F]}, patches {m: [B, N, F]} -> [B, M*F]."""
        for block in self.blocks:
            patches = block["inter"](block["intra"](patches))
        return torch.cat([self.reduce[m](torch.cat([cls[m], patches[m].mean(dim=1)], dim=-1))
                          for m in self.modalities], dim=-1)


@MODALITY_FUSIONS.register("mamba")
class MambaFusion(ModalityFusion):
    """MambaPro's Mamba aggregation as a modality fusion.

    Retrieval feature: the aggregation of every modality's class and patch tokens, in the shared
    space, [B, M*F] (MambaPro's test feature; with several towers, one aggregation per tower,
    averaged). Training branches, each with a BNNeck, a classifier, the ID and triplet losses:
    ``direct: true`` (MambaPro's RGBNT201 recipe, ``DIRECT: 1``): ``ori``, the modality features
    concatenated, [B, M*F]; ``direct: false`` (its RGBNT100 / MSVR310 recipe, ``DIRECT: 0``): each
    modality's feature alone, ``modality:<m>`` [B, F], all through one shared head (each with its own
    batch statistics, as the authors apply their one per-modality head three times). Needs every
    modality.

    Args (``model.modality_fusion_kwargs``):
        layers: stacked intra + inter blocks (MambaPro: 2). d_state: 16. expand: 2.
        dt_rank: null = ``ceil(F / 16)``. bidirectional: MambaPro's ``MAMBA_BI`` (false).
        direct: the branches above (true: ``ori``; false: per modality).
        kernel: ``auto`` / ``torch`` / ``cuda`` selective scan.
    """

    needs_tokens = True
    handles_missing = False
    subset_features = False

    def __init__(self, modalities: Sequence[str], dim: int, towers: Optional[Dict[str, TowerInfo]] = None,
                 layers: int = 2, d_state: int = 16, expand: int = 2, dt_rank: Optional[int] = None,
                 bidirectional: bool = False, direct: bool = True, kernel: str = "auto") -> None:
        super().__init__(modalities, dim, towers)
        if not self.towers:
            raise ValueError("the mamba fusion reads the towers' tokens; build it with towers={name: TowerInfo}")
        text = [m for m in self.modalities if is_text(m)]
        if text:
            raise ValueError(f"the mamba fusion scans image tokens; {text} has none (leave it out of data.modalities "
                             "or use model.modality_fusion=concat)")
        if kernel not in ("auto", "torch", "cuda"):
            raise ValueError(f"kernel must be auto, torch or cuda, got {kernel!r}")
        self.direct = direct
        self.aggregators = nn.ModuleDict({t: MambaAggregator(self.modalities, dim, info.grid, layers, d_state,
                                                             dt_rank, expand, bidirectional, kernel)
                                          for t, info in self.towers.items()})

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.modalities)

    @property
    def heads(self) -> Dict[str, int]:
        return {"ori": self.dim * len(self.modalities)} if self.direct else {"modality": self.dim}

    def forward(self, inputs) -> FusionOutput:
        self.check(inputs)
        fused = []
        for t, agg in self.aggregators.items():
            cls = {m: inputs[m].projected[t].cls for m in self.modalities}
            patches = {m: inputs[m].projected[t].patches for m in self.modalities}
            fused.append(agg(cls, patches))
        feat = fused[0] if len(fused) == 1 else torch.stack(fused).mean(dim=0)
        if self.direct:
            return FusionOutput(feat, extra={"ori": torch.cat([inputs[m].feat for m in self.modalities], dim=1)})
        return FusionOutput(feat, extra={f"modality:{m}": inputs[m].feat for m in self.modalities})

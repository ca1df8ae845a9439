"""Modality experts on a timm ViT tower: non-shared tokenizers and MER LoRA, any tower.

Both are routed by the modality of the current forward (:meth:`ModalityExperts.activate`), so the
shared transformer blocks see ``rgb`` through the RGB tokenizer and RGB LoRA, ``nir`` through the
NIR ones, and so on; nothing is written once per modality.

* :class:`ModalityPatchEmbed` replaces ``tower.patch_embed``: one patch embedding per image modality,
  copied from the tower's own (a 1-channel one is the sum of the RGB kernels, so a grey image
  repeated over three channels embeds identically), plus a small random perturbation for non-RGB
  modalities (seed 003: std 0.02). A 1-channel image given to a 3-channel tokenizer goes through a
  learnable 1x1 convolution that starts as channel replication; a 3-channel image given to a
  1-channel tokenizer is averaged to grey.
* MER: :class:`ModalityLoRALinear` replaces ``attn.qkv`` (q, k and v), ``attn.proj``, ``mlp.fc1``
  and ``mlp.fc2`` of the chosen blocks: the frozen-or-not base ``nn.Linear`` plus one LoRA pair per
  modality (A Kaiming-uniform, B zero, scale alpha / rank: peft's initialisation and its key layout
  ``<layer>.base_layer.weight`` / ``<layer>.lora_A.<m>.weight`` / ``<layer>.lora_B.<m>.weight``, so
  checkpoints of either load into the other; a test holds it equal to peft's LoRA).

Why not peft's own layers: peft routes by ``set_adapter``, which sets ``requires_grad`` on the
adapters at every switch. Switching per modality inside a forward therefore trains only the last
modality's adapter unless every switch is undone, and the toggling breaks ``torch.compile`` graphs
(5-10 breaks per step). Here routing is a plain attribute (:attr:`ModalityLoRALinear.active`) read
in the forward; no parameter is touched, every adapter trains in every step and the forward
compiles into one graph. Gradient checkpointing stays refused: its recomputation would route by the
modality of the last forward.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


class ModalityPatchEmbed(nn.Module):
    """Per-modality copies of a timm ``PatchEmbed``; which one runs is set by ``active``.

    Args:
        base: the tower's patch embedding (already holding pretrained weights).
        channels: ``{modality: 1 or 3}`` input channels of each tokenizer.
        perturb_std: std of the Gaussian noise added to the kernels of every tokenizer but the anchor's.
        generator: RNG for the perturbation (reproducible builds).
        anchor: the modality whose tokenizer stays an exact copy (``data.anchor_modality``).
    """

    def __init__(self, base: nn.Module, channels: Dict[str, int], perturb_std: float = 0.02,
                 generator: Optional[torch.Generator] = None, anchor: str = "rgb") -> None:
        super().__init__()
        self.embeds = nn.ModuleDict()
        self.adapters = nn.ModuleDict()  # 1 -> 3 channel 1x1 convolutions (for 3-channel tokenizers)
        for m, c in channels.items():
            if c not in (1, 3):
                raise ValueError(f"model.tokenizers.channels.{m}: must be 1 or 3, got {c}")
            e = copy.deepcopy(base)
            with torch.no_grad():
                if c == 1:
                    old = e.proj
                    e.proj = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding,
                                       bias=old.bias is not None)
                    e.proj.weight.copy_(old.weight.sum(1, keepdim=True))
                    if old.bias is not None:
                        e.proj.bias.copy_(old.bias)
                if m != anchor and perturb_std > 0:
                    noise = torch.randn(e.proj.weight.shape, generator=generator) * perturb_std
                    e.proj.weight.add_(noise.to(e.proj.weight))
            self.embeds[m] = e
            if c == 3:
                a = nn.Conv2d(1, 3, 1)
                nn.init.ones_(a.weight)
                nn.init.zeros_(a.bias)
                self.adapters[m] = a
        # what timm's VisionTransformer reads from its patch_embed
        for attr in ("grid_size", "num_patches", "patch_size", "img_size", "dynamic_img_pad", "flatten",
                     "output_fmt", "strict_img_size"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        self._base_feat_ratio = getattr(base, "feat_ratio", None)
        self.active: Optional[str] = None
        self.requires_grad_(True)  # tokenizers train even when the tower they were copied from is frozen

    def feat_ratio(self, as_scalar: bool = True):
        return self._base_feat_ratio(as_scalar) if self._base_feat_ratio else self.patch_size

    @property
    def modalities(self) -> List[str]:
        return list(self.embeds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens, with the active modality's embedding (C adapted to 1 or 3)."""
        m = self.active
        if m is None or m not in self.embeds:
            raise ValueError(f"no tokenizer for modality {m!r}; the tower has {self.modalities}")
        e = self.embeds[m]
        want = e.proj.in_channels
        if x.shape[1] == 1 and want == 3:
            x = self.adapters[m](x)
        elif x.shape[1] == 3 and want == 1:
            x = x.mean(1, keepdim=True)
        return e(x)


class ModalityLoRALinear(nn.Module):
    """An ``nn.Linear`` with one LoRA expert per modality; :attr:`active` picks the expert.

    ``y = base_layer(x) + scale * B_m(A_m(dropout(x)))`` for ``m = active``, ``scale = alpha / rank``.

    Args:
        base: the linear layer being adapted (kept as ``base_layer``, its trainability unchanged).
        modalities: one expert each.
        rank, alpha, dropout: LoRA rank, alpha and input dropout.
    """

    def __init__(self, base: nn.Linear, modalities: Sequence[str], rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict({m: nn.Linear(base.in_features, rank, bias=False) for m in modalities})
        self.lora_B = nn.ModuleDict({m: nn.Linear(rank, base.out_features, bias=False) for m in modalities})
        for m in modalities:  # peft's default (init_lora_weights=True): the adapter starts as a no-op
            nn.init.kaiming_uniform_(self.lora_A[m].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[m].weight)
        self.to(base.weight.device, base.weight.dtype)
        self.active: Optional[str] = None
        self.merged: Optional[str] = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self, modality: str) -> torch.Tensor:
        """``scale * B_m @ A_m`` [out, in]: the expert as a weight update."""
        return self.scaling * (self.lora_B[modality].weight @ self.lora_A[modality].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through the base layer and the :attr:`active` modality's expert."""
        y = self.base_layer(x)
        m = self.active
        if m is None or m == self.merged:
            return y
        # y + scale * (A x) B^T as one addmm: the add and the scale ride on the GEMM (no [N, out] temporaries)
        h = self.lora_A[m](self.lora_dropout(x))
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[m].weight.t(),
                          alpha=self.scaling)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, experts={list(self.lora_A)}"


class ModalityExperts:
    """Installs tokenizers and/or LoRA experts on a timm tower and routes a forward to one modality.

    Not an ``nn.Module``: the parameters live in the tower (``patch_embed.embeds.<m>``,
    ``...lora_A.<m>`` / ``lora_B.<m>``), so they are saved, loaded and optimised with it.
    """

    def __init__(self, tower: nn.Module, family=None) -> None:
        from .families import family_of

        self.tower = tower
        self.family = family or family_of(tower)
        self.tokenizer: Optional[ModalityPatchEmbed] = None
        self.lora_modalities: List[str] = []
        self._lora_layers: List[ModalityLoRALinear] = []
        self.merged: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.tokenizer is not None or bool(self.lora_modalities)

    # ------------------------------------------------------------------------------------ install
    def add_tokenizers(self, channels: Dict[str, int], perturb_std: float = 0.02, seed: int = 0,
                       anchor: str = "rgb") -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokenizer = ModalityPatchEmbed(self.tower.patch_embed, channels, perturb_std, g, anchor)
        self.tower.patch_embed = self.tokenizer

    def add_lora(self, modalities: Sequence[str], rank: int = 4, alpha: float = 1.0,
                 blocks: Optional[Sequence[int]] = None, dropout: float = 0.0) -> None:
        """One LoRA expert per modality on the family's block layers (ViT: ``attn.qkv``, ``attn.proj``,
        ``mlp.fc1``, ``mlp.fc2``; EVA also its q/k/v and SwiGLU projections) of ``blocks`` (default
        all); the patch embedding is never touched."""
        import re

        n_blocks = len(self.tower.blocks)
        chosen = list(range(n_blocks)) if blocks is None else list(blocks)
        bad = [b for b in chosen if not 0 <= b < n_blocks]
        if bad or not chosen:
            raise ValueError(f"model.mer.blocks: {list(blocks or [])} are not blocks of a {n_blocks}-block tower")
        targets_re = self.family.lora_targets
        pattern = re.compile(rf"blocks\.({'|'.join(str(b) for b in chosen)})\.({targets_re})$")
        targets = [(n, m) for n, m in self.tower.named_modules() if pattern.fullmatch(n) and isinstance(m, nn.Linear)]
        if not targets:
            raise ValueError(f"no LoRA target layers ({targets_re}) in blocks {chosen} of this tower")
        self.family.prepare_lora(self.tower)
        for name, layer in targets:
            parent_name, attr = name.rsplit(".", 1)
            lora = ModalityLoRALinear(layer, modalities, rank, alpha, dropout)
            setattr(self.tower.get_submodule(parent_name), attr, lora)
            self._lora_layers.append(lora)
        self.lora_modalities = list(modalities)

    # ------------------------------------------------------------------------------------- routing
    def activate(self, modality: Optional[str]) -> None:
        """Route the next forward through ``modality``'s tokenizer and LoRA expert (an attribute on
        each routed layer; no parameter is changed)."""
        if self.tokenizer is not None:
            self.tokenizer.active = modality
        if not self.lora_modalities:
            return
        if modality not in self.lora_modalities:
            raise ValueError(f"no LoRA expert for modality {modality!r}; the tower has {self.lora_modalities}")
        if self.merged is not None and self.merged != modality:
            raise ValueError(f"the {self.merged!r} expert is merged into the weights; unmerge before running "
                             f"{modality!r}")
        for layer in self._lora_layers:
            layer.active = modality

    @torch.no_grad()
    def merge(self, modality: str) -> None:
        """Fold ``modality``'s LoRA into the base weights (zero-overhead inference for it)."""
        if modality not in self.lora_modalities:
            raise ValueError(f"no LoRA expert for modality {modality!r} to merge; the tower has {self.lora_modalities}")
        if self.merged == modality:
            return
        if self.merged is not None:
            self.unmerge()
        for layer in self._lora_layers:
            w = layer.base_layer.weight
            w.add_(layer.delta_weight(modality).to(w.dtype))
            layer.merged = modality
        self.merged = modality

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights after :meth:`merge`."""
        if self.merged is None:
            return
        for layer in self._lora_layers:
            w = layer.base_layer.weight
            w.sub_(layer.delta_weight(self.merged).to(w.dtype))
            layer.merged = None
        self.merged = None

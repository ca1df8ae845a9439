"""Modality experts on a timm ViT tower: non-shared tokenizers and MER LoRA (peft), any tower.

Both are routed by the modality of the current forward (:meth:`ModalityExperts.activate`), so the
shared transformer blocks see ``rgb`` through the RGB tokenizer and RGB LoRA, ``nir`` through the
NIR ones, and so on; nothing is written once per modality.

* :class:`ModalityPatchEmbed` replaces ``tower.patch_embed``: one patch embedding per image modality,
  copied from the tower's own (a 1-channel one is the sum of the RGB kernels, so a grey image
  repeated over three channels embeds identically), plus a small random perturbation for non-RGB
  modalities (seed 003: std 0.02). A 1-channel image given to a 3-channel tokenizer goes through a
  learnable 1x1 convolution that starts as channel replication; a 3-channel image given to a
  1-channel tokenizer is averaged to grey.
* MER: one peft LoRA adapter per modality (``adapter_name`` = modality) on ``attn.qkv`` (q, k and
  v), ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of the chosen blocks; A Kaiming-uniform, B zero,
  scale alpha / rank. The peft traps DESIGN.md lists are handled here: switching the active adapter
  (``set_adapter``) freezes the other adapters, so every LoRA parameter is made trainable again
  after each switch; injection freezes the whole tower, so the base weights get back the
  trainability the config asks for; the target pattern is anchored on ``blocks.N.`` so the patch
  embedding's ``proj`` is never hit; gradient checkpointing is refused (wrong gradients with
  adapter switching).
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

LORA_TARGETS = r"attn\.(qkv|proj)|mlp\.(fc1|fc2)"


class ModalityPatchEmbed(nn.Module):
    """Per-modality copies of a timm ``PatchEmbed``; which one runs is set by ``active``.

    Args:
        base: the tower's patch embedding (already holding pretrained weights).
        channels: ``{modality: 1 or 3}`` input channels of each tokenizer.
        perturb_std: std of the Gaussian noise added to non-RGB tokenizers' kernels.
        generator: RNG for the perturbation (reproducible builds).
    """

    def __init__(self, base: nn.Module, channels: Dict[str, int], perturb_std: float = 0.02,
                 generator: Optional[torch.Generator] = None) -> None:
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
                if m != "rgb" and perturb_std > 0:
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


class ModalityExperts:
    """Installs tokenizers and/or LoRA experts on a timm tower and routes a forward to one modality.

    Not an ``nn.Module``: the parameters live in the tower (``patch_embed.embeds.<m>``,
    ``...lora_A.<m>`` / ``lora_B.<m>``), so they are saved, loaded and optimised with it.
    """

    def __init__(self, tower: nn.Module) -> None:
        self.tower = tower
        self.tokenizer: Optional[ModalityPatchEmbed] = None
        self.lora_modalities: List[str] = []
        self._lora_layers: List[nn.Module] = []
        self.merged: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.tokenizer is not None or bool(self.lora_modalities)

    # ------------------------------------------------------------------------------------ install
    def add_tokenizers(self, channels: Dict[str, int], perturb_std: float = 0.02, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokenizer = ModalityPatchEmbed(self.tower.patch_embed, channels, perturb_std, g)
        self.tower.patch_embed = self.tokenizer

    def add_lora(self, modalities: Sequence[str], rank: int = 4, alpha: float = 1.0,
                 blocks: Optional[Sequence[int]] = None, dropout: float = 0.0) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        n_blocks = len(self.tower.blocks)
        chosen = list(range(n_blocks)) if blocks is None else list(blocks)
        bad = [b for b in chosen if not 0 <= b < n_blocks]
        if bad or not chosen:
            raise ValueError(f"model.mer.blocks: {list(blocks or [])} are not blocks of a {n_blocks}-block tower")
        pattern = rf"blocks\.({'|'.join(str(b) for b in chosen)})\.({LORA_TARGETS})"
        trainable = {n: p.requires_grad for n, p in self.tower.named_parameters()}
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=dropout,
                            init_lora_weights=True, bias="none")
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for m in modalities:
                inject_adapter_in_model(config, self.tower, adapter_name=m)
        self.lora_modalities = list(modalities)
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [mod for mod in self.tower.modules() if isinstance(mod, LoraLayer)]
        for n, p in self.tower.named_parameters():  # undo peft's freezing of everything else
            if "lora_" in n:
                p.requires_grad_(True)
            else:
                p.requires_grad_(trainable.get(n.replace(".base_layer", ""), True))

    # ------------------------------------------------------------------------------------- routing
    def activate(self, modality: Optional[str]) -> None:
        """Route the next forward through ``modality``'s tokenizer and LoRA adapter."""
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
            layer.set_adapter(modality)  # peft: this also sets requires_grad=False on the other adapters
            for m in self.lora_modalities:  # ... which would silently train only the last modality
                for p in (*layer.lora_A[m].parameters(), *layer.lora_B[m].parameters()):
                    p.requires_grad_(True)

    def merge(self, modality: str) -> None:
        """Fold ``modality``'s LoRA into the base weights (zero-overhead inference for it)."""
        if modality not in self.lora_modalities:
            raise ValueError(f"no LoRA expert for modality {modality!r} to merge; the tower has {self.lora_modalities}")
        if self.merged == modality:
            return
        if self.merged is not None:
            self.unmerge()
        for layer in self._lora_layers:
            layer.merge(adapter_names=[modality])
        self.merged = modality

    def unmerge(self) -> None:
        """Restore the base weights after :meth:`merge`."""
        for layer in self._lora_layers:
            layer.unmerge()
        self.merged = None

"""Tower families: what differs between ViT-family towers, in one place per family.

A tower is a timm model; its *family* says how the adapter reads it:

* which token is the global one (the class token; DeiT's class and distillation tokens averaged, as
  DeiT does at inference; SigLIP's attention-pool output where there is no class token; the mean of
  the patch tokens as the documented fallback),
* whether it has a class token (``sie_mode: cls`` needs one),
* which linear layers the MER LoRA experts adapt, and what must be set first so they are called
  as modules (EVA's fused-bias attention calls ``F.linear(x, qkv.weight)`` otherwise, which would
  bypass an adapter silently),
* whether an overlapping (strided) patch embedding can be swapped in.

Adding a family is one registered class here (``@FAMILIES.register``) plus YAML; the backbone, the
experts and the model read nothing else.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..registry import Registry

#: Tower families by name; :func:`family_of` finds the one a built tower belongs to.
FAMILIES: Registry[type] = Registry("tower family")

GLOBAL_POOLS = ("auto", "cls", "map", "avg")


class TowerFamily:
    """Base class: the ViT family of timm's ``VisionTransformer`` (ImageNet ViT, DeiT, DINOv2 with or
    without registers, SigLIP, CLIP ViTs in timm, and the CLIP towers built from open_clip configs)."""

    name = "vit"
    #: timm modules whose models belong to the family (``timm.models.model_entrypoint(arch).__module__``)
    modules: Tuple[str, ...] = ("timm.models.vision_transformer", "timm.models.deit")
    #: linear layers of a block that MER adapts (a regex over the names inside ``blocks.N.``)
    lora_targets = r"attn\.(qkv|proj)|mlp\.(fc1|fc2)"
    #: timm's constructor takes ``embed_layer``, so a strided patch embedding can replace its own
    supports_stride = True
    #: blocks are timm ``Block``s that take extra tokens (MambaPro's prompts and parallel adapters)
    supports_prompts = True

    @classmethod
    def matches(cls, tower: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(tower, VisionTransformer)

    @classmethod
    def has_class_token(cls, tower: nn.Module) -> bool:
        return getattr(tower, "cls_token", None) is not None

    @classmethod
    def resolve_pool(cls, tower: nn.Module, global_pool: str, arch: str = "") -> str:
        """The global token rule for ``global_pool`` (``auto``: the family's own)."""
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
        has_map = getattr(tower, "attn_pool", None) is not None
        if global_pool == "auto":
            return "cls" if cls.has_class_token(tower) else "map" if has_map else "avg"
        if global_pool == "cls" and not cls.has_class_token(tower):
            raise ValueError(f"global_pool: cls, but {arch or type(tower).__name__} has no class token; use "
                             f"{'map (its attention pool) or ' if has_map else ''}avg (the mean of the patch tokens)")
        if global_pool == "map" and not has_map:
            raise ValueError(f"global_pool: map, but {arch or type(tower).__name__} has no attention-pool head; "
                             "use cls or avg")
        return global_pool

    @classmethod
    def global_token(cls, tower: nn.Module, tokens: torch.Tensor, pool: str, num_prefix: int) -> torch.Tensor:
        """tokens [B, P + N, D] after the final norm -> the global feature [B, D]."""
        if pool == "cls":
            return tokens[:, 0]
        if pool == "map":
            return tower.attn_pool(tokens)
        return tokens[:, num_prefix:].mean(dim=1)

    @classmethod
    def prepare_lora(cls, tower: nn.Module) -> None:
        """Make every LoRA target a module call (nothing to do for timm's ViT)."""


@FAMILIES.register("deit_distilled")
class DeiTDistilledFamily(TowerFamily):
    """DeiT with a distillation token (``deit_*_distilled_*``): two prefix tokens. The global token
    is the mean of the class and distillation tokens (``distill_token: average``, what DeiT does at
    inference with its two heads) or the class token alone (``distill_token: drop``)."""

    name = "deit_distilled"
    modules = ()  # timm.models.deit builds plain DeiTs too; the built tower's class decides

    @classmethod
    def matches(cls, tower: nn.Module) -> bool:
        from timm.models.deit import VisionTransformerDistilled

        return isinstance(tower, VisionTransformerDistilled)

    @classmethod
    def resolve_pool(cls, tower: nn.Module, global_pool: str, arch: str = "") -> str:
        pool = super().resolve_pool(tower, global_pool, arch)
        return "cls+dist" if pool == "cls" else pool

    @classmethod
    def global_token(cls, tower: nn.Module, tokens: torch.Tensor, pool: str, num_prefix: int) -> torch.Tensor:
        if pool == "cls+dist":
            return (tokens[:, 0] + tokens[:, 1]) / 2
        return super().global_token(tower, tokens, pool, num_prefix)


@FAMILIES.register("eva")
class EvaFamily(TowerFamily):
    """EVA / EVA-02 (timm ``Eva``): rotary position embeddings, SwiGLU MLPs, optionally separate
    q/k/v projections. Its rotary table is built for the plain patch grid, so a stride other than
    the patch size is refused."""

    name = "eva"
    modules = ("timm.models.eva",)
    lora_targets = r"attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x)"
    supports_stride = False
    supports_prompts = False  # rotary attention over a fixed grid: no room for extra tokens

    @classmethod
    def matches(cls, tower: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(tower, Eva)

    @classmethod
    def prepare_lora(cls, tower: nn.Module) -> None:
        """EVA attention with q/v biases computes ``F.linear(x, qkv.weight, bias)``, reading the weight
        past any wrapper; ``qkv_bias_separate`` makes it call ``qkv(x) + bias`` instead (the same
        numbers), so an adapter on ``qkv`` is really applied."""
        for m in tower.modules():
            if hasattr(m, "qkv_bias_separate") and getattr(m, "q_bias", None) is not None:
                m.qkv_bias_separate = True


FAMILIES.register("vit")(TowerFamily)


def family_of(tower: nn.Module) -> TowerFamily:
    """The registered family of a built tower: the most recently registered family that matches, so a
    family registered for a subclass wins over its parent's; ``vit`` (any timm VisionTransformer) is
    the fallback. An error names the supported ones."""
    candidates = [fam for name, fam in reversed(FAMILIES.entries()) if name != "vit"] + [FAMILIES.get("vit")]
    for fam in candidates:
        if fam.matches(tower):
            return fam
    raise ValueError(f"{type(tower).__name__} is not a ViT-family tower this adapter knows (families: "
                     f"{', '.join(FAMILIES.names())}: timm VisionTransformer incl. DeiT, DINOv2, SigLIP and CLIP "
                     f"ViTs, VisionTransformerDistilled, Eva); register a TowerFamily for it")


def family_for_module(module_name: str) -> TowerFamily:
    """The family a timm model module (``timm.models.eva``) builds, for checks before building."""
    for name, fam in reversed(FAMILIES.entries()):
        if name != "vit" and module_name in fam.modules:
            return fam
    return FAMILIES.get("vit")

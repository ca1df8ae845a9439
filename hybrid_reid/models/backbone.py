"""One adapter for every ViT-family tower: open_clip's CLIP ViTs and timm's ViT family.

Every tower is a timm model: the CLIP image tower is built as a timm ``VisionTransformer`` from its
open_clip model config (pre-norm, QuickGELU, LayerNorm eps 1e-5; an equality test against open_clip's
``encode_image`` keeps it honest), any timm ViT-family name directly (ImageNet ViT, DeiT incl.
distilled, DINOv2 with or without registers, SigLIP, EVA-02, timm's CLIP ViTs). They share every
hook point: the strided patch embedding, the camera/view embedding (a pre-hook on ``pos_drop``,
i.e. right after the positional embedding, TransReID's place, in every family) and the MER LoRA
targets. What differs per family (the global token, the LoRA layers, stride support) lives in
:mod:`hybrid_reid.models.families`.

Call signature, whatever the tower::

    out = backbone(images, cam_ids=cams, view_ids=views)  # BackboneOutput(cls [B,D], patches [B,N,D], grid)
    feat = backbone.embed(images)                          # CLIP: [B, 512] projection; others: [B, D] global
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq
from torch import nn

from ..registry import Registry
from .checkpoint import load_tower_weights
from .experts import ModalityExperts
from .families import TowerFamily, family_for_module, family_of
from .prompts import TowerPrompts
from .shared_token import SharedToken

_logger = logging.getLogger(__name__)

#: Tower sources: name -> builder(arch, img_size, stride, **tower_kwargs) -> TowerSpec. ``clip`` builds
#: open_clip model names (``ViT-B-16-quickgelu``), ``vit`` any timm ViT-family name.
TOWERS: Registry[Callable[..., "TowerSpec"]] = Registry("backbone kind")

IntPair = Union[int, Tuple[int, int], Sequence[int]]


@dataclass
class BackboneOutput:
    """Tokens of one tower after its final norm.

    Attributes:
        cls: [B, D] the tower's global token: its class token (DeiT distilled: the mean of the class
            and distillation tokens; SigLIP: its attention-pool output; see ``global_pool``), camera /
            view embedding applied, no projection.
        patches: [B, N, D] patch tokens, row-major over ``grid`` (class, distillation and register
            tokens excluded).
        grid: (h, w) patch grid, ``h * w == N``.
        shared: [B, D] MDReID's modality-shared token (token 1), when the tower has one
            (:meth:`Backbone.install_shared_token`); else None.
        text: [B, D] the output at the appended inverted-text token (IDEA; :meth:`Backbone.install_text_token`),
            or None.
    """

    cls: torch.Tensor
    patches: torch.Tensor
    grid: Tuple[int, int]
    shared: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None


@dataclass
class TowerSpec:
    """What a tower builder returns: the timm tower and the metadata the adapter needs."""

    tower: nn.Module
    out_dim: Optional[int]  # CLIP projection width; None = no projection (embed returns the CLS)
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


def _pair(x: IntPair) -> Tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or (h, w), got {x}")
    return x  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- layers
class StridedPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` with a stride (TransReID's overlapping patches: stride 12 -> 21x10 at 256x128)."""

    def __init__(self, *args: Any, stride: Optional[IntPair] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stride = _pair(stride) if stride is not None else self.patch_size
        if self.stride != self.patch_size:
            old = self.proj
            self.proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=self.patch_size,
                                  stride=self.stride, bias=old.bias is not None)
        if self.img_size is not None:
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        (ph, pw), (sh, sw) = self.patch_size, self.stride
        return (img_size[0] - ph) // sh + 1, (img_size[1] - pw) // sw + 1


class CameraViewEmbedding(nn.Module):
    """SIE: one learned row per camera (x view), scaled by ``coef``.

    The row of (cam, view) is ``cam * num_views + view`` when both are used (TransReID's layout),
    else ``cam`` or ``view``. Init trunc-normal, std 0.02.

    Args:
        dim: token width D.
        num_cams: number of cameras (0 = cameras not used).
        num_views: number of views (0 = views not used).
        coef: scale (TransReID's ``sie_xishu``).
        mode: ``all`` (added to every token) or ``cls`` (class token only).
    """

    def __init__(self, dim: int, num_cams: int = 0, num_views: int = 0, coef: float = 1.0,
                 mode: str = "all") -> None:
        super().__init__()
        if mode not in ("all", "cls"):
            raise ValueError(f"sie_mode must be 'all' or 'cls', got {mode!r}")
        if num_cams <= 0 and num_views <= 0:
            raise ValueError("CameraViewEmbedding needs num_cams > 0 or num_views > 0")
        self.num_cams, self.num_views, self.coef, self.mode = num_cams, num_views, float(coef), mode
        rows = max(num_cams, 1) * max(num_views, 1)
        self.table = nn.Parameter(torch.zeros(rows, dim))
        nn.init.trunc_normal_(self.table, std=0.02)

    def _check(self, ids: Optional[torch.Tensor], n: int, what: str) -> torch.Tensor:
        """``ids`` as long; out-of-range ids are an error.

        The range check never stalls a GPU and never breaks a compiled graph: on CPU tensors it is an
        exact Python check with a clear message; on an accelerator it is an asynchronous device
        assert; while ``torch.compile``, ``torch.export``, ONNX export or TorchScript tracing record a
        graph, it is left out (the engine sizes the table from the data set's cameras, so its ids always fit,
        and an exported graph holds no Python check)."""
        if ids is None:
            raise ValueError(f"this backbone has a {what} embedding (num_{what}s={n}): pass {what}_ids, "
                             f"or build it with num_{what}s=0")
        ids = torch.as_tensor(ids).long()
        if tracing():
            return ids
        msg = (f"{what} id out of range: the embedding has num_{what}s={n} (ids are 0-based, 0..{n - 1}); set "
               f"model.num_{what}s to the data set's count")
        if ids.device.type == "cpu":
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise ValueError(msg.replace("id out", f"id {bad} out"))
        else:
            torch._assert_async(((ids >= 0) & (ids < n)).all(), msg)
        return ids

    def forward(self, cam_ids: Optional[torch.Tensor], view_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Returns [B, D]: ``coef * table[row]``."""
        if self.num_cams and self.num_views:
            row = self._check(cam_ids, self.num_cams, "cam") * self.num_views + \
                self._check(view_ids, self.num_views, "view")
        elif self.num_cams:
            row = self._check(cam_ids, self.num_cams, "cam")
        else:
            row = self._check(view_ids, self.num_views, "view")
        return self.coef * self.table[row.to(self.table.device)]


def tracing() -> bool:
    """Whether a graph is being recorded (``torch.compile``, ``torch.export``, ONNX export, TorchScript
    tracing): data-dependent Python checks are left out of the graph then."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or (hasattr(torch.compiler, "is_exporting") and torch.compiler.is_exporting()))


class TextTokenSlot(nn.Module):
    """IDEA's inverted-text token inside a tower: the token ``u`` [B, D] (made from a caption outside
    the tower) enters as one more token after the patches, ``u + camera embedding + pos``, with its own
    learned position vector ``pos`` [1, D] (init ``D^-1/2 * N(0, 1)``), before the pre-norm; every token
    attends to it and the tower's output there is ``BackboneOutput.text``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(dim ** -0.5 * torch.randn(1, dim))

    def forward(self, token: torch.Tensor, camera: Optional[torch.Tensor]) -> torch.Tensor:
        """token [B, D], camera [B, D] or None -> [B, 1, D]."""
        t = token + self.pos.to(token.dtype)
        if camera is not None:
            t = t + camera.to(token.dtype)
        return t.unsqueeze(1)


# ---------------------------------------------------------------------------------------- backbone
class Backbone(nn.Module):
    """A timm ViT-family tower with camera/view embedding, optional CLIP projection and its preprocessing.

    Attributes:
        kind: the builder (``clip``: open_clip config; ``vit``: timm name).
        family: the :class:`~hybrid_reid.models.families.TowerFamily` (``vit``, ``deit_distilled``, ``eva``).
        tower: the timm model (``num_classes=0``).
        sie: the camera/view embedding, or None.
        proj: CLIP's projection (``nn.Linear(D, out_dim, bias=False)``) or None.
        embed_dim: token width D (768 for the B/16 towers).
        out_dim: width of :meth:`embed` (512 for CLIP B/16, D otherwise).
        grid: patch grid (h, w) at ``img_size``.
        pool: how the global token is read (``cls``, ``cls+dist``, ``map``, ``avg``).
        mean, std: the normalisation the tower expects (RGB order).
    """

    def __init__(self, kind: str, spec: TowerSpec, img_size: Tuple[int, int], sie: Optional[CameraViewEmbedding],
                 arch: str = "", global_pool: str = "auto", distill_token: str = "average") -> None:
        super().__init__()
        self.kind, self.arch, self.img_size = kind, arch, img_size
        self.tower = spec.tower
        self.family: TowerFamily = family_of(self.tower)
        self.embed_dim: int = self.tower.embed_dim
        self.num_prefix_tokens: int = getattr(self.tower, "num_prefix_tokens", 1)
        self.grid: Tuple[int, int] = tuple(self.tower.patch_embed.grid_size)  # type: ignore[assignment]
        self.mean, self.std = spec.mean, spec.std
        if distill_token not in ("average", "drop"):
            raise ValueError(f"distill_token must be 'average' or 'drop', got {distill_token!r}")
        pool = self.family.resolve_pool(self.tower, global_pool, arch)
        self.pool = "cls" if pool == "cls+dist" and distill_token == "drop" else pool
        self.proj = nn.Linear(self.embed_dim, spec.out_dim, bias=False) if spec.out_dim else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.embed_dim ** -0.5)  # open_clip's init
        self.out_dim: int = spec.out_dim or self.embed_dim
        if sie is not None and sie.mode == "cls" and not self.family.has_class_token(self.tower):
            raise ValueError(f"sie_mode: cls adds the camera embedding to the class token, but {arch or 'this tower'} "
                             "has no class token (it pools its patch tokens); use sie_mode: all")
        self.sie = sie
        self.experts = ModalityExperts(self.tower, self.family)  # per-modality tokenizers / LoRA, on demand
        self.parts: Optional[TowerPrompts] = None  # MambaPro's prompts / parallel adapters, on demand
        self.shared_token: Optional[SharedToken] = None  # MDReID's modality-shared token, on demand
        self.text_token: Optional[TextTokenSlot] = None  # IDEA's inverted-text token, on demand
        self._sie_bias: Optional[torch.Tensor] = None
        if sie is not None:
            self.tower.pos_drop.register_forward_pre_hook(self._add_sie)

    def _add_sie(self, module: nn.Module, args: Tuple[torch.Tensor, ...]):
        """Pre-hook on ``pos_drop``: x = cat(cls, patches) + pos_embed arrives here."""
        bias = self._sie_bias
        if bias is None:
            return None
        x = args[0]
        if self.sie.mode == "all":
            x = x + bias.to(x.dtype).unsqueeze(1)
        else:
            x = torch.cat([x[:, :1] + bias.to(x.dtype).unsqueeze(1), x[:, 1:]], dim=1)
        return (x,)

    def forward(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None,
                view_ids: Optional[torch.Tensor] = None, modality: Optional[str] = None,
                text_token: Optional[torch.Tensor] = None) -> BackboneOutput:
        """images [B, C, H, W] (normalised with ``mean``/``std``) -> :class:`BackboneOutput`.

        ``cam_ids`` / ``view_ids`` ([B], 0-based) are required when the backbone has a camera / view
        embedding and ignored otherwise. ``modality`` routes the forward through that modality's
        tokenizer and LoRA expert when the backbone has them (:attr:`experts`). ``text_token`` [B, D]
        is IDEA's inverted-text token (:meth:`install_text_token`); its output is ``.text``.
        """
        if text_token is not None and self.text_token is None:
            raise ValueError("a text token was given, but this tower has no slot for it (install_text_token; "
                             "model.inverted_text.enabled)")
        if self.experts.enabled:
            self.experts.activate(modality)
        if self.sie is not None:
            self._sie_bias = self.sie(cam_ids, view_ids)
        try:
            tokens = self._tokens_with_parts(images, modality, text_token) \
                if self.parts is not None or self.shared_token is not None or text_token is not None \
                else self.tower.forward_features(images)
        finally:
            self._sie_bias = None
        text = None
        if text_token is not None:
            tokens, text = tokens[:, :-1], tokens[:, -1]
        npt = self.num_prefix_tokens
        glob = self.family.global_token(self.tower, tokens, self.pool, npt)
        shared = tokens[:, 1] if self.shared_token is not None else None
        return BackboneOutput(cls=glob, patches=tokens[:, npt:], grid=self.grid, shared=shared, text=text)

    def install_text_token(self) -> None:
        """Add IDEA's inverted-text token slot (:class:`TextTokenSlot`): a forward given ``text_token``
        appends it after the patch tokens, with the camera embedding and its own position."""
        if not self.family.supports_prompts:
            raise ValueError(f"the inverted-text token needs timm Blocks that take an extra token; the "
                             f"{self.family.name} family ({self.arch}) has none")
        self.text_token = TextTokenSlot(self.embed_dim).to(next(self.tower.parameters()).device)

    def install_prompts(self, modalities: Sequence[str], length: int = 4, adapter_ratio: float = 2.0) -> None:
        """Add MambaPro's prompts (``length`` tokens per modality and block; 0 = none) and parallel
        adapters (``adapter_ratio`` x D hidden; 0 = none) to every block
        (:class:`~hybrid_reid.models.prompts.TowerPrompts`)."""
        if not self.family.supports_prompts:
            raise ValueError(f"prompts / parallel adapters need timm Blocks that take extra tokens; the "
                             f"{self.family.name} family ({self.arch}) has none")
        self.parts = TowerPrompts(len(self.tower.blocks), self.embed_dim, modalities, length, adapter_ratio)
        self.parts.to(next(self.tower.parameters()).device)

    def install_shared_token(self, tie: bool = True) -> None:
        """Add MDReID's modality-shared token beside the class token (token 1 of the output:
        :attr:`BackboneOutput.shared`); ``tie``: it is the class token itself, as in their code
        (:class:`~hybrid_reid.models.shared_token.SharedToken`)."""
        if self.shared_token is not None:
            return
        if not self.family.supports_prompts:
            raise ValueError(f"MDReID's shared token needs timm Blocks that take an extra token; the "
                             f"{self.family.name} family ({self.arch}) has none")
        if self.pool != "cls":
            raise ValueError(f"MDReID's shared token sits beside the class token, but this tower's global token is "
                             f"{self.pool!r} ({self.arch}); use global_pool: cls")
        self.shared_token = SharedToken(self.tower, tie, self.arch)
        self.num_prefix_tokens += 1

    def _tokens_with_parts(self, images: torch.Tensor, modality: Optional[str],
                           text_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward_features`` with the tower's parts: timm's embedding steps (``_pos_embed`` adds the
        class token and positional embedding, or :attr:`shared_token` adds both leading tokens and its
        table; the camera embedding hook sits on ``pos_drop`` either way), IDEA's text token after the
        patches (with the same camera embedding: ``sie_coef * table[cam]``), the pre-norm, the blocks
        (run by :attr:`parts` when it has prompts / adapters), the final norm over every token."""
        t = self.tower
        x = t.patch_embed(images)
        x = self.shared_token(t, x) if self.shared_token is not None else t._pos_embed(x)
        x = t.patch_drop(x)
        if text_token is not None:
            x = torch.cat([x, self.text_token(text_token.to(x.dtype), self._sie_bias)], dim=1)
        x = t.norm_pre(x)
        if self.parts is not None:
            x = self.parts(t.blocks, x, modality)
        elif t.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(t.blocks, x)
        else:
            x = t.blocks(x)
        return t.norm(x)

    def embed(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None,
              view_ids: Optional[torch.Tensor] = None, modality: Optional[str] = None) -> torch.Tensor:
        """[B, out_dim]: CLIP's projected image feature, or the tower's global token after the final norm."""
        cls = self.forward(images, cam_ids, view_ids, modality).cls
        return self.proj(cls) if self.proj is not None else cls

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable and self.experts.lora_modalities:
            raise ValueError("gradient checkpointing with per-modality LoRA experts gives wrong gradients "
                             "(peft adapter switching); disable one of them")
        self.tower.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, family={self.family.name!r}, arch={self.arch!r}, grid={self.grid}, "
                f"pool={self.pool!r}, out_dim={self.out_dim}")


class ModalityTowers(nn.ModuleDict):
    """One copy of a tower per image modality, each with its own weights and camera table
    (``model.share_towers: false``; TOP-ReID's one ViT per modality).

    Called like the :class:`Backbone` it copies; ``modality`` picks the copy that runs. The metadata
    (width, grid, normalisation, family, global token) is the copies' common one. State keys are
    ``<modality>.<the copy's Backbone keys>``.

    Args:
        copies: ``{modality: Backbone}``, built alike (same spec, same pretrained file).
    """

    def __init__(self, copies: Dict[str, Backbone]) -> None:
        if not copies:
            raise ValueError("per-modality towers need at least one image modality")
        super().__init__(copies)
        first = next(iter(copies.values()))
        self.kind, self.arch, self.img_size, self.family = first.kind, first.arch, first.img_size, first.family
        self.embed_dim, self.out_dim, self.grid, self.pool = first.embed_dim, first.out_dim, first.grid, first.pool
        self.num_prefix_tokens, self.mean, self.std = first.num_prefix_tokens, first.mean, first.std

    @property
    def sie(self) -> Optional[CameraViewEmbedding]:
        """The first copy's camera embedding (every copy has its own, built alike)."""
        return next(iter(self.values())).sie

    @property
    def proj(self) -> Optional[nn.Linear]:
        """The first copy's CLIP projection (every copy has its own; see :meth:`route`)."""
        return next(iter(self.values())).proj

    def route(self, modality: Optional[str]) -> Backbone:
        """The copy of ``modality``."""
        if modality not in self:
            raise ValueError(f"this tower has one copy per modality {list(self)} (model.share_towers: false); "
                             f"none for {modality!r}")
        return self[modality]

    def forward(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None,
                view_ids: Optional[torch.Tensor] = None, modality: Optional[str] = None) -> BackboneOutput:
        """:meth:`Backbone.forward` of ``modality``'s copy."""
        return self.route(modality)(images, cam_ids, view_ids, modality)

    def embed(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None,
              view_ids: Optional[torch.Tensor] = None, modality: Optional[str] = None) -> torch.Tensor:
        return self.route(modality).embed(images, cam_ids, view_ids, modality)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for copy in self.values():
            copy.set_grad_checkpointing(enable)


def tower_copies(backbone: Union[Backbone, ModalityTowers]) -> Dict[Optional[str], Backbone]:
    """``{modality: copy}`` of per-modality towers, ``{None: backbone}`` of a shared one."""
    return dict(backbone.items()) if isinstance(backbone, ModalityTowers) else {None: backbone}


# ----------------------------------------------------------------------------------- tower builders
_KWARG_ALIASES = {"depth": "layers", "num_heads": "heads", "embed_dim": "width"}
_CLIP_KWARGS = ("width", "layers", "heads", "mlp_ratio", "patch_size", "out_dim", "drop_path")
_VIT_KWARGS = ("width", "layers", "heads", "mlp_ratio", "patch_size", "drop_path")


def _check_kwargs(kind: str, kwargs: Dict[str, Any], allowed: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        k2 = _KWARG_ALIASES.get(k, k)
        if k2 not in allowed:
            close = difflib.get_close_matches(k, list(allowed) + list(_KWARG_ALIASES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown tower_kwargs key {k!r} for the {kind} tower{hint} "
                             f"(valid: {', '.join(allowed)})")
        out[k2] = v
    return out


@TOWERS.register("clip")
def _build_clip(arch: str, img_size: Tuple[int, int], stride: Optional[int], **kwargs: Any) -> TowerSpec:
    """CLIP image tower from an open_clip model config, as a timm VisionTransformer."""
    import open_clip
    from open_clip.transformer import QuickGELU
    from timm.models.vision_transformer import VisionTransformer

    kw = _check_kwargs("clip", kwargs, _CLIP_KWARGS)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        names = [n for n in open_clip.list_models() if n.startswith("ViT")]
        close = difflib.get_close_matches(arch, names, n=3)
        raise ValueError(f"{arch!r} is not an open_clip model name (closest: {close}); "
                         "the clip backbone takes open_clip ViT names such as 'ViT-B-16-quickgelu'")
    v = dict(cfg["vision_cfg"])
    supported = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
    if "timm_model_name" in v or not isinstance(v.get("layers"), int) or set(v) - supported:
        raise ValueError(f"open_clip arch {arch!r} is not a plain CLIP ViT (vision_cfg {sorted(v)}); "
                         "supported: the OpenAI-style ViT configs (ViT-B-16, ViT-B-16-quickgelu, ViT-L-14 ...)")
    width = int(kw.get("width", v["width"]))
    heads = int(kw["heads"]) if "heads" in kw else width // int(v.get("head_width", 64))
    tower = VisionTransformer(
        img_size=img_size, patch_size=int(kw.get("patch_size", v["patch_size"])), num_classes=0,
        embed_dim=width, depth=int(kw.get("layers", v["layers"])), num_heads=heads,
        mlp_ratio=float(kw.get("mlp_ratio", v.get("mlp_ratio", 4.0))), qkv_bias=True, pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer=QuickGELU if cfg.get("quick_gelu", False) else nn.GELU,
        drop_path_rate=float(kw.get("drop_path", 0.0)),
        embed_layer=partial(StridedPatchEmbed, stride=stride),
    )
    return TowerSpec(tower, int(kw.get("out_dim", cfg["embed_dim"])),
                     tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))


@TOWERS.register("vit")
def _build_vit(arch: str, img_size: Tuple[int, int], stride: Optional[int], **kwargs: Any) -> TowerSpec:
    """Any timm ViT-family model from its name (no download: ``pretrained=False``; weights come from a
    file): ViT, DeiT (incl. distilled), DINOv2 (incl. registers), SigLIP, EVA-02, timm's CLIP ViTs."""
    import timm

    kw = _check_kwargs("vit", kwargs, _VIT_KWARGS)
    name = arch.split(".")[0]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("eva*"), n=3)
        raise ValueError(f"{arch!r} is not a timm model name (closest: {close})")
    family = family_for_module(timm.models.model_entrypoint(name).__module__)
    renames = {"width": "embed_dim", "layers": "depth", "heads": "num_heads", "drop_path": "drop_path_rate"}
    timm_kw = {renames.get(k, k): v for k, v in kw.items()}
    if family.supports_stride:
        timm_kw["embed_layer"] = partial(StridedPatchEmbed, stride=stride)
    elif stride is not None and _pair(stride) != _pair(kw.get("patch_size", _patch_size_of(name))):
        raise ValueError(f"stride {stride}: the {family.name} family ({arch}) builds its rotary position table for "
                         "the plain patch grid; set stride to null (the patch size)")
    try:
        tower = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **timm_kw)
    except TypeError as e:
        raise ValueError(f"timm model {arch!r} cannot be built as a tower ({e})") from None
    family_of(tower)  # a ViT-family model, or an error naming the families
    cfg = tower.pretrained_cfg or {}
    return TowerSpec(tower, None, tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5))))


def _patch_size_of(name: str) -> int:
    """The patch size in a timm name (``..._patch14_...``), 16 if it does not say."""
    import re

    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 16


def detect_kind(arch: str) -> str:
    """``clip`` for an open_clip model name (``ViT-B-16-quickgelu``), ``vit`` for a timm name."""
    import open_clip

    return "clip" if open_clip.get_model_config(arch) is not None else "vit"


def create_backbone(kind: str, *, arch: str, pretrained: Optional[str] = None,
                    img_size: IntPair = (256, 128), stride: Optional[int] = None, num_cams: int = 0,
                    num_views: int = 0, sie_coef: float = 1.0, sie_mode: str = "all", global_pool: str = "auto",
                    distill_token: str = "average", mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None, **tower_kwargs: Any) -> Backbone:
    """Build a ViT-family tower behind the common :class:`Backbone` call.

    Args:
        kind: ``"clip"`` (open_clip name), ``"vit"`` (any timm ViT-family name) or ``"auto"`` (from
            ``arch``); see ``TOWERS.names()``.
        arch: architecture name, e.g. ``ViT-B-16-quickgelu``, ``vit_base_patch16_224``,
            ``vit_small_patch14_reg4_dinov2``, ``vit_base_patch16_siglip_256``, ``eva02_small_patch14_224``,
            ``deit_base_distilled_patch16_224``.
        pretrained: local checkpoint path (OpenAI TorchScript ``.pt``, open_clip / timm / TransReID /
            CLIP-ReID / MambaPro state dict, safetensors) or None for random init. Never downloaded.
        img_size: input (h, w); the positional embedding is resized to the resulting grid.
        stride: patch stride (None = patch size); 12 gives 21x10 at 256x128.
        num_cams, num_views: rows of the camera/view embedding (both 0: no embedding).
        sie_coef: embedding scale. sie_mode: ``all`` tokens (TransReID) or ``cls`` only (CLIP-ReID;
            needs a class token).
        global_pool: the global token: ``auto`` (the family's own: class token, else an attention
            pool, else the mean of the patches), ``cls``, ``map`` or ``avg``.
        distill_token: DeiT distilled towers: ``average`` the class and distillation tokens (DeiT at
            inference) or ``drop`` the distillation token.
        mean, std: the input normalisation the tower expects (default: its own pretraining's).
        **tower_kwargs: ``width``, ``layers`` (``depth``), ``heads``, ``mlp_ratio``, ``patch_size``,
            ``drop_path``, and for CLIP ``out_dim`` — tiny towers for tests.

    Example:
        >>> vit = create_backbone("vit", arch="vit_base_patch16_224", stride=12, num_cams=6, sie_coef=3.0)
        >>> out = vit(images, cam_ids=cams)        # cls [B,768], patches [B,210,768], grid (21,10)
    """
    kind = detect_kind(arch) if kind == "auto" else kind
    builder = TOWERS.get(kind)
    size = _pair(img_size)
    spec = builder(arch, size, stride, **tower_kwargs)
    if mean is not None or std is not None:
        spec = TowerSpec(spec.tower, spec.out_dim, tuple(mean or spec.mean), tuple(std or spec.std))
    sie = None
    if num_cams > 0 or num_views > 0:
        sie = CameraViewEmbedding(spec.tower.embed_dim, num_cams, num_views, sie_coef, sie_mode)
    elif sie_mode not in ("all", "cls"):
        raise ValueError(f"sie_mode must be 'all' or 'cls', got {sie_mode!r}")
    backbone = Backbone(kind, spec, size, sie, arch=arch, global_pool=global_pool, distill_token=distill_token)
    if pretrained:
        load_tower_weights(backbone.tower, pretrained, proj=backbone.proj, sie=backbone.sie)
    return backbone


def create_tower(spec, img_size: IntPair, num_cams: int = 0, num_views: int = 0,
                 load_pretrained: bool = True) -> Backbone:
    """The tower a :class:`~hybrid_reid.config.TowerConfig` describes (``model.towers.<name>``)."""
    kwargs = dict(spec.tower_kwargs)
    if spec.drop_path:
        kwargs["drop_path"] = spec.drop_path
    kind = {"auto": "auto", "open_clip": "clip", "timm": "vit"}[spec.source]
    return create_backbone(kind, arch=spec.arch, pretrained=spec.pretrained if load_pretrained else None,
                           img_size=img_size, stride=spec.stride, num_cams=num_cams, num_views=num_views,
                           sie_coef=spec.sie_coef, sie_mode=spec.sie_mode, global_pool=spec.global_pool,
                           distill_token=spec.distill_token, mean=spec.mean, std=spec.std, **kwargs)

"""The ReID model built from already-built parts (fast-reid's meta-architecture idea).

    images {modality: [B,3,H,W]}, cam_ids, view_ids
    per modality m (the same encoder, shared weights):
      -> per tower t (model.towers): Backbone_t -> cls_t [B,D_t], patches_t [B,N_t,D_t]
                                      cls_t += MultiScale_t(patches_t, grid_t)        (optional)
                                      f_t = Projector_t(cls_t)  [B,F]                 (shared space)
      -> fusion({f_t}, {Projector_t(patches_t)}) [B,F]                        (two or more towers)
    -> modality fusion({f_m}) [B,F'] (concat: F' = M*F; mean: F' = F)
    -> BNNeck [B,F'] -> ID classifier [B,num_classes]                                  (optional)

Only :func:`build_model` reads config; the modules take plain ints and already-built parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import ModelConfig
from ..modalities import caption_modality, image_modalities, is_text
from ..modalities import get as get_modality
from .backbone import Backbone, BackboneOutput, ModalityTowers, create_tower, tower_copies
from .checkpoint import CheckpointError
from .fusion import FUSIONS, MODALITY_FUSIONS, ModalityFusion, TowerFusion, TowerInfo
from .multi_scale import MultiScaleExtractor
from .sdm import SemanticDisentanglement
from .text import TextEncoder


@dataclass
class EncoderOutput:
    """Named output of :class:`ReIDEncoder`.

    Attributes:
        feat: [B, F] fused feature in the shared space.
        tower_feats: {tower: [B, F]} each tower's projected feature (before fusion).
        towers: {tower: BackboneOutput} raw tokens (cls includes the multi-scale vector).
        projected: {tower: BackboneOutput} the same tokens projected into F, when the modality fusion
            reads tokens (``ModalityFusion.needs_tokens``); else empty.
        shared: [B, F] the towers' modality-shared tokens (MDReID's, when the towers have one),
            projected and fused like ``feat``; else None.
    """

    feat: torch.Tensor
    tower_feats: Dict[str, torch.Tensor]
    towers: Dict[str, BackboneOutput] = field(repr=False)
    projected: Dict[str, BackboneOutput] = field(default_factory=dict, repr=False)
    shared: Optional[torch.Tensor] = None


@dataclass
class Branch:
    """A feature trained with its own head: ``feat`` [B, W] before the BNNeck, ``bn_feat`` after it,
    ``logits`` [B, num_classes] (None without a classifier); ``weight`` multiplies its ID / triplet
    losses (the modality fusion's ``branch_weights``)."""

    feat: torch.Tensor
    bn_feat: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    weight: float = 1.0


@dataclass
class ReIDOutput:
    """Named output of :class:`ReIDModel`.

    Attributes:
        feat: [B, F'] modality-fused feature before the BNNeck (for metric losses such as triplet).
        bn_feat: [B, F'] feature after the BNNeck (the retrieval feature at test time).
        logits: [B, num_classes] ID logits, or None without a classifier.
        modality_feats: {modality: [B, F]} each modality's feature in the shared space.
        encoder: {modality: EncoderOutput} per-tower features and tokens of each modality.
        semantic: {modality: [B, S]} SDM semantic features (``model.sdm.enabled``), else None.
        clip_global: [B, C] a frozen CLIP image tower's global feature of the RGB image, the target
            of the CLIP consistency loss (training, loss on, RGB present), else None.
        consistency_feat: [B, C] the mean modality feature mapped into that CLIP space (the
            consistency loss's other side), else None.
        extra: {name: Branch} the modality fusion's further features (MambaPro's ``ori``), each with
            its own head when the fusion trains it.
        aux_losses: {name: scalar} the modality fusion's auxiliary losses (weighted).
        test_feat: [B, w] the modality fusion's retrieval feature when it is not ``feat`` (DeMo's
            ``[ori ; moe]``), else None; ``eval.feat: pre`` ranks it.
        trains_feat: the ID / triplet losses apply to ``feat`` (False when the modality fusion has no
            head on its retrieval feature and trains only its branches, as MDReID).
    """

    feat: torch.Tensor
    bn_feat: torch.Tensor
    logits: Optional[torch.Tensor]
    modality_feats: Dict[str, torch.Tensor]
    encoder: Dict[str, EncoderOutput] = field(repr=False)
    semantic: Optional[Dict[str, torch.Tensor]] = None
    clip_global: Optional[torch.Tensor] = None
    consistency_feat: Optional[torch.Tensor] = None
    extra: Dict[str, Branch] = field(default_factory=dict)
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    test_feat: Optional[torch.Tensor] = None
    trains_feat: bool = True

    def retrieval_feat(self, feat: str = "bn") -> torch.Tensor:
        """The feature ranked at test time under ``eval.feat``: ``bn`` -> ``bn_feat``; ``pre`` -> the
        fusion's ``test_feat`` when it has one, else ``feat``. Evaluation, extraction and export all use it."""
        if feat == "bn":
            return self.bn_feat
        return self.feat if self.test_feat is None else self.test_feat


def renorm_affine(mean_in: Sequence[float], std_in: Sequence[float], mean_out: Sequence[float],
                  std_out: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` [1,3,1,1] with ``x * scale + shift`` taking images normalised with
    (mean_in, std_in) to (mean_out, std_out): ``x_out = (x_in * std_in + mean_in - mean_out) / std_out``."""
    mi, si, mo, so = (torch.tensor(v, dtype=torch.float32) for v in (mean_in, std_in, mean_out, std_out))
    return (si / so).view(1, 3, 1, 1), ((mi - mo) / so).view(1, 3, 1, 1)


class ReIDEncoder(nn.Module):
    """One or more towers projected into the shared space F and fused.

    Args:
        backbones: {tower name: Backbone, or ModalityTowers (one copy per modality)}; the first one's
            mean/std is the expected input normalisation, the others re-normalise the input to their
            own (an exact affine map). Projectors, multi-scale extractors and the fusion are one per
            tower name, whether the tower is shared by the modalities or copied per modality.
        feat_dim: F.
        multi_scale: {tower: MultiScaleExtractor} for the towers that use one.
        fusion: a :class:`TowerFusion` when there are several towers, else None.
        reuse_clip_proj: project a CLIP tower with its own projection when its width equals F.
    """

    def __init__(self, backbones: Dict[str, Union[Backbone, ModalityTowers]], feat_dim: int,
                 multi_scale: Optional[Dict[str, MultiScaleExtractor]] = None,
                 fusion: Optional[TowerFusion] = None, reuse_clip_proj: bool = True, projector: str = "linear",
                 project_tokens: bool = False) -> None:
        super().__init__()
        if not backbones:
            raise ValueError("ReIDEncoder needs at least one backbone")
        if len(backbones) > 1 and fusion is None:
            raise ValueError(f"{len(backbones)} towers need a fusion")
        self.backbones = nn.ModuleDict(backbones)
        self.multi_scale = nn.ModuleDict(multi_scale or {})
        self.fusion = fusion
        self.feat_dim = feat_dim
        self.project_tokens = project_tokens
        self.reused_proj = {t for t, b in backbones.items()
                            if reuse_clip_proj and b.proj is not None and b.proj.out_features == feat_dim}
        if projector not in ("linear", "identity"):
            raise ValueError(f"model.projector must be linear or identity, got {projector!r}")
        self.projectors = nn.ModuleDict()
        for t, b in backbones.items():
            if t in self.reused_proj:
                continue
            if projector == "identity":
                if b.embed_dim != feat_dim:
                    raise ValueError(f"model.projector=identity: the {t} tower is {b.embed_dim} wide and "
                                     f"model.feat_dim "
                                     f"is {feat_dim}; set feat_dim: {b.embed_dim} (or keep projector: linear)")
                self.projectors[t] = nn.Identity()
            else:
                self.projectors[t] = nn.Linear(b.embed_dim, feat_dim, bias=False)
        first = next(iter(backbones.values()))
        self.mean, self.std = first.mean, first.std
        for t, b in backbones.items():
            scale, shift = renorm_affine(first.mean, first.std, b.mean, b.std)
            identity = bool(torch.allclose(scale, torch.ones(1)) and torch.allclose(shift, torch.zeros(1)))
            self.register_buffer(f"_renorm_scale_{t}", None if identity else scale, persistent=False)
            self.register_buffer(f"_renorm_shift_{t}", None if identity else shift, persistent=False)

    @property
    def grids(self) -> Dict[str, Tuple[int, int]]:
        return {t: b.grid for t, b in self.backbones.items()}

    def projector(self, tower: str, modality: Optional[str] = None) -> nn.Module:
        """The module mapping tower tokens [.., D] into F (CLIP's own projection when reused: with
        per-modality towers, ``modality``'s copy's)."""
        if tower not in self.reused_proj:
            return self.projectors[tower]
        b = self.backbones[tower]
        return b.route(modality).proj if isinstance(b, ModalityTowers) else b.proj

    def _input_for(self, tower: str, images: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, f"_renorm_scale_{tower}")
        if scale is None or images.shape[1] != 3:
            return images
        return images * scale.to(images.dtype) + getattr(self, f"_renorm_shift_{tower}").to(images.dtype)

    @property
    def has_experts(self) -> bool:
        """Whether a tower routes by modality (tokenizers, LoRA experts, prompts, a copy per modality)."""
        return any(isinstance(b, ModalityTowers) or b.experts.enabled
                   or (b.parts is not None and b.parts.prompts is not None) for b in self.backbones.values())

    def forward(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None,
                view_ids: Optional[torch.Tensor] = None, modality: Optional[str] = None,
                text_tokens: Optional[Dict[str, torch.Tensor]] = None) -> EncoderOutput:
        """images [B,3,H,W] normalised with ``self.mean``/``self.std`` -> :class:`EncoderOutput`.

        ``modality`` selects the towers' tokenizer and LoRA expert (when they have them);
        ``text_tokens`` ``{tower: [B, D_t]}`` are IDEA's inverted-text tokens (their outputs come back
        as ``towers[t].text``, projected as ``projected[t].text``)."""
        outs: Dict[str, BackboneOutput] = {}
        feats: Dict[str, torch.Tensor] = {}
        tokens: Dict[str, torch.Tensor] = {}
        projected: Dict[str, BackboneOutput] = {}
        needs_tokens = self.fusion is not None and self.fusion.needs_tokens
        shared: Dict[str, torch.Tensor] = {}
        for t, backbone in self.backbones.items():
            text = text_tokens.get(t) if text_tokens else None
            out = backbone(self._input_for(t, images), cam_ids, view_ids, modality,
                           **({"text_token": text} if text is not None else {}))
            if t in self.multi_scale:
                out = replace(out, cls=out.cls + self.multi_scale[t](out.patches, out.grid))
            outs[t] = out
            proj = self.projector(t, modality)
            feats[t] = proj(out.cls)
            if out.shared is not None:
                shared[t] = proj(out.shared)
            if needs_tokens or self.project_tokens:
                tokens[t] = proj(out.patches)
            if self.project_tokens:
                projected[t] = BackboneOutput(feats[t], tokens[t], out.grid, shared=shared.get(t),
                                              text=proj(out.text) if out.text is not None else None)
        fuse = (lambda fs: self.fusion(fs, tokens if needs_tokens else None)) if self.fusion is not None \
            else (lambda fs: next(iter(fs.values())))
        if shared and len(shared) != len(feats):
            raise ValueError(f"towers {sorted(shared)} have a shared token and {sorted(set(feats) - set(shared))} do "
                             "not; install it on every tower")
        return EncoderOutput(feat=fuse(feats), tower_feats=feats, towers=outs, projected=projected,
                             shared=fuse(shared) if shared else None)


class ReIDHead(nn.Module):
    """BNNeck (bias frozen, as in Bag of Tricks) + bias-free ID classifier (std 0.001).

    Args:
        dim: feature width F.
        num_classes: identities (0 = BNNeck only).
    """

    def __init__(self, dim: int, num_classes: int = 0) -> None:
        super().__init__()
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        bn = self.bnneck(feat)
        return bn, (self.classifier(bn) if self.classifier is not None else None)


class ReIDModel(nn.Module):
    """Shared encoder per modality -> modality fusion -> head.

    Returns a :class:`ReIDOutput` in train and eval mode alike.

    Args:
        encoder: the towers, projected into F and fused.
        head: BNNeck + classifier over the modality-fused feature (width ``modality_fusion.out_dim``), or
            None when the fusion trains only its branches (``ModalityFusion.feat_head``; the retrieval
            feature is then ``feat`` itself).
        modality_fusion: combines the per-modality features.
        sdm: the semantic disentanglement module, or None.
        clip_teacher: a frozen CLIP backbone, the CLIP consistency loss's target, or None.
        text_encoder: the CLIP text tower for the ``text`` modality, or None.
        feat_dim: F (default: the encoder's).
        anchor: the modality the CLIP consistency target is computed from (``data.anchor_modality``).
        num_classes: identities of the branches' classifiers (default: the head's).
        inverted_text: IDEA's caption-to-token module (:class:`~hybrid_reid.models.idea.InvertedText`):
            every image modality's own caption becomes one more token of that modality's image, or None.
    """

    def __init__(self, encoder: ReIDEncoder, head: Optional[ReIDHead], modality_fusion: ModalityFusion,
                 sdm: Optional[SemanticDisentanglement] = None, clip_teacher: Optional[Backbone] = None,
                 text_encoder: Optional[TextEncoder] = None, feat_dim: Optional[int] = None,
                 anchor: str = "rgb", num_classes: Optional[int] = None,
                 inverted_text: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.inverted_text = inverted_text
        self.anchor = anchor
        self.text_encoder = text_encoder
        self.text_projector: Optional[nn.Module] = None
        if text_encoder is not None:
            f = feat_dim or encoder.feat_dim
            self.text_projector = nn.Identity() if text_encoder.embed_dim == f else \
                nn.Linear(text_encoder.embed_dim, f, bias=False)
        self.head = head
        self.modality_fusion = modality_fusion
        # a head (BNNeck + classifier) for every extra feature the fusion trains (MambaPro's ``ori``)
        if num_classes is None:
            num_classes = head.classifier.out_features if head is not None and head.classifier is not None else 0
        self.extra_heads = nn.ModuleDict({name: ReIDHead(w, num_classes) for name, w in modality_fusion.heads.items()})
        self.sdm = sdm
        # The consistency target: a frozen CLIP image tower, kept out of the module tree (not in the
        # state dict, the optimizer or DDP; it is rebuilt from model.clip_consistency.teacher) and moved lazily.
        self.consistency_head: Optional[nn.Module] = None
        object.__setattr__(self, "_clip_teacher", clip_teacher)
        if clip_teacher is not None:
            clip_teacher.requires_grad_(False).eval()
            f = feat_dim or encoder.feat_dim
            self.consistency_head = nn.Identity() if clip_teacher.out_dim == f else \
                nn.Linear(f, clip_teacher.out_dim, bias=False)
            self._teacher_renorm = renorm_affine(encoder.mean, encoder.std, clip_teacher.mean, clip_teacher.std)

    @property
    def modalities(self) -> List[str]:
        return self.modality_fusion.modalities

    def save_pretrained(self, directory: str, config=None, metrics=None, command=None) -> str:
        """Write a self-contained model folder (weights with metadata, ``config.yaml``, a model card;
        :mod:`hybrid_reid.pretrained`). ``config``: the resolved :class:`~hybrid_reid.Config` the
        model was built from (default: the one it was loaded or trained with, ``self.run_config``)."""
        from ..pretrained import save_pretrained

        config = config if config is not None else getattr(self, "run_config", None)
        if config is None:
            raise ValueError("save_pretrained needs the model's config: pass config=<the Config it was built from> "
                             "(a model from from_pretrained or a training run carries it)")
        return save_pretrained(self, directory, config, metrics, command)

    @classmethod
    def from_pretrained(cls, directory: str, device: Optional[str] = None,
                        overrides: Sequence[str] = ()) -> "ReIDModel":
        """The model of a model folder or a finished run's ``output_dir``, in eval mode, offline, without
        ID classifiers and without the data set (its config as ``.run_config``)."""
        from ..pretrained import load_pretrained

        return load_pretrained(directory, device, overrides)[0]

    @property
    def tokenizer(self):
        """What the loaders tokenise with: the ``text`` modality's tokenizer (or None), which also has
        ``caption(modality, description)`` when the model reads a caption per image modality (IDEA)."""
        text = self.text_encoder.tokenize if self.text_encoder is not None else None
        return self.inverted_text.tokenizer(text) if self.inverted_text is not None else text

    def forward(self, images: Union[torch.Tensor, Dict[str, torch.Tensor]], cam_ids: Optional[torch.Tensor] = None,
                view_ids: Optional[torch.Tensor] = None) -> ReIDOutput:
        """images: {modality: [B,3,H,W]} (any non-empty subset of ``self.modalities``; ``text`` as token
        ids [B, L]; an image modality's own caption as token ids under ``caption_key(m)``, which IDEA's
        inverted text needs), or one tensor when the model has a single modality; cam_ids, view_ids:
        [B] or None.

        ``encoder`` in the output holds the image modalities only."""
        if isinstance(images, torch.Tensor):
            if len(self.modalities) != 1:
                raise ValueError(f"the model has modalities {self.modalities}; pass images as a dict keyed by them")
            images = {self.modalities[0]: images}
        captions = {caption_modality(k): x for k, x in images.items() if caption_modality(k) is not None}
        images = {k: x for k, x in images.items() if caption_modality(k) is None}
        text_mod = next((m for m in images if is_text(m)), None)
        text = images.get(text_mod) if text_mod is not None else None
        image_inputs = {m: x for m, x in images.items() if not is_text(m)}
        text_tokens = self._text_tokens(image_inputs, captions) if self.inverted_text is not None else None
        enc = self._encode(image_inputs, cam_ids, view_ids, text_tokens) if image_inputs else {}
        inputs = dict(enc)
        if text is not None:
            if self.text_encoder is None:
                raise ValueError("text given, but the model was built without the text modality (data.modalities)")
            inputs[text_mod] = EncoderOutput(self.text_projector(self.text_encoder(text)), {}, {})
        inputs = {m: inputs[m] for m in images}  # the caller's order
        feats = {m: e.feat for m, e in inputs.items()}
        fused = self.modality_fusion(inputs)
        feat = fused.feat
        bn, logits = self.head(feat) if self.head is not None else (feat, None)
        extra = {}
        weights = self.modality_fusion.branch_weights
        for name, f in fused.extra.items():
            head_name = name.split(":", 1)[0]  # "modality:rgb" and "modality:nir" share the head "modality"
            head = self.extra_heads[head_name] if head_name in self.extra_heads else None
            extra[name] = Branch(f, *head(f), weights.get(head_name, 1.0)) if head is not None else \
                Branch(f, None, None)
        semantic = self.sdm(feats) if self.sdm is not None else None
        clip_global = consistency_feat = None
        if self._clip_teacher is not None and self.training and self.anchor in images:
            clip_global = self._teacher_feature(images[self.anchor])
            consistency_feat = self.consistency_head(torch.stack(list(feats.values())).mean(0))
        return ReIDOutput(feat=feat, bn_feat=bn, logits=logits, modality_feats=feats, encoder=enc,
                          semantic=semantic, clip_global=clip_global, consistency_feat=consistency_feat,
                          extra=extra, aux_losses=dict(fused.losses), test_feat=fused.test_feat,
                          trains_feat=self.head is not None)

    def _text_tokens(self, images: Dict[str, torch.Tensor], captions: Dict[str, torch.Tensor]
                     ) -> Dict[str, Dict[str, torch.Tensor]]:
        """IDEA: every image modality's caption -> its inverted-text token per tower, {m: {tower: [B, D]}}."""
        lacking = [m for m in images if m not in captions]
        if lacking:
            raise ValueError(f"model.inverted_text reads a caption per image modality; {lacking} came without one "
                             f"(pass its token ids under '{lacking[0]}:caption'; data.modality_captions=true)")
        return self.inverted_text({m: captions[m] for m in images})

    @torch.no_grad()
    def _teacher_feature(self, rgb: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP tower's global feature [B, C] of RGB images normalised for this model."""
        teacher = self._clip_teacher
        if next(teacher.parameters()).device != rgb.device:
            teacher.to(rgb.device)
        scale, shift = (t.to(rgb) for t in self._teacher_renorm)
        return teacher.embed(rgb * scale + shift).float()

    def _encode(self, images: Dict[str, torch.Tensor], cam_ids: Optional[torch.Tensor],
                view_ids: Optional[torch.Tensor], text_tokens: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
                ) -> Dict[str, EncoderOutput]:
        """Run the shared encoder on every modality. All modalities share every weight, so images of
        one shape go through as one batch of ``M*B`` (a quickstart step: 79 ms instead of 127 ms with
        ``M`` calls; identical results) and are split again. With modality experts (tokenizers,
        LoRA, prompts) or a tower copy per modality every modality takes its own pass."""
        shapes = {tuple(x.shape) for x in images.values()}
        tokens = text_tokens or {}
        if len(images) == 1 or len(shapes) > 1 or self.encoder.has_experts:  # experts: one pass per modality
            return {m: self.encoder(x, cam_ids, view_ids, m, tokens.get(m)) for m, x in images.items()}
        n, b = len(images), next(iter(shapes))[0]
        rep = lambda t: None if t is None else t.repeat(n)  # noqa: E731
        joint = {t: torch.cat([tokens[m][t] for m in images]) for t in tokens[next(iter(images))]} if tokens else None
        out = self.encoder(torch.cat(list(images.values())), rep(cam_ids), rep(view_ids), text_tokens=joint)

        def part(t: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
            return None if t is None else t[i * b:(i + 1) * b]

        def split(outs: Dict[str, BackboneOutput], i: int) -> Dict[str, BackboneOutput]:
            return {t: BackboneOutput(part(o.cls, i), part(o.patches, i), o.grid, shared=part(o.shared, i),
                                      text=part(o.text, i)) for t, o in outs.items()}

        return {m: EncoderOutput(
            feat=part(out.feat, i), tower_feats={t: part(f, i) for t, f in out.tower_feats.items()},
            towers=split(out.towers, i), projected=split(out.projected, i),
            shared=None if out.shared is None else part(out.shared, i))
            for i, m in enumerate(images)}

    def param_groups(self) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
        """Trainable parameters by named group (each gets its own learning rate, ``optim.group_lr``).

        ``backbone``: the towers' pretrained transformer weights; ``lora``: MER experts;
        ``tokenizers``: per-modality patch embeddings; ``prompts``: MambaPro's prompts and parallel
        adapters; ``projections``: projectors into the shared
        space (CLIP's reused one included); ``head``: BNNeck and classifier; ``other``: camera
        embeddings, multi-scale extractors, fusions and whatever else is added.
        """
        groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {g: [] for g in PARAM_GROUPS}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[param_group_of(name)].append((name, p))
        return groups


PARAM_GROUPS = ("backbone", "lora", "tokenizers", "prompts", "projections", "head", "other")


def group_learning_rates(groups: Sequence[str], lr: float, group_lr: Dict[str, float]) -> Dict[str, float]:
    """``{group: lr}``: ``group_lr`` (``optim.group_lr``) where given, else ``lr``; an unknown group is an error."""
    unknown = [g for g in group_lr if g not in groups]
    if unknown:
        raise ValueError(f"optim.group_lr: unknown group {unknown[0]!r}; groups are {list(groups)}")
    return {g: group_lr.get(g, lr) for g in groups}


def param_group_of(name: str) -> str:
    """The :meth:`ReIDModel.param_groups` group of a parameter name."""
    if "lora_" in name:
        return "lora"
    if ".patch_embed.embeds." in name or ".patch_embed.adapters." in name:
        return "tokenizers"
    if name.startswith("encoder.backbones.") and ".parts." in name:
        return "prompts"
    if name.startswith("inverted_text.prompts"):  # IDEA's text prompts
        return "prompts"
    if (name.startswith("encoder.backbones.") and ".tower." in name) or name.startswith("text_encoder."):
        return "backbone"
    if name.startswith(("encoder.projectors.", "text_projector.")) or (
            name.startswith("encoder.backbones.") and ".proj." in name and ".tower." not in name):
        return "projections"
    if name.startswith(("head.", "extra_heads.")):
        return "head"
    return "other"


def build_model(cfg: ModelConfig, load_pretrained: bool = True, modalities: Sequence[str] = ("rgb",),
                anchor: str = "rgb") -> ReIDModel:
    """Build the model a :class:`ModelConfig` describes.

    Args:
        cfg: the ``model`` section.
        load_pretrained: False builds the architecture only (``run.py info``; no weight files needed).
        modalities: the input modalities (``data.modalities``), in the order the fusion uses.
        anchor: ``data.anchor_modality``: its tokenizer is the unperturbed copy and its images feed the
            CLIP consistency target.
    """
    image_mods = image_modalities(modalities)
    if not cfg.share_towers and not image_mods:
        raise ValueError(f"model.share_towers=false gives every image modality its own towers; data.modalities="
                         f"{list(modalities)} has no image modality")
    backbones: Dict[str, Union[Backbone, ModalityTowers]] = {}
    for t, spec in cfg.towers.items():
        try:
            if cfg.share_towers:
                backbones[t] = create_tower(spec, cfg.img_size, cfg.num_cams, cfg.num_views, load_pretrained)
            else:  # a copy per modality, each built (and loaded) from the same spec
                backbones[t] = ModalityTowers({m: create_tower(spec, cfg.img_size, cfg.num_cams, cfg.num_views,
                                                               load_pretrained) for m in image_mods})
        except (ValueError, CheckpointError) as e:
            raise type(e)(f"model.towers.{t}: {e}") from None
    # after the pretrained weights: experts start from them. A modality's own tower copy (share_towers: false)
    # needs only that modality's tokenizer / LoRA expert; prompts read every modality's.
    copies = [(t, m, b) for t, tower in backbones.items() for m, b in tower_copies(tower).items()]
    for t, copy_of, b in copies:
        mods = image_mods if copy_of is None else [copy_of]
        where = f"model.towers.{t}" + ("" if copy_of is None else f" ({copy_of} copy)")
        if cfg.freeze_backbone:  # the pretrained weights: the tower and CLIP's own projection
            for p in [*b.tower.parameters(), *(b.proj.parameters() if b.proj is not None else [])]:
                p.requires_grad_(False)
        if cfg.tokenizers.enabled:
            channels = {m: cfg.tokenizers.channels.get(m, get_modality(m).channels) for m in mods}
            b.experts.add_tokenizers(channels, cfg.tokenizers.perturb_std, seed=cfg.tokenizers.seed, anchor=anchor)
        if cfg.mer.enabled:
            try:
                b.experts.add_lora(mods, cfg.mer.rank, cfg.mer.alpha, cfg.mer.blocks, cfg.mer.dropout)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if cfg.prompts.enabled or cfg.adapters.enabled:
            try:
                b.install_prompts(image_mods, cfg.prompts.length if cfg.prompts.enabled else 0,
                                  cfg.adapters.ratio if cfg.adapters.enabled else 0.0)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    if cfg.inverted_text.enabled:  # IDEA: a slot for the inverted-text token in every tower (copy)
        for t, copy_of, b in copies:
            try:
                b.install_text_token()
            except ValueError as e:
                raise ValueError(f"model.towers.{t}" + ("" if copy_of is None else f" ({copy_of} copy)") + f": {e}") \
                    from None
    ms = cfg.multi_scale
    multi_scale = {t: MultiScaleExtractor(b.embed_dim, ms.window_sizes, ms.stride_ratio, ms.hidden_ratio)
                   for t, b in backbones.items()} if ms.enabled else None
    fusion = None
    if len(backbones) > 1:
        try:
            fusion = FUSIONS.get(cfg.fusion)(list(backbones), cfg.feat_dim, **cfg.fusion_kwargs)
        except KeyError as e:
            raise ValueError(f"model.fusion: {e.args[0]}") from None
        except TypeError as e:
            raise ValueError(f"model.fusion_kwargs for {cfg.fusion!r}: {e}") from None
    try:
        mfusion_cls = MODALITY_FUSIONS.get(cfg.modality_fusion)
    except KeyError as e:
        raise ValueError(f"model.modality_fusion: {e.args[0]}") from None
    encoder = ReIDEncoder(backbones, cfg.feat_dim, multi_scale, fusion, cfg.reuse_clip_proj, cfg.projector,
                          project_tokens=mfusion_cls.needs_tokens)
    towers_info = {t: TowerInfo(b.embed_dim, b.grid) for t, b in backbones.items()}
    try:
        mfusion = mfusion_cls(list(modalities), cfg.feat_dim, towers=towers_info, **cfg.modality_fusion_kwargs)
    except TypeError as e:
        raise ValueError(f"model.modality_fusion_kwargs for {cfg.modality_fusion!r}: {e}") from None
    except ValueError as e:
        raise ValueError(f"model.modality_fusion={cfg.modality_fusion}: {e}") from None
    for t, copy_of, b in copies:  # tower parts the modality fusion reads (MDReID's shared token)
        try:
            mfusion.setup_tower(b)
        except ValueError as e:
            raise ValueError(f"model.modality_fusion={cfg.modality_fusion} on model.towers.{t}"
                             + ("" if copy_of is None else f" ({copy_of} copy)") + f": {e}") from None
    sdm = SemanticDisentanglement(cfg.feat_dim, cfg.sdm.semantic_dim, cfg.sdm.heads) if cfg.sdm.enabled else None
    text = None
    if any(is_text(m) for m in modalities):
        tc = cfg.text
        try:
            text = TextEncoder(tc.arch, tc.pretrained if load_pretrained else None, tc.context_length,
                               **tc.tower_kwargs)
        except (ValueError, CheckpointError) as e:
            raise type(e)(f"model.text: {e}") from None
        if cfg.freeze_backbone:
            text.requires_grad_(False)
    inverted_text = None
    inverted = cfg.inverted_text
    if inverted.enabled:
        from .idea import InvertedText

        tc = cfg.text
        try:
            captions_tower = TextEncoder(tc.arch, tc.pretrained if load_pretrained else None, tc.context_length,
                                         **tc.tower_kwargs)
            inverted_text = InvertedText(captions_tower, {t: b.embed_dim for t, b in backbones.items()}, image_mods,
                                         inverted.prompt_length, inverted.hidden_ratio, inverted.dropout,
                                         inverted.template, inverted.bodies)
        except (ValueError, CheckpointError) as e:
            raise type(e)(f"model.inverted_text (its text tower: model.text): {e}") from None
    teacher = None
    if cfg.clip_consistency.weight > 0:  # a frozen CLIP beside any towers
        try:
            teacher = create_tower(cfg.clip_consistency.teacher, cfg.img_size, load_pretrained=load_pretrained)
        except (ValueError, CheckpointError) as e:
            raise type(e)(f"model.clip_consistency.teacher: {e}") from None
    head = ReIDHead(mfusion.out_dim, cfg.num_classes) if mfusion.feat_head else None
    return ReIDModel(encoder, head, mfusion, sdm, clip_teacher=teacher, text_encoder=text, feat_dim=cfg.feat_dim,
                     anchor=anchor, num_classes=cfg.num_classes, inverted_text=inverted_text)


def parameter_summary(model: ReIDModel) -> Dict[str, object]:
    """Parameters per component: ``{"components": {name: {"params", "trainable"}}, "total", ...}``.

    Components are ``<tower>.tower``, ``<tower>.sie``, ``<tower>.multi_scale``, ``<tower>.projector``,
    ``<tower>.prompts`` and ``<tower>.adapters`` (MambaPro's), ``<tower>.shared_token`` (MDReID's),
    ``<tower>.text_token`` and ``inverted_text.{tower,prompts,inverse}`` (IDEA's), ``fusion``,
    ``modality_fusion.<part>`` for the parts a modality fusion names (``components()``: DeMo's
    ``pife``, ``hdm``, ``atmoe``, TOP-ReID's ``tpm`` and ``crm``), ``modality_fusion`` (the rest of it,
    when it has parameters, e.g. the Mamba aggregation), ``head`` and ``head.<branch>`` for each extra
    branch; a parameter shared by two (CLIP's reused projection) is counted once, under the projector.
    Per-modality towers (``model.share_towers: false``) list ``<tower>.<modality>.tower``, ``.sie``,
    ``.prompts``, ``.adapters`` for every copy.
    """
    enc = model.encoder
    parts: Dict[str, object] = {}
    names = {}  # tower name -> the prefix of each copy's components
    for t, tower in enc.backbones.items():
        names[t] = []
        for m, b in tower_copies(tower).items():
            key = t if m is None else f"{t}.{m}"
            names[t].append(key)
            parts[f"{key}.sie"] = b.sie
            p = b.parts
            parts[f"{key}.prompts"] = [] if p is None or p.prompts is None else \
                [*p.prompts.parameters(), *p.cross.parameters(), *p.transfer.parameters()]
            parts[f"{key}.adapters"] = p.adapters if p is not None else None
            parts[f"{key}.shared_token"] = b.shared_token
            parts[f"{key}.text_token"] = b.text_token
        parts[f"{t}.multi_scale"] = enc.multi_scale[t] if t in enc.multi_scale else None
        parts[f"{t}.projector"] = [q for m in tower_copies(tower) for q in enc.projector(t, m).parameters()]
    it = model.inverted_text
    parts["inverted_text.tower"] = it.text if it is not None else None
    parts["inverted_text.prompts"] = [it.prompts] if it is not None and it.prompts is not None else []
    parts["inverted_text.inverse"] = it.inverse if it is not None else None
    parts["fusion"] = enc.fusion
    parts["text.projector"] = model.text_projector
    for name, m in model.modality_fusion.components().items():  # counted on their own, the rest below
        parts[f"modality_fusion.{name}"] = m
    parts["modality_fusion"] = model.modality_fusion
    parts["head"] = model.head
    for name, h in model.extra_heads.items():
        parts[f"head.{name}"] = h
    seen: set = set()

    def count(params) -> Dict[str, int]:
        ps = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in ps)
        return {"params": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}

    comps = {name: count(m if isinstance(m, list) else m.parameters() if m is not None else [])
             for name, m in parts.items()}
    for t, tower in enc.backbones.items():  # what is left of each backbone is the tower itself
        for key, b in zip(names[t], tower_copies(tower).values()):
            comps[f"{key}.tower"] = count(b.parameters())
    comps["text.tower"] = count(model.text_encoder.parameters() if model.text_encoder is not None else [])
    rest = count(model.parameters())
    if rest["params"]:
        comps["other"] = rest
    order = []
    per_tower = ("tower", "sie", "prompts", "adapters", "shared_token", "text_token")
    for t in enc.backbones:
        if names[t] == [t]:  # one tower for every modality
            order += [f"{t}.{c}" for c in per_tower[:4] + ("multi_scale",) + per_tower[4:] + ("projector",)]
        else:  # a copy per modality
            order += [f"{k}.{c}" for k in names[t] for c in per_tower]
            order += [f"{t}.multi_scale", f"{t}.projector"]
    order += ["text.tower", "text.projector", "inverted_text.tower", "inverted_text.prompts", "inverted_text.inverse",
              "fusion", *(f"modality_fusion.{n}" for n in model.modality_fusion.components()), "modality_fusion",
              "head", *(f"head.{n}" for n in model.extra_heads), "other"]

    def optional(k: str) -> bool:  # listed only when the model has them
        return k.startswith(("text.", "inverted_text.", "modality_fusion")) or (k == "head" and model.head is None) \
            or k.endswith((".prompts", ".adapters", ".shared_token", ".text_token"))

    comps = {k: comps[k] for k in order if k in comps and (comps[k]["params"] or not optional(k))}
    total = sum(c["params"] for c in comps.values())
    trainable = sum(c["trainable"] for c in comps.values())
    share = {t: comps[f"{t}.multi_scale"]["params"] / max(1, comps[f"{names[t][0]}.tower"]["params"])
             for t in enc.backbones}
    return {"components": comps, "total": total, "trainable": trainable, "frozen": total - trainable,
            "grid": {t: list(g) for t, g in enc.grids.items()}, "multi_scale_share": share}

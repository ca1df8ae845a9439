"""The config schema: one dataclass per YAML section. Defaults are the design's numbers."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from ..data.datasets import DEFAULT_CAMERA_PATTERN
from ..data.synth import SynthSpec
from .core import ConfigError, deep_merge, from_dict, load_yaml, parse_overrides, resolve_config_path


@dataclass
class TowerConfig:
    """One image tower (an entry of ``model.towers``, or the ``model.clip`` / ``model.vit`` shorthand).

    Attributes:
        arch: an open_clip model name (``ViT-B-16-quickgelu``) or any timm ViT-family name
            (``vit_base_patch16_224``, ``deit_base_distilled_patch16_224``, ``vit_small_patch14_reg4_dinov2``,
            ``vit_base_patch16_siglip_256``, ``eva02_small_patch14_224``, ``vit_base_patch16_clip_224``).
        pretrained: local checkpoint path, or null for random init. Never downloaded.
        stride: patch stride; null = patch size (no overlap); 12 gives the 21x10 grid at 256x128.
        sie_coef: scale of the camera/view embedding.
        sie_mode: ``all`` adds it to every token (TransReID), ``cls`` to the class token only
            (CLIP-ReID; a tower without a class token refuses it).
        drop_path: stochastic depth rate of the tower.
        tower_kwargs: architecture overrides (``width``, ``layers``, ``heads``, ``mlp_ratio``,
            ``out_dim``), used for tiny test towers.
        source: ``auto`` (an open_clip name is built from open_clip's config, anything else by timm),
            ``open_clip`` or ``timm``.
        global_pool: the tower's global token: ``auto`` (its family's own: the class token; DeiT
            distilled: class and distillation token averaged; SigLIP: its attention pool), ``cls``,
            ``map`` (attention pool) or ``avg`` (mean of the patch tokens).
        distill_token: DeiT distilled towers: ``average`` it with the class token (DeiT's inference)
            or ``drop`` it.
        mean, std: the input normalisation this tower expects; null = its pretraining's own (CLIP's,
            ImageNet's ...). MambaPro and DeMo feed every tower mean = std = 0.5.
    """

    arch: str = "ViT-B-16-quickgelu"
    pretrained: Optional[str] = None
    stride: Optional[int] = None
    sie_coef: float = 1.0
    sie_mode: Literal["all", "cls"] = "all"
    drop_path: float = 0.0
    tower_kwargs: Dict[str, Any] = field(default_factory=dict)
    source: Literal["auto", "open_clip", "timm"] = "auto"
    global_pool: Literal["auto", "cls", "map", "avg"] = "auto"
    distill_token: Literal["average", "drop"] = "average"
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None


@dataclass
class MultiScaleConfig:
    """Multi-scale sliding-window extractor added to each tower's CLS token."""

    enabled: bool = False
    window_sizes: List[int] = field(default_factory=lambda: [4, 8, 16])
    stride_ratio: float = 0.5
    hidden_ratio: float = 0.25


@dataclass
class TokenizerConfig:
    """Non-shared patch embeddings, one per image modality, copied from the tower's own.

    Attributes:
        enabled: give every image modality its own tokenizer on every tower.
        channels: ``{modality: 1 or 3}`` input channels (default 3); a 1-channel tokenizer starts as
            the sum of the RGB kernels.
        perturb_std: Gaussian noise added to non-RGB tokenizers at build time (seed 003: 0.02).
        seed: RNG seed of that noise.
    """

    enabled: bool = False
    channels: Dict[str, int] = field(default_factory=dict)
    perturb_std: float = 0.02
    seed: int = 0


@dataclass
class MERConfig:
    """Modality-expert LoRA: one peft adapter per image modality on the shared blocks.

    Attributes:
        enabled: install the experts on every tower.
        rank, alpha: LoRA rank and alpha (scale alpha / rank).
        blocks: indices of the blocks that get adapters (null = all).
        dropout: LoRA dropout.
    """

    enabled: bool = False
    rank: int = 4
    alpha: float = 1.0
    blocks: Optional[List[int]] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.mer.rank must be >= 1, got {self.rank}")


@dataclass
class PromptConfig:
    """MambaPro's synergistic residual prompts in every block of every tower (routed by modality).

    Attributes:
        enabled: add them. length: prompt tokens per modality and block (MambaPro: 4).
    """

    enabled: bool = False
    length: int = 4

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"model.prompts.length must be >= 1, got {self.length}")


@dataclass
class AdapterConfig:
    """MambaPro's parallel feed-forward adapters in every block of every tower.

    Attributes:
        enabled: add them. ratio: hidden width / tower width (MambaPro: 2).
    """

    enabled: bool = False
    ratio: float = 2.0


@dataclass
class TextConfig:
    """The CLIP text tower used for the ``text`` modality (built only when ``data.modalities`` has it).

    Attributes:
        arch: open_clip model name whose text tower is built.
        pretrained: a CLIP checkpoint (the same file as ``model.clip.pretrained`` works), or null.
        context_length: tokens per caption.
        tower_kwargs: ``width``, ``layers``, ``heads``, ``out_dim`` overrides (tiny towers).
    """

    arch: str = "ViT-B-16-quickgelu"
    pretrained: Optional[str] = None
    context_length: int = 77
    tower_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class InvertedTextConfig:
    """IDEA's inverted text: every image modality's own caption, read by a frozen CLIP text tower
    (``model.text``: arch, pretrained, context_length) with learnable prompts, becomes one more token of
    that modality's image in every tower (:mod:`hybrid_reid.models.idea`). Needs
    ``data.modality_captions``.

    Attributes:
        enabled: build it (and the towers' text-token slots).
        prompt_length: learnable prompt vectors, placed on the template's "X" words (IDEA: 2 on
            RGBNT201, 1 on RGBNT100 / MSVR310).
        hidden_ratio: the InverseNet's hidden width / the text embedding width (IDEA: 4).
        dropout: the InverseNet's dropout (IDEA: 0.1).
        template: the modality templates: ``person`` (RGBNT201), ``vehicle`` (MSVR310),
            ``vehicle_short`` (RGBNT100) or ``custom`` (only ``bodies``).
        bodies: ``{modality: text}`` after the placeholders, over the template's (a new modality needs one).
    """

    enabled: bool = False
    prompt_length: int = 2
    hidden_ratio: float = 4.0
    dropout: float = 0.1
    template: str = "person"
    bodies: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_length < 0 or self.hidden_ratio <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.inverted_text: prompt_length must be >= 0, hidden_ratio > 0, dropout in [0, 1)")


@dataclass
class SDMConfig:
    """Semantic disentanglement module (seed 003); its alignment loss is ``loss.sdm``."""

    enabled: bool = False
    semantic_dim: int = 512
    heads: int = 8


@dataclass
class ClipConsistencyConfig:
    """CLIP consistency loss (seed 004): the fused feature aligned to a frozen CLIP's global RGB feature.

    Attributes:
        weight: loss weight once fully on (0 = off).
        teacher: the frozen CLIP tower's spec (default OpenAI ViT-B/16, ``ViT-B-16-quickgelu``; set
            its ``pretrained`` file), built beside any towers, never trained.
        schedule: ``[[epoch, factor], ...]``: from ``epoch`` on the weight is ``factor * weight``
            (default 0 for 10 epochs, then 0.1x, then 1x from epoch 20: 0 -> 0.001 -> 0.01 at 0.01).
        temperature: cosine / temperature, never below ``min_temperature``.
        min_temperature: the floor (seed 004: 0.1; 0.07 made it explode).
        clamp: features are clamped to [-clamp, clamp] first.
        gradient_flow_ratio: share of the gradient that reaches the CLIP feature
            (``f * r + f.detach() * (1 - r)``; 0 = CLIP is a fixed target).
    """

    weight: float = 0.0
    teacher: TowerConfig = field(default_factory=lambda: _clip_default(sie_mode="all"))
    schedule: List[Tuple[int, float]] = field(default_factory=lambda: [(0, 0.0), (10, 0.1), (20, 1.0)])
    temperature: float = 0.1
    min_temperature: float = 0.1
    clamp: float = 10.0
    gradient_flow_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.min_temperature <= 0:
            raise ValueError("model.clip_consistency.min_temperature must be > 0")
        if not 0.0 <= self.gradient_flow_ratio <= 1.0:
            raise ValueError("model.clip_consistency.gradient_flow_ratio must be in [0, 1]")


def _clip_default(sie_mode: str = "cls") -> TowerConfig:
    return TowerConfig(arch="ViT-B-16-quickgelu", sie_coef=1.0, sie_mode=sie_mode)


def _vit_default() -> TowerConfig:
    # drop_path 0.1: how TransReID and MambaPro train the ImageNet ViT
    return TowerConfig(arch="vit_base_patch16_224", stride=12, sie_coef=3.0, sie_mode="all", drop_path=0.1)


#: ``model.backbone`` shorthands: the towers each expands to (from the ``model.clip`` / ``model.vit`` specs)
BACKBONE_SHORTHANDS = {"clip": ("clip",), "vit": ("vit",), "hybrid": ("clip", "vit")}
SHORTHAND_KEYS = ("backbone", "clip", "vit")


@dataclass
class ModelConfig:
    """The image encoder: towers -> multi-scale -> projectors -> tower fusion -> BNNeck head.

    Attributes:
        towers: ``{name: TowerConfig}``, in order: one tower is a single backbone, two or more a
            hybrid fused by ``fusion`` (e.g. ``{clip: ..., vit: ..., dino: {arch:
            vit_small_patch14_reg4_dinov2}}``). The first tower's mean/std normalises the input.
        backbone: the shorthand ``clip``, ``vit`` or ``hybrid`` (both), expanded to ``towers`` from
            the ``clip`` / ``vit`` specs when ``towers`` is not given. A config file that sets
            ``towers`` overrides a shorthand it inherits; setting both in one file is an error.
        clip, vit: the shorthand's tower specs (defaults: OpenAI CLIP ViT-B/16 at stride 16 with the
            camera embedding on the class token; ImageNet ViT-B/16 at stride 12, camera embedding on
            every token, drop_path 0.1).
        fusion: registered tower fusion used by a hybrid (``concat``, ``sum``, ``gated``, ``cross_attn``).
        fusion_kwargs: extra constructor arguments of the fusion (e.g. ``heads`` for cross_attn).
        modality_fusion: how the modalities are combined (a registered modality fusion: ``concat``:
            [B, M*F] as TOP-ReID / MambaPro; ``mean``: [B, F]; ``mamba``: MambaPro's aggregation of
            the modalities' tokens, ...), with ``modality_fusion_kwargs``.
        feat_dim: the shared feature space F every tower is projected into.
        reuse_clip_proj: use CLIP's own 512-d projection as its projector when ``feat_dim`` matches.
        projector: ``linear`` (a learned map of each tower into F) or ``identity`` (the tower's own
            width is F, as the peers' ImageNet-ViT models use the raw class token).
        img_size: network input (height, width).
        num_cams, num_views: rows of the camera/view embedding (0 = off). ``run.py train``/``eval``
            replace a positive value by the data set's count.
        num_classes: identities of the ID classifier (0 = no classifier); ``train``/``eval`` set it
            from the training split.
        share_towers: every image modality goes through the same towers (true, the default), or each
            gets its own copy of every tower (false; TOP-ReID's one ViT per modality): own weights,
            own camera table, built and loaded from the same tower spec and pretrained file, the
            modality routing its images to its copy. Projectors, multi-scale extractors, the tower
            fusion and the heads stay one per tower name.
        freeze_backbone: freeze the towers' pretrained weights, CLIP's own projection included (with
            ``mer.enabled``: LoRA-only training; tokenizers, prompts, adapters, SIE, learned projectors
            and heads still train).
        tokenizers: per-modality patch embeddings (:class:`TokenizerConfig`).
        mer: per-modality LoRA experts (:class:`MERConfig`).
        prompts, adapters: MambaPro's per-block modality prompts and parallel adapters in the towers
            (:class:`PromptConfig`, :class:`AdapterConfig`).
        sdm: semantic disentanglement module (:class:`SDMConfig`).
        text: the CLIP text tower for the ``text`` modality (:class:`TextConfig`), with any backbone;
            also the one ``inverted_text`` reads captions with.
        inverted_text: IDEA's per-modality caption tokens (:class:`InvertedTextConfig`).
        clip_consistency: CLIP consistency loss (:class:`ClipConsistencyConfig`) against a frozen
            CLIP image tower (its ``teacher`` spec), beside any towers.
        sync_bn: BatchNorm layers (the BNNeck ...) normalise with the statistics of the global batch
            when several processes train, so R processes train the model one process does. null
            (default) = on whenever several processes train; false = per-process statistics.
    """

    backbone: Literal["clip", "vit", "hybrid"] = "clip"
    fusion: str = "concat"
    fusion_kwargs: Dict[str, Any] = field(default_factory=dict)
    modality_fusion: str = "concat"
    modality_fusion_kwargs: Dict[str, Any] = field(default_factory=dict)
    feat_dim: int = 512
    reuse_clip_proj: bool = True
    projector: Literal["linear", "identity"] = "linear"
    img_size: Tuple[int, int] = (256, 128)
    num_cams: int = 0
    num_views: int = 0
    num_classes: int = 0
    clip: TowerConfig = field(default_factory=_clip_default)
    vit: TowerConfig = field(default_factory=_vit_default)
    multi_scale: MultiScaleConfig = field(default_factory=MultiScaleConfig)
    share_towers: bool = True
    freeze_backbone: bool = False
    tokenizers: TokenizerConfig = field(default_factory=TokenizerConfig)
    mer: MERConfig = field(default_factory=MERConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    sdm: SDMConfig = field(default_factory=SDMConfig)
    text: TextConfig = field(default_factory=TextConfig)
    inverted_text: InvertedTextConfig = field(default_factory=InvertedTextConfig)
    clip_consistency: ClipConsistencyConfig = field(default_factory=ClipConsistencyConfig)
    sync_bn: Optional[bool] = None
    towers: Dict[str, TowerConfig] = field(default_factory=dict)

    #: written as ``towers`` alone (the resolved config); the shorthand is input only
    _DUMP_EXCLUDE = ("backbone", "clip", "vit")

    def __post_init__(self) -> None:
        if self.feat_dim <= 0:
            raise ValueError(f"model.feat_dim must be positive, got {self.feat_dim}")
        if min(self.img_size) <= 0:
            raise ValueError(f"model.img_size must be positive, got {self.img_size}")
        if self.num_cams < 0 or self.num_views < 0:
            raise ValueError("model.num_cams / model.num_views must be >= 0")
        if not self.towers:
            self.towers = {t: getattr(self, t) for t in BACKBONE_SHORTHANDS[self.backbone]}
        for name in self.towers:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"model.towers: {name!r} is not a usable tower name (letters, digits, _)")

    def _partial_base(self) -> Dict[str, Any]:
        """The defaults a partial ``model:`` section is merged over: the shorthand, not its expansion
        (so ``{backbone: hybrid}`` expands to both towers)."""
        from .core import to_dict

        out = {f: to_dict(getattr(self, f)) for f in self.__dataclass_fields__ if f != "towers"}
        return out

    @property
    def label(self) -> str:
        """The backbone as a short name: ``clip``, ``vit`` or ``hybrid`` for the shorthand's tower names,
        otherwise the tower names joined by ``+`` (``clip+vit+dino``)."""
        for short, names in BACKBONE_SHORTHANDS.items():
            if tuple(self.towers) == names:
                return short
        return "+".join(self.towers)


@dataclass
class DataConfig:
    """Data set, modalities, batching and augmentation.

    Attributes:
        name: registered data set (``rgbnt201``, ``synthetic``, ``market1501``, ``msmt17``, ``veri776``,
            ``folder``, ``manifest`` ...).
        root: the folder that contains the data set's folder (``RGBNT201/``); for ``synthetic``,
            null = a cache folder (``$HYBRID_REID_CACHE``, default ``~/.cache/hybrid_reid``).
        modalities: input modalities, in fusion order (aliases such as ``ni``, ``ti`` accepted).
        batch_size: P*K images per optimizer micro-step over all processes.
        num_instances: K images per identity (P = batch_size / K identities per batch).
        test_batch_size: images per process and step at evaluation.
        num_workers: loader worker processes per training process.
        cache_images: decode and resize every image once before training (uint8 in RAM, about
            3*H*W bytes per image and modality); each step then only augments.
        flip_prob, pad, erasing_prob: augmentation (flip, pad + random crop, random erasing).
        synth: generator parameters for ``synthetic``.
        anchor_modality: the modality the others are aligned to (SDM, CLIP consistency) and the
            gallery of the ``orbench`` protocol (default ``rgb``).
        modality_dirs: ``{modality: folder}`` added to (or overriding) the data set's own modality
            folders, for a modality declared in the config's ``modalities:`` section (RGBNT201-style,
            MSVR310 and ``folder`` layouts), e.g. ``{depth: Depth}``.
        camera_pattern: ``folder`` only: a regular expression with a named group ``camera``, searched
            in each file's stem, for the files ``ROOT/cameras.csv`` does not list (default: ``c3``,
            ``c003`` or ``cam3`` at the start of the name or after ``_``).
        manifest: ``manifest`` only: the CSV / JSON-lines file (a relative path is read against
            ``root``); null = ``root/manifest.csv`` (else ``manifest.jsonl``). The image paths in its
            rows are relative to the manifest's own folder.
        modality_captions: read a caption per image of every image modality, IDEA's layout:
            ``<DATASET>/text/{train,test}_{RGB,NI,TI}.json`` (RGBNT100: ``RGBNT100/rgbir/text/``; a
            declared modality: ``_<its folder>.json``), JSON lists of ``{"item": <image file name>,
            "description": <caption>}``, matched by file name; ``train_*`` for the training split,
            ``test_*`` for query and gallery. rgbnt201, rgbnt100, msvr310 and synthetic.
        missing_caption: an image without a caption entry is an ``error`` (naming file and image), or
            gets an ``empty`` description (IDEA's reader; counted in a warning).
    """

    name: str = "rgbnt201"
    root: Optional[str] = None
    modalities: List[str] = field(default_factory=lambda: ["rgb", "nir", "tir"])
    batch_size: int = 64
    num_instances: int = 8
    test_batch_size: int = 128
    num_workers: int = 4
    cache_images: bool = False
    flip_prob: float = 0.5
    pad: int = 10
    erasing_prob: float = 0.5
    synth: SynthSpec = field(default_factory=SynthSpec)
    anchor_modality: str = "rgb"
    modality_dirs: Dict[str, str] = field(default_factory=dict)
    camera_pattern: str = DEFAULT_CAMERA_PATTERN
    manifest: Optional[str] = None
    modality_captions: bool = False
    missing_caption: Literal["error", "empty"] = "error"

    def __post_init__(self) -> None:
        try:
            groups = re.compile(self.camera_pattern).groupindex
        except re.error as e:
            raise ValueError(f"data.camera_pattern={self.camera_pattern!r} is not a regular expression: {e}") from None
        if "camera" not in groups:
            raise ValueError(f"data.camera_pattern={self.camera_pattern!r} has no named group (?P<camera>...); e.g. "
                             f"{DEFAULT_CAMERA_PATTERN!r}")
        if not self.modalities:
            raise ValueError("data.modalities is empty; list at least one (e.g. [rgb, nir, tir])")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"data.modalities has duplicates: {self.modalities}")
        if self.batch_size <= 0 or self.num_instances <= 0 or self.batch_size % self.num_instances:
            raise ValueError(f"data.batch_size ({self.batch_size}) must be a positive multiple of "
                             f"data.num_instances ({self.num_instances})")


@dataclass
class OptimConfig:
    """AdamW (or Adam, or SGD) with a learning rate per parameter group.

    Attributes:
        name: ``adamw`` (decoupled weight decay), ``adam`` (L2 weight decay in the gradient, as the
            TransReID-lineage code uses: MambaPro, DeMo, IDEA ...) or ``sgd`` (with ``momentum`` and
            L2 weight decay; TransReID's and TOP-ReID's default).
        momentum: SGD's momentum (``sgd`` only).
        bias_lr_factor: biases train at this multiple of their group's rate (the peers' 2.0).
        lr: learning rate of every group not listed in ``group_lr`` (seed 003: 5e-5).
        group_lr: ``{group: lr}`` (default: the pretrained ``backbone`` at 1e-5). Groups:
            ``backbone``, ``lora``, ``tokenizers``, ``projections``, ``head``, ``other``
            (:meth:`hybrid_reid.models.ReIDModel.param_groups`).
        weight_decay: decoupled weight decay; never applied to biases, norms, position/class
            embeddings and other 1-d parameters.
        betas: AdamW betas.
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = 0.9
    lr: float = 5e-5
    group_lr: Dict[str, float] = field(default_factory=lambda: {"backbone": 1e-5})
    bias_lr_factor: float = 1.0
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)


#: ``train.log_with`` names -> the package each needs (None: built in)
TRACKERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: training epochs (0 = evaluate the initial model only).
        warmup_epochs: linear warm-up from ``warmup_factor`` x lr, then cosine decay to
            ``min_lr_ratio`` x lr; stepped every optimizer step.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (Accelerate).
        grad_accum: micro-batches per optimizer step.
        clip_grad_norm: max gradient norm (0 = off).
        eval_every: evaluate every N epochs (0 = only after the last one).
        log_every: log every N optimizer steps.
        keep_checkpoints: how many epoch checkpoints to keep in ``OUTPUT_DIR/checkpoints``.
        max_bad_steps: consecutive non-finite steps (loss or gradient norm NaN/inf; each is
            skipped) after which the run stops with a checkpoint of the last good state.
        deterministic: bitwise-repeatable GPU runs: ``torch.use_deterministic_algorithms``, cuDNN
            deterministic with autotuning off, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (slower kernels;
            CPU runs are repeatable without it).
        compile: wrap the model in ``torch.compile`` (the training forward has no graph breaks).
        shards: train every global batch as this many independent shards (each ``batch_size /
            shards`` samples, identities dealt round-robin), every shard with its own BatchNorm
            statistics and its own triplet mining, as the authors' multi-GPU runs without SyncBN
            do; the shard gradients are summed in shard order. Then 1, 2 ... ``shards`` processes
            (any count that divides it, same threads per process) give bitwise the same weights.
            One process runs its shards one after another; each shard's stochastic layers draw
            from a generator seeded by (seed, step, shard), and only shard 0 updates BatchNorm's
            running statistics. null (default): one shard per process, with ``model.sync_bn`` and
            gathered triplet mining (the global batch's statistics; the same computation, not the
            same bits, across process counts). Not combined with ``grad_accum`` > 1.
        log_with: experiment trackers, through Accelerate: ``tensorboard``, ``wandb``, ``mlflow``,
            ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio`` (each needs its
            package; a missing one is an error naming it), and ``csv`` (``OUTPUT_DIR/log.csv``, which
            every run writes anyway). The resolved config goes to each as hyper-parameters; ``[]``
            for none.
    """

    epochs: int = 60
    warmup_epochs: float = 5.0
    warmup_factor: float = 0.01
    min_lr_ratio: float = 0.01
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accum: int = 1
    clip_grad_norm: float = 5.0
    eval_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    max_bad_steps: int = 10
    deterministic: bool = False
    compile: bool = False
    shards: Optional[int] = None
    log_with: List[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        unknown = [t for t in self.log_with if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"train.log_with: {unknown} unknown; choose from {', '.join(TRACKERS)}")
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.epochs < 0 or self.grad_accum < 1 or self.keep_checkpoints < 1:
            raise ValueError("train.epochs must be >= 0, train.grad_accum and train.keep_checkpoints >= 1")
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"train.shards must be >= 1 (or null), got {self.shards}")
        if self.shards is not None and self.grad_accum > 1:
            raise ValueError(f"train.shards={self.shards} with train.grad_accum={self.grad_accum}: use one of them "
                             "(shards already split each step's batch into micro-batches)")


def _default_losses() -> Dict[str, Dict[str, Any]]:
    return {"id": {"weight": 1.0, "label_smoothing": 0.1}, "triplet": {"weight": 1.0, "margin": None},
            "sdm": {"weight": 0.1, "temperature": 0.1, "margin": 0.3}}


@dataclass
class EvalConfig:
    """Evaluation.

    Attributes:
        metric: ``euclidean`` or ``cosine``, on L2-normalised features.
        feat: ``bn`` (after the BNNeck, the peers' test feature) or ``pre`` (before it).
        max_rank: length of the CMC curve.
        query_modalities, gallery_modalities: the modalities the query / gallery features are
            computed from (any non-empty subset of ``data.modalities``, e.g. ``[nir]`` or
            ``[sketch, text]``; null = all). Absent modalities are simply left out.
        protocol: ``market`` (same pid and camera removed per query); ``msvr310`` (same pid and
            *scene* removed, MSVR310's rule); ``missing`` (RGBNT201-style: also every case with
            some modalities taken away from query and gallery alike, plus their average, under
            ``metrics.json``'s ``missing``); ``orbench`` (an RGB gallery against every query set,
            i.e. modality combination, no camera filtering; per set and averages by number of
            query modalities under ``metrics.json``'s ``orbench``).
        missing_fill: ``drop`` leaves the taken modalities out; ``zeros`` feeds zero images in
            their place (after normalisation, as DeMo does).
        rerank: k-reciprocal re-ranking (Zhong et al. 2017) of the distances, with ``rerank_k1``,
            ``rerank_k2`` and ``rerank_lambda`` (torchreid's defaults 20, 6, 0.3).
        aqe: alpha-weighted average query expansion of query and gallery features before ranking
            (fast-reid's ``TEST.AQE``), with ``aqe_k`` neighbours and weights ``sim ** aqe_alpha``.
        chunk_size: queries ranked at once (null: about 16M distances per chunk). Memory grows with
            ``chunk_size x gallery``, never ``query x gallery`` (except with ``rerank``, which needs
            the full matrix).
    """

    metric: Literal["euclidean", "cosine"] = "euclidean"
    feat: Literal["bn", "pre"] = "bn"
    max_rank: int = 50
    query_modalities: Optional[List[str]] = None
    gallery_modalities: Optional[List[str]] = None
    protocol: str = "market"
    missing_fill: Literal["drop", "zeros"] = "drop"
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    aqe: bool = False
    aqe_k: int = 5
    aqe_alpha: float = 3.0
    chunk_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_rank < 1 or self.aqe_k < 1 or self.rerank_k1 < 1 or self.rerank_k2 < 1:
            raise ValueError("eval.max_rank, eval.aqe_k, eval.rerank_k1 and eval.rerank_k2 must be >= 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"eval.chunk_size must be a positive number of queries or null, got {self.chunk_size}")
        from ..engine.evaluator import PROTOCOLS  # the registered protocols (market, msvr310, missing, orbench, ...)

        if self.protocol not in PROTOCOLS:
            close = difflib.get_close_matches(self.protocol, PROTOCOLS.names(), n=1)
            raise ValueError(f"eval.protocol: {self.protocol!r} is not a registered protocol {PROTOCOLS.names()}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))


@dataclass
class DebugConfig:
    """Fault injection, for testing a run's guards from outside.

    Attributes:
        nan_at_steps: global optimizer steps (1-based) whose loss is made NaN.
        pause_after_step: after this global optimizer step the main process writes
            ``OUTPUT_DIR/.paused`` (holding the step number) and waits until the file is deleted,
            so a test can kill or inspect a run at an exact point instead of after a sleep.
    """

    nan_at_steps: List[int] = field(default_factory=list)
    pause_after_step: Optional[int] = None


@dataclass
class ModalityConfig:
    """A modality declared in the config (``modalities: {depth: {channels: 1}}``).

    Attributes:
        kind: ``image`` or ``text``.
        channels: image channels of its tokenizer by default (1 or 3).
        aliases: other names data sets use for it.
        short: a letter for case names (RGBNT201's missing-modality table: r, n, t).
    """

    kind: Literal["image", "text"] = "image"
    channels: int = 3
    aliases: List[str] = field(default_factory=list)
    short: str = ""


@dataclass
class Config:
    """The whole run.

    ``loss`` maps a registered loss name to its arguments (``weight`` and the loss's own, e.g.
    ``label_smoothing``, ``margin``); a loss with weight 0 is skipped, and so is one the model has
    nothing for (``sdm`` without ``model.sdm.enabled``). ``modalities`` declares new modalities
    (:class:`ModalityConfig`; see :mod:`hybrid_reid.modalities`).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: Dict[str, Dict[str, Any]] = field(default_factory=_default_losses)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    modalities: Dict[str, ModalityConfig] = field(default_factory=dict)
    seed: int = 0
    output_dir: str = "outputs/run"

    def __post_init__(self) -> None:
        from .. import modalities as registry

        for name, m in self.modalities.items():  # declared modalities become known everywhere
            registry.register(registry.Modality(name, m.kind, m.channels, tuple(m.aliases), m.short))
        if self.model.inverted_text.enabled and not self.data.modality_captions:
            raise ValueError("model.inverted_text reads a caption per image modality: set data.modality_captions=true "
                             "(files <DATASET>/text/{train,test}_{RGB,NI,TI}.json)")


def merge_layer(merged: Dict[str, Any], layer: Dict[str, Any], where: str = "config") -> Dict[str, Any]:
    """Merge one config layer (a ``_base_`` file, a file, the overrides) over ``merged``.

    Everything deep-merges, except the towers: a layer that sets ``model.towers`` gets exactly the
    towers it lists (the mapping replaces, and an inherited ``model.backbone`` / ``model.clip`` /
    ``model.vit`` shorthand is dropped); a layer that sets ``model.backbone`` switches back to the
    shorthand. Setting ``model.towers`` and the shorthand in one layer, or ``model.clip`` /
    ``model.vit`` without ``model.backbone`` over inherited towers, is a :class:`ConfigError`.
    """
    model = layer.get("model") if isinstance(layer.get("model"), dict) else None
    if model is None:
        return deep_merge(merged, layer)
    short = [k for k in SHORTHAND_KEYS if model.get(k) is not None]
    inherited = merged.get("model") if isinstance(merged.get("model"), dict) else {}
    if "towers" in model and short:
        raise ConfigError(f"{where} sets both model.towers and model.{short[0]}; list the towers in model.towers only "
                          "(model.backbone / model.clip / model.vit are a shorthand for it)")
    if "towers" in model:
        towers = model["towers"]
        if not isinstance(towers, dict) or not towers:
            raise ConfigError(f"{where}: model.towers must be a non-empty mapping name -> tower spec, got {towers!r}")
        for name, spec in towers.items():
            if not isinstance(spec, dict) or "arch" not in spec:
                raise ConfigError(f"{where}: model.towers.{name} needs an arch (e.g. vit_base_patch16_224)")
        base = {k: v for k, v in inherited.items() if k not in SHORTHAND_KEYS and k != "towers"}
        rest = {k: v for k, v in model.items() if k != "towers"}
        out = deep_merge({**merged, "model": base}, {**layer, "model": rest})
        out["model"]["towers"] = towers
        return out
    if short and inherited.get("towers"):
        if "backbone" not in short:
            raise ConfigError(f"{where} sets model.{short[0]}, but this config lists its towers in model.towers; set "
                              f"model.towers.<name>.<key> instead (or model.backbone to switch to the shorthand)")
        merged = {**merged, "model": {k: v for k, v in inherited.items() if k != "towers"}}
    return deep_merge(merged, layer)


def _apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Dotted overrides as one layer: ``model.towers=<mapping>`` replaces the towers, a dotted key inside
    them (``model.towers.clip.pretrained=...``) edits the one tower."""
    whole = [o for o in overrides if o.split("=", 1)[0].strip() == "model.towers"]
    dotted = [o for o in overrides if o not in whole]
    layer = parse_overrides(dotted)
    model = layer.get("model") if isinstance(layer.get("model"), dict) else {}
    edits = model.pop("towers", None)
    if edits is not None:
        towers = (data.get("model") or {}).get("towers") or {}
        unknown = [t for t in edits if t not in towers]
        if unknown:
            raise ConfigError(f"override model.towers.{unknown[0]}...: there is no tower {unknown[0]!r} (towers: "
                              f"{list(towers) or 'none: this config uses the model.backbone shorthand'}); set the "
                              "whole mapping with model.towers={...}")
        data = deep_merge(data, {"model": {"towers": deep_merge(towers, edits)}})
    data = merge_layer(data, layer, "the overrides")
    if whole:
        data = merge_layer(data, parse_overrides(whole), "the overrides")
    return data


def load_config(path: Optional[Union[str, os.PathLike]] = None,
                overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``_base_`` chain), apply dotted ``overrides`` and validate. ``path`` may
    name a shipped config from any directory (``quickstart``, ``methods/mambapro``).

    Example:
        >>> cfg = load_config("configs/hybrid.yaml", ["model.fusion=gated"])
    """
    data = load_yaml(resolve_config_path(path), merge=merge_layer) if path is not None else {}
    return config_from_dict(data, overrides)


def config_from_dict(data: Dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """:func:`load_config` of a mapping instead of a file (e.g. the ``eval`` settings saved with features)."""
    data = _apply_overrides(dict(data), overrides)
    # losses are a dict keyed by name: merge into the defaults so ``loss.triplet.weight=0.5`` keeps ``id``
    data["loss"] = deep_merge(_default_losses(), data.get("loss") or {})
    return from_dict(Config, data)

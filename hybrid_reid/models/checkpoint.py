"""Reading pretrained tower weights from local files, safely, in every format the peers ship.

Formats understood (detected from content, not from the file name):

* safetensors (``.safetensors``);
* a torch pickle holding a state dict (plain, ``{"state_dict": ...}``, ``{"model": ...}``), read with
  ``weights_only=True`` only: a pickle that would run code is refused;
* OpenAI's TorchScript ``ViT-B-16.pt``: loaded with ``torch.jit.load`` (TorchScript's own loader,
  never a general unpickler) and reduced to its state dict;
* key layouts: OpenAI / open_clip CLIP (``visual.*``, converted by timm's own converter), timm ViT
  (the ``jx_vit_base_p16_224-80ecf9dd.pth`` TransReID starts from), TransReID / fast-reid trained
  models (``base.*`` / ``backbone.*`` prefix), DDP ``module.*`` prefix.

Positional embeddings are resized (bicubic, antialiased: the same numbers as open_clip's and timm's
own loaders) from a square pretraining grid to the tower's grid, including stride-12 grids.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

_logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unsafe, unreadable or does not fit the model."""


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    # torch.jit.save archives carry compiled code and a constants table; torch.save ones do not.
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict without executing any pickled code.

    Raises:
        CheckpointError: the file is missing, is a pickle that is not weights-only, or holds no tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (weights are never downloaded; "
                              "give a local file path or set pretrained to null)")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or head[8:9] == b"{":
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:  # safetensors raises its own error types
            if path.endswith(".safetensors"):
                raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    if _is_torchscript(path):
        try:
            obj = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: TorchScript archive could not be loaded: {e}") from None
        return {k: v for k, v in obj.state_dict().items()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that is not weights-only (loading it could run "
            f"arbitrary code). Re-save its state dict with torch.save(model.state_dict()) or "
            f"safetensors from a trusted environment. Detail: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: str) -> StateDict:
    """Find the tensor dict inside the usual wrappers (``state_dict``, ``model``, ``module``...)."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "state_dict_ema")
                          if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found (keys: {list(obj)[:8]})")
    return sd


def _strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@dataclass
class TowerCheckpoint:
    """A pretrained or peer-trained file brought to a timm tower's keys.

    Attributes:
        state: timm ``VisionTransformer`` / ``Eva`` keys (CLIP's projection as ``head.weight``).
        layout: the layout detected (``openai-clip``, ``timm``, ``transreid``, ``transreid-jpm``,
            ``fastreid``, ``clip-reid``, ``mambapro``).
        camera_table: a trained camera/view embedding found in the file ([rows, D]), or None.
        unused: keys of the file that are not the tower (heads, other branches, a text tower ...).
        notes: what was done beyond renaming, for the log.
    """

    state: StateDict
    layout: str
    camera_table: Optional[torch.Tensor] = None
    unused: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _split(sd: StateDict, prefix: str) -> Tuple[StateDict, List[str]]:
    """``(keys under prefix, stripped; the other keys)``."""
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside, [k for k in sd if not k.startswith(prefix)]


def _openai_to_timm(sd: StateDict, tower: Optional[nn.Module]) -> StateDict:
    """OpenAI / open_clip ``visual.*`` keys -> timm ViT keys with timm's public converter
    (``vision_transformer.checkpoint_filter_fn``, which also resamples the positional embedding to the
    tower's grid when it is given one)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    if tower is None:  # keys only: a stand-in whose patch kernel is the file's, and nothing to resample
        kernel = visual["visual.conv1.weight"]

        class _KeysOnly(nn.Module):
            pos_embed = None
            patch_embed = nn.Module()

        tower = _KeysOnly()
        tower.patch_embed.proj = nn.Module()
        tower.patch_embed.proj.weight = torch.empty(kernel.shape, device="meta")
    out = checkpoint_filter_fn(visual, tower)
    out.pop("head.bias", None)  # timm adds a zero bias; CLIP's projection has none
    return out


def to_timm_layout(sd: StateDict, tower: Optional[nn.Module] = None) -> TowerCheckpoint:
    """Bring any supported file to timm tower keys: OpenAI / open_clip CLIP, timm (ViT, DeiT, DINOv2,
    SigLIP, EVA as timm saves them), TransReID (``base.*``, its trained ``sie_embed`` and, for JPM
    models, the trained global branch ``b1`` = the last block and norm), fast-reid (``backbone.*``),
    CLIP-ReID (``image_encoder.*`` + ``cv_embed``) and MambaPro (``BACKBONE.base.*`` +
    ``BACKBONE.cv_embed``); a ``module.`` (DDP) prefix anywhere in front."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "visual.class_embedding" in sd:
        return TowerCheckpoint(_openai_to_timm(sd, tower), "openai-clip",
                               unused=[k for k in sd if not k.startswith("visual.")])
    if "image_encoder.class_embedding" in sd or "BACKBONE.base.class_embedding" in sd:  # CLIP-ReID / MambaPro (CLIP)
        clip_reid = "image_encoder.class_embedding" in sd
        prefix, table_key, layout = (("image_encoder.", "cv_embed", "clip-reid") if clip_reid
                                     else ("BACKBONE.base.", "BACKBONE.cv_embed", "mambapro"))
        inside, rest = _split(sd, prefix)
        state = _openai_to_timm({f"visual.{k}": v for k, v in inside.items()}, tower)
        unused = [k for k in rest if k != table_key]
        table = sd.get(table_key)  # [C*V, D] (CLIP-ReID, MambaPro) or [C, 1, D] (DeMo)
        return TowerCheckpoint(state, layout, None if table is None else table.flatten(1), unused)
    if "BACKBONE.base.pos_embed" in sd:  # MambaPro on the ImageNet ViT
        inside, rest = _split(sd, "BACKBONE.base.")
        table = inside.pop("sie_embed", None)
        return TowerCheckpoint(inside, "mambapro", None if table is None else table.flatten(1), rest)
    for prefix, layout in (("base.", "transreid"), ("backbone.", "fastreid")):
        if f"{prefix}pos_embed" in sd:
            inside, rest = _split(sd, prefix)
            table = inside.pop("sie_embed", None)
            ckpt = TowerCheckpoint(inside, layout, None if table is None else table.flatten(1), rest)
            if any(k.startswith("b1.0.") for k in sd):  # TransReID JPM: b1 = trained copy of the last block + norm
                last = max(int(k.split(".")[1]) for k in inside if k.startswith("blocks."))
                for k, v in sd.items():
                    if k.startswith("b1.0."):
                        inside[f"blocks.{last}.{k[len('b1.0.'):]}"] = v
                    elif k.startswith("b1.1."):
                        inside[f"norm.{k[len('b1.1.'):]}"] = v
                ckpt.unused = [k for k in rest if not k.startswith("b1.")]
                ckpt.layout = "transreid-jpm"
                ckpt.notes.append(f"the JPM model's trained global branch b1 loaded as blocks.{last} and norm "
                                  f"(base.blocks.{last} / base.norm are its untrained copies in the file)")
            return ckpt
    return TowerCheckpoint(dict(sd), "timm")


def resize_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], num_prefix: int = 1,
                     source: str = "checkpoint") -> torch.Tensor:
    """Resample ``pos_embed`` [1, P + T, D] to ``grid`` (bicubic, antialias, as timm and open_clip)."""
    from timm.layers import resample_abs_pos_embed

    n_tok = pos_embed.shape[1] - num_prefix
    if n_tok == grid[0] * grid[1]:
        return pos_embed
    side = int(round(math.sqrt(n_tok)))
    if side * side != n_tok:
        raise CheckpointError(f"{source}: pos_embed has {n_tok} patch positions, which is neither the "
                              f"model grid {grid[0]}x{grid[1]} nor a square grid to resize from")
    _logger.info("resizing pos_embed %dx%d -> %dx%d", side, side, *grid)
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[side, side],
                                  num_prefix_tokens=num_prefix)


def state_dict_problems(own: Dict[str, torch.Tensor], sd: Dict[str, torch.Tensor]) -> List[str]:
    """What keeps ``sd`` from loading strictly into a module whose state dict is ``own`` (first few keys)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched[:3]}")
    return problems


CLASSIFIER_SUFFIX = "classifier.weight"


def load_model_weights(model: nn.Module, path: Union[str, os.PathLike], inference: bool = False) -> str:
    """Load a whole-model checkpoint into ``model``: ``model.safetensors`` written by ``run.py train``,
    a folder that holds one (``OUTPUT_DIR/checkpoints/epoch_010``), any format of
    :func:`read_state_dict`, or a model saved by a published method's own code (its layout detected
    and renamed, :mod:`hybrid_reid.methods`: MambaPro ...).

    Every tensor the model needs must be in the file with its shape. Keys of a peer's model that
    this configuration has no place for are listed in one log line and ignored. With ``inference``
    (eval, extract), ID classifiers whose number of classes differs from the model's, and the heads of
    training branches this configuration does not have, are skipped: a test feature never uses them.

    Returns:
        The layout loaded (``hybrid_reid`` or a method's name).

    Raises:
        CheckpointError: the file is missing or does not fit; the message names it and the keys.
    """
    from ..methods import detect_layout

    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise CheckpointError(f"{path} is a folder without model.safetensors; pass a checkpoint folder "
                                  "(OUTPUT_DIR/checkpoints/epoch_NNN) or OUTPUT_DIR/model.safetensors")
        path = found
    sd = read_state_dict(path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    layout = detect_layout(sd)
    unused: List[str] = []
    if layout is not None:
        try:
            converted = layout.convert(sd)
        except KeyError as e:
            raise CheckpointError(f"{path} looks like a {layout.name} checkpoint, but key {e.args[0]!r} has no "
                                  "place in this project's layout") from None
        sd, unused = converted.state, list(converted.unused)
        for note in converted.notes:
            _logger.info("%s: %s", path, note)
    own = model.state_dict()
    if inference:
        # a test feature never uses an ID classifier: one of another size, or one the model was built
        # without (model.num_classes: 0, as from_pretrained builds it), is left out
        unbuilt = [k for k in sd if k.endswith(CLASSIFIER_SUFFIX) and k not in own]
        for k in unbuilt:
            sd.pop(k)
        skipped = {k: sd[k].shape[0] for k in sd
                   if k.endswith(CLASSIFIER_SUFFIX) and k in own and sd[k].shape != own[k].shape}
        for k in skipped:
            sd.pop(k)
        if skipped:
            first = next(iter(skipped))
            _logger.info("%s: ID classifier(s) %s skipped (%d classes in the file, %d here; a test feature does not "
                         "use them)", path, sorted(skipped), skipped[first], own[first].shape[0])
    # a peer's whole model, or (inference) training heads this configuration does not have: ignored, listed
    extra = [k for k in sd if k not in own and (layout is not None or (inference and k.startswith("extra_heads.")))]
    for k in extra:
        sd.pop(k)
    unused += extra
    needed = {k: v for k, v in own.items() if not (inference and k.endswith(CLASSIFIER_SUFFIX) and k not in sd)}
    problems = state_dict_problems(needed, sd)
    if problems:
        raise CheckpointError(f"{path} ({layout.name if layout else 'hybrid_reid'} layout) does not fit this model "
                              f"({'; '.join(problems)}); check that the config (model.*, data.modalities) is the one "
                              "the checkpoint was trained with")
    model.load_state_dict(sd, strict=False)
    if unused:
        shown = ", ".join(sorted(unused)[:12]) + (f" ... ({len(unused)} in all)" if len(unused) > 12 else "")
        _logger.info("%s: %d key(s) of the %s model that this configuration does not use were ignored: %s", path,
                     len(unused), layout.name if layout else "saved", shown)
    return layout.name if layout is not None else "hybrid_reid"


def _is_quickgelu(tower: nn.Module) -> Optional[bool]:
    """Whether the tower's MLPs use QuickGELU (None: not a plain ViT MLP)."""
    blocks = getattr(tower, "blocks", None)
    act = getattr(getattr(blocks[0], "mlp", None), "act", None) if blocks is not None and len(blocks) else None
    return None if act is None else type(act).__name__ == "QuickGELU"


def load_tower_weights(tower: nn.Module, path: Union[str, os.PathLike], proj: Optional[nn.Linear] = None,
                       sie: Optional[nn.Module] = None) -> str:
    """Load a pretrained or peer-trained file into a timm tower (and CLIP's projection ``proj`` and a
    camera/view table ``sie``), strictly.

    Traps handled (each tested with a file the test writes in the peer's layout):

    * OpenAI's TorchScript CLIP archive into a GELU tower (arch ``ViT-B-16`` instead of
      ``ViT-B-16-quickgelu``): refused, naming the right arch; a CLIP state dict, which cannot tell
      OpenAI from LAION weights, gets a warning instead.
    * TransReID / CLIP-ReID / MambaPro trained camera tables load into ``sie`` when the shape fits
      (logged either way); TransReID JPM files load their trained ``b1`` branch as the last block
      and norm, not the untrained copy.
    * DeiT distilled files into a tower without a distillation token: refused, naming the token.
    * Keys that are not the tower (heads, text tower, other branches) are listed in one log line.

    Args:
        tower: timm tower built with ``num_classes=0``.
        path: local checkpoint (any format of :func:`read_state_dict`).
        proj: the CLIP projection; required iff the checkpoint is a CLIP one.
        sie: the tower's camera/view embedding, or None.

    Returns:
        The detected layout name.

    Raises:
        CheckpointError: naming the path and the cause, or the first missing / unexpected /
            mis-shaped keys.
    """
    path = os.fspath(path)
    ckpt = to_timm_layout(read_state_dict(path), tower)
    sd, layout = ckpt.state, ckpt.layout
    quick = _is_quickgelu(tower)
    if layout in ("openai-clip", "clip-reid", "mambapro") and quick is False:
        if _is_torchscript(path):
            raise CheckpointError(f"{path} is OpenAI's TorchScript CLIP archive, trained with QuickGELU, but the tower "
                                  "uses nn.GELU (features would be silently off); use the arch's -quickgelu name, "
                                  "e.g. ViT-B-16-quickgelu")
        _logger.warning("%s holds CLIP weights (%s layout) and the tower uses nn.GELU: right for LAION / open_clip "
                        "weights; OpenAI's weights and models trained from them (CLIP-ReID, MambaPro, ...) need "
                        "the -quickgelu arch, e.g. ViT-B-16-quickgelu", path, layout)
    if "dist_token" in sd and getattr(tower, "dist_token", None) is None:
        raise CheckpointError(f"{path} is a distilled DeiT (it has a dist_token and 2 prefix positions in pos_embed); "
                              "this tower has no distillation token: use the distilled arch, e.g. "
                              "deit_base_distilled_patch16_224")
    head_w = sd.pop("head.weight", None)
    heads = ("head.", "head_dist.", "fc.", "pre_logits.", "classifier.", "bottleneck.")
    dropped = [k for k in sd if k.startswith(heads)
               or k in ("sie_embed", "cv_embed")]
    for k in dropped:
        sd.pop(k)  # classifier heads and stray camera tables are not part of the tower
    if "pos_embed" in sd and getattr(tower, "pos_embed", None) is not None:
        prefix = 0 if getattr(tower, "no_embed_class", False) else getattr(tower, "num_prefix_tokens", 1)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], tuple(tower.patch_embed.grid_size), prefix, source=path)
    own = tower.state_dict()
    if layout not in ("openai-clip", "timm"):  # a whole trained model: what is not the tower is left unused
        extra = [k for k in sd if k not in own]
        for k in extra:  # e.g. MambaPro's per-block prompts and adapters
            sd.pop(k)
        ckpt.unused += extra
    problems = state_dict_problems(own, sd)
    if proj is not None and head_w is None:
        problems.append("missing the CLIP projection (visual.proj)")
    if proj is not None and head_w is not None and head_w.shape != proj.weight.shape:
        problems.append(f"projection: checkpoint {tuple(head_w.shape)} vs model {tuple(proj.weight.shape)}")
    if problems:
        raise CheckpointError(f"{path} ({layout} layout) does not fit the tower: " + "; ".join(problems)
                              + ". Check the arch / tower_kwargs / stride match the checkpoint.")
    tower.load_state_dict(sd, strict=True)
    if proj is not None:
        with torch.no_grad():
            proj.weight.copy_(head_w)
    _load_camera_table(ckpt, sie, path)
    for note in ckpt.notes:
        _logger.info("%s: %s", path, note)
    unused = sorted(set(ckpt.unused + dropped))
    if unused:
        shown = ", ".join(unused[:12]) + (f" ... ({len(unused)} in all)" if len(unused) > 12 else "")
        _logger.info("%s: %d key(s) that are not the tower were left unused: %s", path, len(unused), shown)
    _logger.info("loaded %s (%s layout)", path, layout)
    return layout


def _load_camera_table(ckpt: TowerCheckpoint, sie: Optional[nn.Module], path: str) -> None:
    """A trained camera/view table into the tower's embedding when its shape fits; logged either way."""
    table = ckpt.camera_table
    if table is None:
        return
    if sie is None:
        _logger.info("%s: its trained camera table %s is not used (this tower has no camera embedding; set "
                     "model.num_cams > 0 to use it)", path, tuple(table.shape))
        return
    if tuple(table.shape) != tuple(sie.table.shape):
        _logger.warning("%s: its trained camera table %s does not fit this model's %s (a different number of "
                        "cameras/views or width); the camera embedding starts random", path, tuple(table.shape),
                        tuple(sie.table.shape))
        return
    with torch.no_grad():
        sie.table.copy_(table)
    _logger.info("%s: loaded its trained camera table %s (%s layout)", path, tuple(table.shape), ckpt.layout)

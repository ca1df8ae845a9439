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


def to_timm_vit_layout(sd: StateDict) -> Tuple[StateDict, str]:
    """Bring any supported layout to timm ``VisionTransformer`` keys.

    Returns:
        (state dict, name of the detected layout). CLIP's projection becomes ``head.weight``
        ([out_dim, width], ``nn.Linear`` layout).
    """
    if all(k.startswith("module.") for k in sd):
        sd = _strip_prefix(sd, "module.")
    if "visual.class_embedding" in sd:
        from timm.models.vision_transformer import _convert_openai_clip

        out = _convert_openai_clip(sd, model=None)  # model is unused by timm's converter
        out.pop("head.bias", None)  # timm adds a zero bias; CLIP's projection has none
        return out, "openai-clip"
    for prefix, name in (("base.", "transreid"), ("backbone.", "fastreid")):
        if f"{prefix}pos_embed" in sd:
            return _strip_prefix(sd, prefix), name
    return sd, "timm-vit"


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


def load_model_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load a whole-model checkpoint (``model.safetensors`` written by ``run.py train``, a folder that
    holds one, such as ``OUTPUT_DIR/checkpoints/epoch_010``, or any format of :func:`read_state_dict`)
    strictly into ``model``.

    Raises:
        CheckpointError: the file is missing or does not fit; the message names it and the keys.
    """
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
    problems = state_dict_problems(model.state_dict(), sd)
    if problems:
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(problems)}); check that the config "
                              "(model.*, data.modalities) is the one the checkpoint was trained with")
    model.load_state_dict(sd, strict=True)


def load_tower_weights(tower: nn.Module, path: Union[str, os.PathLike],
                       proj: Optional[nn.Linear] = None) -> str:
    """Load a pretrained file into a timm ViT tower (and CLIP's projection ``proj``), strictly.

    Args:
        tower: timm ``VisionTransformer`` built with ``num_classes=0``.
        path: local checkpoint (any format of :func:`read_state_dict`).
        proj: the CLIP projection; required iff the checkpoint is a CLIP one.

    Returns:
        The detected layout name.

    Raises:
        CheckpointError: naming the path and the first missing / unexpected / mis-shaped keys.
    """
    path = os.fspath(path)
    sd, layout = to_timm_vit_layout(read_state_dict(path))
    head_w = sd.pop("head.weight", None)
    for k in [k for k in sd if k.startswith(("head.", "fc.", "pre_logits.", "classifier.", "bottleneck."))
              or k in ("sie_embed", "cv_embed")]:
        sd.pop(k)  # classifier heads and the peers' own camera tables are not part of the tower
    if "pos_embed" in sd and getattr(tower, "pos_embed", None) is not None:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], tuple(tower.patch_embed.grid_size),
                                           getattr(tower, "num_prefix_tokens", 1), source=path)
    problems = state_dict_problems(tower.state_dict(), sd)
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
    _logger.info("loaded %s (%s layout)", path, layout)
    return layout

"""MDReID (NeurIPS 2025; github stone96123/MDReID) checkpoints in this project's layout.

The authors save ``MDReID.state_dict()``: the tower under ``BACKBONE.base.`` (OpenAI CLIP's
``visual`` keys, or their TransReID ViT's), with the shared token ``add_image_token`` beside the class
token (the same parameter, saved twice) and a positional table one row longer than the grid needs;
the camera table (``BACKBONE.cv_embed`` for CLIP, ``BACKBONE.base.sie_embed`` for the ViT); the heads
``bottleneck_{r,n,t}`` / ``classifier_{r,n,t}`` on each modality's specific token and
``bottleneck_s`` / ``classifier_s`` on the shared tokens; and ``bottleneck_{rs,ns,ts}`` /
``classifier_{rs,ns,ts}``, which no loss or test feature uses (``rs`` is applied to every modality and
its scores are discarded; ``ns`` and ``ts`` are never called).

In this project (``configs/methods/mdreid*.yaml``) the tower is ``encoder.backbones.<clip|vit>``, its
positional table and (untied) shared token ``....shared_token``, the heads
``extra_heads.specific_<rgb|nir|tir>`` and ``extra_heads.shared``. The unused heads are listed as
keys without a place here.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..models.checkpoint import _openai_to_timm
from . import LAYOUTS, Converted, Layout, StateDict

MODALITY = {"r": "rgb", "n": "nir", "t": "tir"}


def detect(sd: StateDict) -> bool:
    """Their state dict: the tower with its shared token ``BACKBONE.base.add_image_token``."""
    return any(k in ("BACKBONE.base.add_image_token", "module.BACKBONE.base.add_image_token") for k in sd)


def convert(sd: StateDict) -> Converted:
    """Their ``MDReID.state_dict()`` -> this project's keys (``configs/methods/mdreid*.yaml``)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    base = {k[len("BACKBONE.base."):]: v for k, v in sd.items() if k.startswith("BACKBONE.base.")}
    out: Dict[str, torch.Tensor] = {}
    unused, notes = [], []
    shared = base.pop("add_image_token")
    if "class_embedding" in base:  # CLIP ("ViT-B-16"): OpenAI keys, through timm's public converter
        tower = "clip"
        prefix = f"encoder.backbones.{tower}."
        pos = base.pop("positional_embedding")  # [2 + N, D]: the class row, the shared row, the grid
        timm_sd = _openai_to_timm({f"visual.{k}": v for k, v in base.items()}, None)
        timm_sd.pop("pos_embed", None)
        out[f"{prefix}proj.weight"] = timm_sd.pop("head.weight")
        out[f"{prefix}shared_token.pos_embed"] = pos.reshape(1, *pos.shape[-2:])
        cls = timm_sd["cls_token"]
        if "BACKBONE.cv_embed" in sd:
            out[f"{prefix}sie.table"] = sd["BACKBONE.cv_embed"].flatten(1)
    else:  # their TransReID ViT ("vit_base_patch16_224")
        tower = "vit"
        prefix = f"encoder.backbones.{tower}."
        timm_sd = dict(base)
        out[f"{prefix}shared_token.pos_embed"] = timm_sd.pop("pos_embed")
        if "sie_embed" in timm_sd:
            out[f"{prefix}sie.table"] = timm_sd.pop("sie_embed").flatten(1)
        for k in ("fc.weight", "fc.bias"):
            if timm_sd.pop(k, None) is not None:
                unused.append(f"BACKBONE.base.{k}")
        cls = timm_sd["cls_token"]
    if not torch.equal(shared.reshape(cls.shape), cls):  # never from their code: the two are one parameter there
        out[f"{prefix}shared_token.token"] = shared.reshape(cls.shape)
        notes.append("its shared token (add_image_token) differs from its class token: written as "
                     "shared_token.token, which a model with model.modality_fusion_kwargs.tie=false uses")
    for k, v in timm_sd.items():
        out[f"{prefix}tower.{k}"] = v
    for k, v in sd.items():
        head = k.split(".", 1)[0]
        kind, _, tag = head.partition("_")
        if kind in ("bottleneck", "classifier") and tag in ("r", "n", "t", "s"):
            name = "shared" if tag == "s" else f"specific_{MODALITY[tag]}"
            out[f"extra_heads.{name}.{'bnneck' if kind == 'bottleneck' else 'classifier'}.{k.split('.', 1)[1]}"] = v
        elif not k.startswith(("BACKBONE.base.", "BACKBONE.cv_embed")):
            unused.append(k)
    return Converted(out, unused, notes)


LAYOUTS.register("mdreid")(Layout("mdreid", detect, convert,
                                  "MDReID (NeurIPS 2025) state_dict: BACKBONE.base.* with add_image_token, "
                                  "bottleneck_/classifier_{r,n,t,s} heads"))

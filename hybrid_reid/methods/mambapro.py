"""MambaPro (AAAI 2025; github 924973292/MambaPro) checkpoints in this project's layout.

The authors save ``MambaPro.state_dict()``: the tower under ``BACKBONE.base.`` (OpenAI CLIP's
``visual`` keys, or their TransReID ViT's), the per-block prompts and adapters inside it
(``adapter_prompt_{rgb,nir,tir}``, ``adapter_{r,n,t}``, ``adapter_transfer``, ``adapter_ffn``), the
camera table (``BACKBONE.cv_embed`` for CLIP, ``BACKBONE.base.sie_embed`` for the ViT), the Mamba
aggregation under ``AAM.``, and the heads: ``bottleneck_fuse`` / ``classifier_fuse`` on the fused
feature, ``bottleneck`` / ``classifier`` on the concatenated one (``ori``), and the per-modality
``BACKBONE.bottleneck`` / ``BACKBONE.classifier`` that only ``DIRECT: 0`` trains.

In this project (``configs/methods/mambapro*.yaml``) the tower is ``encoder.backbones.<clip|vit>``, its
prompts and adapters ``....parts``, the aggregation ``modality_fusion.aggregators.<tower>``, the fused
feature's head ``head`` and the concatenation's ``extra_heads.ori``. Their modality tags r, n, t are
rgb, nir, tir.
"""
from __future__ import annotations

import re
from typing import Dict, List

from . import LAYOUTS, Converted, Layout, StateDict, backbone_base_tower, without_module_prefix

MODALITY = {"r": "rgb", "n": "nir", "t": "tir", "rgb": "rgb", "nir": "nir", "tir": "tir"}


def detect(sd: StateDict) -> bool:
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    return any(k.startswith("BACKBONE.base.") for k in keys) and any(k.startswith(("AAM.", "bottleneck_fuse."))
                                                                     for k in keys) or \
        (any(k.startswith("BACKBONE.base.") for k in keys) and "classifier_fuse.weight" in keys)


def _parts(tower_sd: StateDict, prefix: str) -> Dict[str, object]:
    """Their per-block prompt / adapter keys (``blocks.{i}.adapter_*``) -> ours (``<prefix>parts.*``)."""
    out = {}
    for k, v in tower_sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.adapter_(prompt_(rgb|nir|tir)|r|n|t|transfer|ffn)(\..*)?", k)
        if m is None:
            continue
        i, what, rest = m.group(1), m.group(2), m.group(4) or ""
        if what.startswith("prompt_"):
            out[f"{prefix}parts.prompts.{i}.{m.group(3)}"] = v
        elif what in ("r", "n", "t"):
            out[f"{prefix}parts.cross.{i}.{MODALITY[what]}{rest}"] = v
        elif what == "transfer":
            out[f"{prefix}parts.transfer.{i}{rest}"] = v
        else:
            out[f"{prefix}parts.adapters.{i}{rest}"] = v
    return out


def _aam(sd: StateDict, tower: str) -> Dict[str, object]:
    """``AAM.*`` -> ``modality_fusion.aggregators.<tower>.*``."""
    out = {}
    base = f"modality_fusion.aggregators.{tower}."
    for k, v in sd.items():
        if not k.startswith("AAM."):
            continue
        k = k[len("AAM."):]
        m = re.fullmatch(r"linear_reduction_([rnt])\.(.*)", k)
        if m:
            out[f"{base}reduce.{MODALITY[m.group(1)]}.{m.group(2)}"] = v
            continue
        m = re.fullmatch(r"ma_block\.(\d+)\.SSM_(intra|inter)\.(.*)", k)
        if m is None:
            raise KeyError(k)
        layer, kind, rest = m.group(1), m.group(2), m.group(3)
        pre = f"{base}blocks.{layer}.{kind}."
        for pattern, repl in ((r"in_proj_([rnt])\.(.*)", "in_proj.{m}.{rest}"),
                              (r"conv2d_([rnt])\.(.*)", "conv.{m}.{rest}"),
                              (r"SSM_([rnt])_f\.(.*)", "scan.{m}.{rest}"),
                              (r"SSM_([rnt])_b\.(.*)", "scan_back.{m}.{rest}"),
                              (r"SSM_2_f\.(.*)", "scan.joint.{rest}"),
                              (r"SSM_2_b\.(.*)", "scan_back.joint.{rest}"),
                              (r"out_proj\.(.*)", "out_proj.{rest}")):
            mm = re.fullmatch(pattern, rest)
            if mm:
                groups = mm.groups()
                name = repl.format(m=MODALITY[groups[0]] if len(groups) == 2 else "", rest=groups[-1])
                out[pre + name] = v
                break
        else:
            raise KeyError(f"AAM.{k}")
    return out


def convert(sd: StateDict) -> Converted:
    """Their ``MambaPro.state_dict()`` -> this project's keys (``configs/methods/mambapro*.yaml``)."""
    sd = without_module_prefix(sd)
    unused: List[str] = []
    notes = []
    tower, prefix, timm_sd, out = backbone_base_tower(sd, unused, drop=("fc.", "proj_special_vit"))
    if tower == "vit":
        notes.append("their ViT's prompts are concatenated on the batch axis and change nothing; "
                     "configs/methods/mambapro_vit.yaml has no prompts, which computes what their code does")
    out.update(_parts(timm_sd, prefix))
    for k, v in timm_sd.items():
        if ".adapter_" not in k:
            out[f"{prefix}tower.{k}"] = v
    out.update(_aam(sd, tower))
    # bottleneck / classifier: the concatenation's head (DIRECT: 1); BACKBONE.bottleneck / .classifier: the
    # per-modality head (DIRECT: 0). Both are in every file; the configuration uses one (the other is listed unused).
    heads = {"bottleneck_fuse.": "head.bnneck.", "classifier_fuse.": "head.classifier.",
             "bottleneck.": "extra_heads.ori.bnneck.", "classifier.": "extra_heads.ori.classifier.",
             "BACKBONE.bottleneck.": "extra_heads.modality.bnneck.",
             "BACKBONE.classifier.": "extra_heads.modality.classifier."}
    for k, v in sd.items():
        for theirs, ours in heads.items():
            if k.startswith(theirs):
                out[ours + k[len(theirs):]] = v
                break
    return Converted(out, unused, notes)


LAYOUTS.register("mambapro")(Layout("mambapro", detect, convert,
                                    "MambaPro (AAAI 2025) state_dict: BACKBONE.base.*, AAM.*, *_fuse heads"))

"""DeMo (AAAI 2025; github 924973292/DeMo) checkpoints in this project's layout.

The authors save ``DeMo.state_dict()``: the tower under ``BACKBONE.base.`` (OpenAI CLIP's ``visual``
keys, or their TransReID ViT's with its camera table ``sie_embed``), CLIP's camera table
``BACKBONE.cv_embed``, PIFE as ``{rgb,nir,tir}_reduce`` (LayerNorm ``.0``, Linear ``.1``), HDM as
``generalFusion.<x>_token`` and ``generalFusion.<x>`` (an ``nn.MultiheadAttention``) for x in r, n,
t, rn, rt, nt, rnt, ATMoE as ``generalFusion.moe`` (the gate ``gating_network.gate.{linear_re, q_,
k_}`` and one ``experts.<head>.expertHead.<feature>.mlp`` = Linear, QuickGELU, BatchNorm per head and
decoupled feature), and the heads ``bottleneck_moe`` / ``classifier_moe`` (ATMoE feature),
``bottleneck`` / ``classifier`` (``ori``, ``DIRECT: 1``) or ``bottleneck_{r,n,t}`` /
``classifier_{r,n,t}`` (each modality, ``DIRECT: 0``).

In this project (``configs/methods/demo*.yaml``) the tower is ``encoder.backbones.<clip|vit>``, the
fusion ``modality_fusion.{pife, hdm, moe}``, the ATMoE feature's head ``head`` and the others
``extra_heads.{ori | rgb, nir, tir}``. The experts are one batched weight [7, heads, d, d] and one
BatchNorm over the 7F channels here: their per-expert tensors are stacked into them.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

from . import LAYOUTS, Converted, Layout, StateDict, backbone_base_tower

MODALITY = {"r": "rgb", "n": "nir", "t": "tir", "rgb": "rgb", "nir": "nir", "tir": "tir"}
FUSION = "modality_fusion."


def _plain(sd: StateDict) -> StateDict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def detect(sd: StateDict) -> bool:
    keys = list(_plain(sd))
    return any(k.startswith("BACKBONE.base.") for k in keys) and \
        any(k.startswith(("generalFusion.", "classifier_moe.")) for k in keys)


def _tower(sd: StateDict, out: Dict[str, object], unused: List[str]) -> str:
    """``BACKBONE.base.*`` (+ ``BACKBONE.cv_embed``) -> ``encoder.backbones.<tower>.*``; returns the tower."""
    tower, prefix, timm_sd, placed = backbone_base_tower(sd, unused)
    out.update(placed)
    for k, v in timm_sd.items():
        out[f"{prefix}tower.{k}"] = v
    return tower


def _experts(sd: StateDict, out: Dict[str, object]) -> None:
    """Their per-expert Linear + BatchNorm (``experts.<h>.expertHead.<j>.mlp.{0,2}``) stacked into ours:
    ``expert_weight`` [K, H, d, d], ``expert_bias`` [K, H, d], ``expert_norm`` over K*H*d channels in
    the order (feature j, head h, channel)."""
    found = {}
    for k, v in sd.items():
        m = re.fullmatch(r"generalFusion\.moe\.experts\.(\d+)\.expertHead\.(\d+)\.mlp\.([02])\.(\w+)", k)
        if m:
            found[(int(m.group(2)), int(m.group(1)), m.group(3), m.group(4))] = v
    if not found:
        return
    k_, h_ = max(j for j, *_ in found) + 1, max(h for _, h, *_ in found) + 1
    pre = f"{FUSION}moe."
    out[pre + "expert_weight"] = torch.stack([torch.stack([found[(j, h, "0", "weight")] for h in range(h_)])
                                              for j in range(k_)])
    out[pre + "expert_bias"] = torch.stack([torch.stack([found[(j, h, "0", "bias")] for h in range(h_)])
                                            for j in range(k_)])
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[pre + f"expert_norm.{name}"] = torch.cat([found[(j, h, "2", name)] for j in range(k_) for h in range(h_)])
    # every expert's BatchNorm has seen the same batches
    out[pre + "expert_norm.num_batches_tracked"] = found[(0, 0, "2", "num_batches_tracked")]


def convert(sd: StateDict) -> Converted:
    """Their ``DeMo.state_dict()`` -> this project's keys (``configs/methods/demo*.yaml``)."""
    sd = _plain(sd)
    out: Dict[str, object] = {}
    unused: List[str] = []
    _tower(sd, out, unused)
    _experts(sd, out)
    gate = "generalFusion.moe.gating_network.gate."
    renames = ((r"(rgb|nir|tir)_reduce\.0\.(.*)", lambda m: f"pife.{m[1]}.norm.{m[2]}"),
               (r"(rgb|nir|tir)_reduce\.1\.(.*)", lambda m: f"pife.{m[1]}.proj.{m[2]}"),
               (r"generalFusion\.([rnt]+)_token", lambda m: f"hdm.branches.{m[1]}.token"),
               (r"generalFusion\.([rnt]+)\.(in_proj_weight|in_proj_bias|out_proj\..*)",
                lambda m: f"hdm.branches.{m[1]}.{m[2]}"),
               (re.escape(gate) + r"linear_re\.0\.(.*)", lambda m: f"moe.gate_reduce.{m[1]}"),
               (re.escape(gate) + r"linear_re\.2\.(.*)", lambda m: f"moe.gate_norm.{m[1]}"),
               (re.escape(gate) + r"q_\.weight", lambda m: "moe.gate_q.weight"),
               (re.escape(gate) + r"k_\.weight", lambda m: "moe.gate_k.weight"))
    heads = {"bottleneck_moe.": "head.bnneck.", "classifier_moe.": "head.classifier.",
             "bottleneck.": "extra_heads.ori.bnneck.", "classifier.": "extra_heads.ori.classifier."}
    heads.update({f"bottleneck_{t}.": f"extra_heads.{MODALITY[t]}.bnneck." for t in "rnt"})
    heads.update({f"classifier_{t}.": f"extra_heads.{MODALITY[t]}.classifier." for t in "rnt"})
    for k, v in sd.items():
        if k.startswith(("BACKBONE.base.", "generalFusion.moe.experts.")) or k == "BACKBONE.cv_embed":
            continue
        if k.startswith("BACKBONE."):
            unused.append(k)
            continue
        for pattern, name in renames:
            m = re.fullmatch(pattern, k)
            if m:
                out[FUSION + name(m)] = v.flatten() if k.endswith("_token") else v
                break
        else:
            head = next((h for h in heads if k.startswith(h)), None)
            if head is None:
                raise KeyError(k)
            out[heads[head] + k[len(head):]] = v
    notes = ["their 7 x heads experts stacked into one batched weight and one BatchNorm (the same numbers)"]
    return Converted(out, unused, notes)


LAYOUTS.register("demo")(Layout("demo", detect, convert,
                                "DeMo (AAAI 2025) state_dict: BACKBONE.base.*, {rgb,nir,tir}_reduce, generalFusion.*, "
                                "*_moe heads"))
